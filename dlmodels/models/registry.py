"""Name -> model builder registry: `dlmodels.models.get("unet", ...)`, `dlmodels.models.list()`."""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable
    task: str
    paper: str


_REGISTRY: dict[str, ModelEntry] = {}


def register(name: str, *, task: str, paper: str):
    """Decorator registering a builder under `name` (lower case) with its task and paper."""

    def wrap(builder):
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key].builder is not builder:
            raise ValueError(f"model name {key!r} is registered twice")
        _REGISTRY[key] = ModelEntry(key, builder, task, paper)
        return builder

    return wrap


def list() -> builtins.list[str]:
    """Sorted names of every registered model."""
    return sorted(_REGISTRY)


def entry(name: str) -> ModelEntry:
    key = str(name).lower()
    if key not in _REGISTRY:
        raise ValueError(
            f"`name`={name!r} is not a registered model. Registered: {', '.join(list())}. "
            "Run `dlmodels models` to see them with their tasks and papers."
        )
    return _REGISTRY[key]


def get(name: str, **kwargs):
    """Build the model registered as `name` with keyword arguments for its builder."""
    return entry(name).builder(**kwargs)

"""Argument checks shared by layers and models: each error names the argument, the value, what is
allowed and how to fix it, and is raised at construction time as a `dlmodels.errors.UserError`
(a ValueError), which the CLI reports as a user mistake."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dlmodels.errors import UserError


def check_positive_int(name: str, value: Any, *, owner: str = "") -> int:
    """Return `value` as int, or raise UserError (a ValueError) unless it is an integer >= 1."""
    where = f"{owner}: " if owner else ""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(
            f"{where}`{name}` must be a positive integer (>= 1), got {value!r}. "
            f"Pass e.g. {name}=64."
        )
    return int(value)


def check_choice(name: str, value: Any, allowed: Iterable[Any], *, owner: str = "") -> Any:
    """Return `value` if it is one of `allowed`, else raise UserError listing the choices."""
    allowed = list(allowed)
    if value not in allowed:
        where = f"{owner}: " if owner else ""
        raise UserError(
            f"{where}`{name}`={value!r} is not supported. Allowed values: "
            f"{', '.join(repr(a) for a in allowed)}."
        )
    return value


def normalize_tuple(name: str, value: Any, n: int, *, owner: str = "") -> tuple[int, ...]:
    """An int or a length-`n` sequence of positive ints -> tuple of `n` ints."""
    values = (value,) * n if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        values = tuple(values)
    except TypeError:
        values = None
    if values is None or len(values) != n:
        where = f"{owner}: " if owner else ""
        raise UserError(f"{where}`{name}` must be an int or a sequence of {n} ints, got {value!r}.")
    for v in values:
        check_positive_int(name, v, owner=owner)
    return tuple(int(v) for v in values)


def check_strides_dilation(strides: tuple, dilation_rate: tuple, *, owner: str = "") -> None:
    """Keras convolutions cannot stride and dilate at once: raise a UserError that says so."""
    if max(strides) > 1 and max(dilation_rate) > 1:
        where = f"{owner}: " if owner else ""
        raise UserError(
            f"{where}`strides`={strides} and `dilation_rate`={dilation_rate} cannot both be > 1. "
            "Allowed: strides > 1 with dilation_rate=1 (downsampling) or strides=1 with any "
            "dilation_rate (atrous, size-preserving)."
        )

"""Match the inputs a caller passes to a model's named inputs: one implementation for every
runtime (`OnnxModel`, `dlmodels.export.OpenVINOModel`, `dlmodels.export.LiteRTModel`).

Imports only numpy, so the TensorFlow-free runtime, the serving process and the fresh-process
parity workers (which load the OpenVINO and LiteRT modules stand-alone) can all use it. A name,
count or dtype mismatch fails here with a message that names the model (`owner`), what was
given and the model's inputs, instead of a runtime's terse error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from dlmodels.errors import UserError

CASTS = ("no", "equiv", "safe", "same_kind", "unsafe")
"""numpy casting rules `match_feeds` accepts (`numpy.can_cast`)."""


def match_feeds(
    inputs: Any,
    names: Sequence[str],
    dtypes: Sequence[Any] | Mapping[str, Any] | None = None,
    *,
    owner: str,
    cast: str = "same_kind",
    check: Callable[[str, np.ndarray], None] | None = None,
) -> dict[str, np.ndarray]:
    """Map `inputs` to {input name: C-contiguous array} in the model's input order.

    Args:
        inputs: one array (single-input models only), a list/tuple with one array per input
            in `names` order, or a mapping by input name (every name, nothing else).
        names: the model's input names, in order.
        dtypes: what each input takes: one entry per input in `names` order, or a mapping by
            name; an entry is anything `numpy.dtype` reads, or None to keep the array's dtype.
            None (the default): every array keeps its dtype.
        owner: who is asking (e.g. the model file's name); every message starts with it.
        cast: the numpy casting rule for an array whose dtype differs from its input's, one of
            `CASTS`: "same_kind" (default) lets float64 feed float32 but never floats feed
            ints, "no" demands the exact dtype, "unsafe" converts whatever numpy can.
        check: called as `check(name, array)` on each input's cast array, in input order,
            before it is made contiguous; raise there to refuse it (`OnnxModel` checks rank
            and fixed sizes this way).

    Returns:
        {name: numpy array} with every name of `names`, in that order.

    Raises:
        UserError (a ValueError): missing or unexpected names, a list of the wrong length, a
            single array for a model with several inputs, an unknown `cast`.
        TypeError: an array whose dtype cannot be cast to its input's under `cast`.
    """
    names = list(names)
    if cast not in CASTS:
        raise UserError(f"{owner}: cast must be one of {list(CASTS)}, got {cast!r}")
    if isinstance(inputs, Mapping):
        missing = [n for n in names if n not in inputs]
        unexpected = [str(k) for k in inputs if k not in names]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {missing}")
            if unexpected:
                parts.append(f"unexpected {unexpected}")
            raise UserError(f"{owner}: inputs {', '.join(parts)}; the model's inputs are {names}")
        arrays = [inputs[n] for n in names]
    elif isinstance(inputs, list | tuple):
        if len(inputs) != len(names):
            raise UserError(
                f"{owner}: got {len(inputs)} input arrays; the model has {len(names)} inputs "
                f"{names} (pass them in this order, or a dict by name)"
            )
        arrays = list(inputs)
    else:
        if len(names) != 1:
            raise UserError(
                f"{owner}: the model has inputs {names}; pass a list in this order or a dict "
                "by name"
            )
        arrays = [inputs]
    if dtypes is None:
        wanted = [None] * len(names)
    elif isinstance(dtypes, Mapping):
        wanted = [dtypes.get(n) for n in names]
    else:
        wanted = list(dtypes)
        if len(wanted) != len(names):
            raise UserError(
                f"{owner}: {len(wanted)} dtypes for the {len(names)} inputs {names}; give one "
                "per input (None keeps an array's dtype)"
            )
    feeds = {}
    for name, value, dtype in zip(names, arrays, wanted, strict=True):
        arr = np.asarray(value)
        if dtype is not None:
            want = np.dtype(dtype)
            if arr.dtype != want:
                if not np.can_cast(arr.dtype, want, casting=cast):
                    raise TypeError(
                        f"{owner}: input {name!r} expects dtype {want.name}, got "
                        f"{arr.dtype.name} (not castable under casting={cast!r}); convert it "
                        f"with .astype({want.name!r})"
                    )
                arr = arr.astype(want)
        if check is not None:
            check(name, arr)
        # np.require, not np.ascontiguousarray: that one turns a 0-d array into shape (1,).
        feeds[name] = np.require(arr, requirements="C")
    return feeds

"""Request decoding and validation, response encoding, for both protocols.

Every check names the input and says what the model expects versus what was given, and raises
`ServingError(400, ...)`; nothing a client sends reaches onnxruntime unchecked. Binary tensors
(KServe's binary tensor data extension) become numpy views over the request body: no copy.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np
import orjson

from serving._common import NUMPY_TO_V2, V2_TO_NUMPY, ServingError, v1_shape

MAX_RANK = 16
MAX_ELEMENTS = 1 << 31


# numpy's `dtype.name` costs microseconds (it is computed on every access): the hot paths look
# dtypes up in these tables instead, falling back to the name for anything else.
_V2_OF_DTYPE = {np.dtype(n): v for n, v in NUMPY_TO_V2.items() if n != "object"}
_LITTLE_ENDIAN = {d: d.newbyteorder("<") for d in _V2_OF_DTYPE}


def v2_datatype(dtype: np.dtype) -> str:
    """The KServe v2 datatype of a numpy dtype ("FP32", ...; its name when v2 has none)."""
    found = _V2_OF_DTYPE.get(dtype)
    if found is None:
        found = NUMPY_TO_V2.get(dtype.name, dtype.name)
    return found


def loads(body: bytes | memoryview) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise ServingError(400, f"the request body is not valid JSON: {err}") from None


def _spec_text(spec) -> str:
    return str(v1_shape(spec.shape))


def check_tensor(served, spec, arr: np.ndarray) -> np.ndarray:
    """Check one decoded input against its spec (dtype already converted)."""
    if arr.ndim != spec.rank or not spec.compatible_shape(arr.shape):
        raise ServingError(
            400,
            f"input {spec.name!r}: expected shape {_spec_text(spec)} (-1: any size), got "
            f"{list(arr.shape)}",
        )
    if served.max_batch_size and arr.shape[0] > served.max_batch_size:
        raise ServingError(
            400,
            f"input {spec.name!r}: batch size {arr.shape[0]} exceeds the model's max_batch_size "
            f"{served.max_batch_size}; split the request",
        )
    if arr.size == 0:
        raise ServingError(400, f"input {spec.name!r}: empty tensor (shape {list(arr.shape)})")
    return arr


def check_feeds(served, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [s.name for s in served.inputs]
    missing = [n for n in names if n not in feeds]
    unexpected = [n for n in feeds if n not in names]
    if missing or unexpected:
        parts = ([f"missing {missing}"] if missing else []) + (
            [f"unexpected {unexpected}"] if unexpected else []
        )
        raise ServingError(
            400, f"inputs: {', '.join(parts)}; model {served.name!r} takes inputs {names}"
        )
    out = {s.name: check_tensor(served, s, feeds[s.name]) for s in served.inputs}
    if served.batchable and len(out) > 1:
        sizes = {n: a.shape[0] for n, a in out.items()}
        if len(set(sizes.values())) > 1:
            raise ServingError(400, f"inputs disagree on the batch size: {sizes}")
    return out


def from_json_values(name: str, values: Any, want: np.dtype) -> np.ndarray:
    """JSON numbers (nested lists or flat) to an array of `want`, refusing lossy casts."""
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError, OverflowError):
        raise ServingError(
            400, f"input {name!r}: data is not a regular (rectangular) array of numbers"
        ) from None
    if arr.dtype.kind not in "biuf":
        raise ServingError(
            400,
            f"input {name!r}: expected numbers for dtype {want.name}, got "
            f"{'a ragged or mixed list' if arr.dtype.kind == 'O' else arr.dtype.name + ' values'}",
        )
    if arr.dtype != want:
        if arr.dtype.kind == "f" and want.kind in "iub":
            raise ServingError(
                400, f"input {name!r}: expected {want.name} values, got floating-point numbers"
            )
        info = np.iinfo(want) if want.kind in "iu" else None
        if info is not None and arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise ServingError(400, f"input {name!r}: values out of range for {want.name}")
        arr = arr.astype(want)
    return arr


def _check_shape_field(name: str, shape: list[int]) -> tuple[int, ...]:
    if len(shape) > MAX_RANK:
        raise ServingError(400, f"input {name!r}: rank {len(shape)} exceeds {MAX_RANK}")
    n = 1
    for d in shape:
        n *= d
        if n > MAX_ELEMENTS:
            raise ServingError(400, f"input {name!r}: shape {shape} has too many elements")
    return tuple(shape)


# -- KServe v2 -------------------------------------------------------------------------------


def decode_v2(served, request, body: bytes, header_len: int | None) -> dict[str, np.ndarray]:
    """Inputs of a validated KServe v2 request (`request` a pydantic InferenceRequest)."""
    specs = {s.name: s for s in served.inputs}
    feeds: dict[str, np.ndarray] = {}
    offset = header_len or 0
    view = memoryview(body)
    for inp in request.inputs:
        name = inp.name
        if name in feeds:
            raise ServingError(400, f"input {name!r} is given twice")
        spec = specs.get(name)
        if spec is None:
            raise ServingError(
                400,
                f"input {name!r} is not an input of model {served.name!r}; it takes {list(specs)}",
            )
        want = served.input_dtypes[name]
        expected_dt = v2_datatype(want)
        if inp.datatype != expected_dt:
            raise ServingError(
                400, f"input {name!r}: expected datatype {expected_dt}, got {inp.datatype!r}"
            )
        shape = _check_shape_field(name, inp.shape)
        count = math.prod(shape)
        params = inp.parameters or {}
        size = params.get("binary_data_size")
        if size is not None:
            if inp.data is not None:
                raise ServingError(400, f"input {name!r}: both data and binary_data_size given")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ServingError(400, f"input {name!r}: binary_data_size must be an int >= 0")
            if header_len is None:
                raise ServingError(
                    400,
                    f"input {name!r}: binary_data_size given without the "
                    "Inference-Header-Content-Length header",
                )
            if size != count * want.itemsize:
                raise ServingError(
                    400,
                    f"input {name!r}: binary_data_size {size} does not match shape "
                    f"{list(shape)} of {expected_dt} ({count * want.itemsize} bytes)",
                )
            if offset + size > len(body):
                raise ServingError(
                    400, f"input {name!r}: the body ends before its {size} binary bytes"
                )
            little = _LITTLE_ENDIAN.get(want)
            if little is None:
                little = want.newbyteorder("<")
            arr = np.frombuffer(view[offset : offset + size], dtype=little)
            offset += size
            if not arr.flags.aligned:
                arr = arr.copy()
        else:
            if inp.data is None:
                raise ServingError(400, f"input {name!r}: no data and no binary_data_size")
            arr = from_json_values(name, inp.data, want)
            if arr.size != count:
                raise ServingError(
                    400,
                    f"input {name!r}: shape {list(shape)} needs {count} values, data has "
                    f"{arr.size}",
                )
        feeds[name] = arr.reshape(shape)
    if header_len is not None and offset != len(body):
        raise ServingError(
            400,
            f"the body has {len(body) - offset} bytes after the binary inputs (expected none)",
        )
    return check_feeds(served, feeds)


def encode_v2(served, request, outputs: dict[str, np.ndarray], model_version: int):
    """(body bytes, header length or None) of a KServe v2 response."""
    params = request.parameters or {}
    all_binary = bool(params.get("binary_data_output", False))
    if request.outputs:
        wanted = []
        for o in request.outputs:
            if o.name not in outputs:
                raise ServingError(
                    400,
                    f"output {o.name!r} is not an output of model {served.name!r}; it has "
                    f"{list(outputs)}",
                )
            binary = (o.parameters or {}).get("binary_data", all_binary)
            wanted.append((o.name, bool(binary)))
    else:
        wanted = [(n, all_binary) for n in outputs]
    entries, chunks = [], []
    for name, binary in wanted:
        arr = outputs[name]
        entry = {
            "name": name,
            "datatype": v2_datatype(arr.dtype),
            "shape": list(arr.shape),
        }
        if binary:
            buf = np.ascontiguousarray(arr)
            entry["parameters"] = {"binary_data_size": buf.nbytes}
            chunks.append(memoryview(buf).cast("B"))
        else:
            entry["data"] = np.ascontiguousarray(arr).ravel()
        entries.append(entry)
    response = {"model_name": served.name, "model_version": str(model_version), "outputs": entries}
    if request.id is not None:
        response["id"] = request.id
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


# -- TF Serving REST -------------------------------------------------------------------------


def _b64_array(name: str, value: dict, spec, want: np.dtype, per_instance: bool) -> np.ndarray:
    """{"b64": ...} for a numeric input: the raw little-endian bytes of the tensor (of one
    instance in row format), reshaped with the model's static sizes."""
    if set(value) != {"b64"} or not isinstance(value["b64"], str):
        raise ServingError(400, f"input {name!r}: expected {{'b64': '<base64 string>'}}")
    try:
        raw = base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise ServingError(400, f"input {name!r}: b64 value is not valid base64") from None
    if len(raw) % want.itemsize:
        raise ServingError(
            400, f"input {name!r}: {len(raw)} b64 bytes are not a whole number of {want.name}"
        )
    arr = np.frombuffer(raw, dtype=want.newbyteorder("<"))
    dims = list(spec.shape[1:] if per_instance else spec.shape)
    free = [i for i, d in enumerate(dims) if not isinstance(d, int)]
    if len(free) > 1 or (per_instance and free):
        raise ServingError(
            400,
            f"input {name!r}: b64 needs the model's sizes to be fixed (it has shape "
            f"{_spec_text(spec)}); send numbers instead",
        )
    fixed = math.prod(d for d in dims if isinstance(d, int))
    if free:
        if fixed == 0 or arr.size % fixed:
            raise ServingError(
                400,
                f"input {name!r}: {arr.size} b64 values do not fit shape {_spec_text(spec)}",
            )
        dims[free[0]] = arr.size // fixed
    elif arr.size != fixed:
        raise ServingError(
            400,
            f"input {name!r}: {arr.size} b64 values, expected {fixed} for shape {_spec_text(spec)}",
        )
    return arr.reshape(dims)


def _tf_value(served, name: str, value: Any, per_instance_list: list | None = None):
    spec = next(s for s in served.inputs if s.name == name)
    want = served.input_dtypes[name]
    if per_instance_list is not None:
        if any(isinstance(v, dict) for v in per_instance_list):
            if not all(isinstance(v, dict) for v in per_instance_list):
                raise ServingError(400, f"input {name!r}: mixes b64 objects and numbers")
            parts = [_b64_array(name, v, spec, want, True) for v in per_instance_list]
            return np.stack(parts)
        return from_json_values(name, per_instance_list, want)
    if isinstance(value, dict):
        return _b64_array(name, value, spec, want, False)
    return from_json_values(name, value, want)


def decode_tfserving(served, request) -> tuple[dict[str, np.ndarray], str]:
    """Inputs of a TF Serving predict request and its format ("row" or "columnar")."""
    names = [s.name for s in served.inputs]
    if request.signature_name not in (None, "", "serving_default"):
        raise ServingError(
            400,
            f"signature_name {request.signature_name!r}: this model has only 'serving_default'",
        )
    has_rows, has_cols = request.instances is not None, request.inputs is not None
    if has_rows == has_cols:
        raise ServingError(
            400, "give exactly one of 'instances' (row format) or 'inputs' (columnar format)"
        )
    feeds: dict[str, np.ndarray] = {}
    if has_rows:
        rows = request.instances
        if not isinstance(rows, list) or not rows:
            raise ServingError(400, "'instances' must be a non-empty list")
        if all(isinstance(r, dict) and "b64" not in r for r in rows):
            keys = set(rows[0])
            if any(set(r) != keys for r in rows):
                raise ServingError(400, "every instance must name the same inputs")
            _known(served, keys)
            for n in keys:
                feeds[n] = _tf_value(served, n, None, [r[n] for r in rows])
        elif len(names) == 1:
            feeds[names[0]] = _tf_value(served, names[0], None, rows)
        else:
            raise ServingError(
                400,
                f"model {served.name!r} has inputs {names}: each instance must be an "
                "object by input name",
            )
        fmt = "row"
    else:
        value = request.inputs
        if isinstance(value, dict) and "b64" not in value:
            _known(served, set(value))
            for n, v in value.items():
                feeds[n] = _tf_value(served, n, v)
        elif len(names) == 1:
            feeds[names[0]] = _tf_value(served, names[0], value)
        else:
            raise ServingError(
                400,
                f"model {served.name!r} has inputs {names}: 'inputs' must be an object "
                "by input name",
            )
        fmt = "columnar"
    return check_feeds(served, feeds), fmt


def _known(served, keys: set) -> None:
    names = [s.name for s in served.inputs]
    unexpected = sorted(str(k) for k in keys if k not in names)
    missing = [n for n in names if n not in keys]
    if unexpected or missing:
        parts = ([f"missing {missing}"] if missing else []) + (
            [f"unexpected {unexpected}"] if unexpected else []
        )
        raise ServingError(
            400, f"inputs: {', '.join(parts)}; model {served.name!r} takes inputs {names}"
        )


def encode_tfserving(outputs: dict[str, np.ndarray], fmt: str) -> bytes:
    opt = orjson.OPT_SERIALIZE_NUMPY
    arrays = {n: np.require(a, requirements="C") for n, a in outputs.items()}
    if fmt == "columnar":
        value = next(iter(arrays.values())) if len(arrays) == 1 else arrays
        return orjson.dumps({"outputs": value}, option=opt)
    if len(arrays) == 1:
        return orjson.dumps({"predictions": next(iter(arrays.values()))}, option=opt)
    n = len(next(iter(arrays.values())))
    rows = [{k: a[i] for k, a in arrays.items()} for i in range(n)]
    return orjson.dumps({"predictions": rows}, option=opt)


V2_DATATYPES = (*V2_TO_NUMPY, "BYTES")

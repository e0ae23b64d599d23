"""Shared pieces of the server: the error type every endpoint answers with, dtype tables of the
two protocols, name validation and the structured (JSON lines) logger."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

import numpy as np


class ServingError(Exception):
    """A request the server refuses: `status` is the HTTP status, `message` the JSON error."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# KServe v2 / Triton datatype <-> numpy dtype name.
V2_TO_NUMPY = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
NUMPY_TO_V2 = {v: k for k, v in V2_TO_NUMPY.items()}
NUMPY_TO_V2["object"] = "BYTES"

# TF Serving's DataType enum names, for /v1 metadata.
NUMPY_TO_TF = {
    "bool": "DT_BOOL",
    "uint8": "DT_UINT8",
    "uint16": "DT_UINT16",
    "uint32": "DT_UINT32",
    "uint64": "DT_UINT64",
    "int8": "DT_INT8",
    "int16": "DT_INT16",
    "int32": "DT_INT32",
    "int64": "DT_INT64",
    "float16": "DT_HALF",
    "float32": "DT_FLOAT",
    "float64": "DT_DOUBLE",
    "object": "DT_STRING",
}

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
"""Model names the server accepts: what a directory name may be in the repository, with no
path separators and no leading dot (so no `..`): a name is a dictionary key, never a path."""


def valid_name(name: str) -> bool:
    return bool(NAME_PATTERN.match(name)) and ".." not in name


def check_name(name: str) -> None:
    if not valid_name(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise ServingError(
            400,
            f"model name {shown!r} is not valid: use 1-128 letters, digits, '_', '.', '-' "
            "(not starting with '.' or '-', no '..')",
        )


def parse_version(version: str | None) -> int | None:
    if version is None:
        return None
    if not version.isdigit() or len(version) > 18:
        shown = version if len(version) <= 40 else version[:37] + "..."
        raise ServingError(400, f"version {shown!r} is not valid: expected a positive integer")
    return int(version)


def v1_shape(shape) -> list[int]:
    """A manifest shape with -1 for every free size (what both protocols' metadata use)."""
    return [d if isinstance(d, int) else -1 for d in shape]


LOG_FIELDS: dict = {}
"""Fields added to every log line of this process (a worker of a multi-worker server: its
`worker` index and `pid`); empty in a single-process server."""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, `LOG_FIELDS` and the record's
    `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        data.update(LOG_FIELDS)
        data.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


logger = logging.getLogger("serving")


def log(level: int, event: str, **fields) -> None:
    logger.log(level, event, extra={"fields": fields})


def setup_logging(level: str = "info", stream=None) -> None:
    """JSON lines on stderr for the `serving` logger (uvicorn's own loggers too)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("serving", "uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(level.upper())
        lg.propagate = False


def dtype_of(spec_dtype: str) -> np.dtype:
    return np.dtype("float32" if spec_dtype == "bfloat16" else spec_dtype)

"""manifest.json: what each exported artifact is, how it was made and how well it matches Keras."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from dlmodels.errors import UserError
from dlmodels.export._atomic import atomic_write_text
from dlmodels.runtime.manifest import MANIFEST_VERSION, ONNX_FORMATS

_TOOLS = (
    "tensorflow",
    "keras",
    "tf2onnx",
    "onnx",
    "onnxruntime",
    "numpy",
    "dlmodels",
    "onnxslim",
    "ai-edge-litert",
)

LITERT_FORMATS = ("litert", "litert_fp16", "litert_int8")
"""Artifact formats that are LiteRT flatbuffers (`.tflite`, run with ai-edge-litert)."""


def tool_versions() -> dict[str, str | None]:
    """Versions of every tool in the export path (None when not installed) and Python."""
    versions: dict[str, str | None] = {}
    for name in _TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            # tensorflow-cpu and friends install under another distribution name.
            try:
                versions[name] = metadata.version(f"{name}-cpu")
            except metadata.PackageNotFoundError:
                versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def artifact_size(path: str | os.PathLike) -> int:
    """Bytes on disk of an artifact: a file's size, or the sum over a directory (SavedModel)."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of an artifact: of the file's bytes, or for a directory (SavedModel) of the
    lines `<relative posix path> <file sha256>` of every file in it, sorted by path (so the
    digest changes when any file is renamed, added, removed or altered)."""
    path = Path(path)
    if not path.is_dir():
        return _file_sha256(path)
    lines = sorted(
        f"{p.relative_to(path).as_posix()} {_file_sha256(p)}\n"
        for p in path.rglob("*")
        if p.is_file()
    )
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def _keras_io(model) -> dict:
    from dlmodels.export._signature import as_functional

    model = as_functional(model)

    def spec(t, name):
        return {"name": name, "shape": list(t.shape), "dtype": str(t.dtype)}

    return {
        "inputs": [spec(t, t.name) for t in model.inputs],
        "outputs": [spec(t, n) for t, n in zip(model.outputs, model.output_names, strict=True)],
    }


def _saved_model_io(path: Path) -> dict:
    import tensorflow as tf

    fn = tf.saved_model.load(str(path)).signatures["serving_default"]
    _, kwargs = fn.structured_input_signature

    def spec(name, s):
        return {"name": name, "shape": s.shape.as_list(), "dtype": s.dtype.name}

    return {
        "signature": "serving_default",
        "inputs": [spec(k, s) for k, s in sorted(kwargs.items())],
        "outputs": [spec(k, s) for k, s in sorted(fn.structured_outputs.items())],
    }


def describe_io(path: str | os.PathLike, fmt: str, model=None) -> dict:
    """Input/output names, shapes and dtypes read from the artifact itself (ONNX graph,
    SavedModel signature); for `.keras` files, from `model` when given."""
    path = Path(path)
    if fmt in ONNX_FORMATS or path.suffix == ".onnx":
        from dlmodels.export.onnx import onnx_io

        return onnx_io(path)
    if fmt == "saved_model":
        return _saved_model_io(path)
    if fmt in LITERT_FORMATS or path.suffix == ".tflite":
        from dlmodels.export.litert import litert_io

        return litert_io(path)
    if model is not None:
        return _keras_io(model)
    return {}


def _json_safe(obj):
    """Round-trip through JSON, turning anything exotic (numpy scalars, dtypes) into text."""
    return json.loads(json.dumps(obj, default=_default))


def _default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def model_source(model) -> dict:
    """The source model's name, class, parameter count and JSON-safe config."""
    if model is None:
        return {}
    try:
        config = _json_safe(model.get_config())
    except Exception as err:  # a model without a serializable config still gets a manifest
        config = {"unavailable": f"{type(err).__name__}: {err}"}
    return {
        "name": getattr(model, "name", None),
        "class": type(model).__name__,
        "params": int(model.count_params()) if hasattr(model, "count_params") else None,
        "config": config,
    }


@dataclasses.dataclass
class ArtifactEntry:
    """One exported artifact in manifest.json.

    Attributes:
        format: "keras", "saved_model", "onnx", "int8", "fp16", ...
        path: file or directory; stored relative to the manifest's directory.
        max_abs_error: parity error against Keras (None when not measured).
        metric_before: task metric of the Keras model (e.g. mIoU) on the evaluation data.
        metric_after: the same metric computed on this artifact's outputs.
        metric_name: what the metric is ("miou", "accuracy", ...).
        extra: anything else worth keeping (agreement, latency, passed, ...).
        parity: further parity facts merged into the entry's "parity" object
            (mean_abs_error_vs_keras, argmax_agreement, n_samples, atol, passed, method, ...).
        output_kinds: output name -> "logits" | "softmax" | "sigmoid" | "unknown"; written as
            `output_kind` on each output spec. None: read from `model` (`output_kind`).
        task: "segmentation", "classification" or None (parity only); None: read from `model`.
        num_classes: class count when the task has classes; None: read from `model`.
        quantization: quantization settings (`QuantizeReport.settings()`) for quantized files.
        simplification: for a simplified ONNX file, `SimplifyReport.settings()` (tool, node
            counts before/after, parity of the simplified graph).
    """

    format: str
    path: str | os.PathLike
    max_abs_error: float | None = None
    metric_before: float | None = None
    metric_after: float | None = None
    metric_name: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    parity: dict[str, Any] = dataclasses.field(default_factory=dict)
    output_kinds: dict[str, str] | None = None
    task: str | None = None
    num_classes: int | None = None
    quantization: dict[str, Any] | None = None
    simplification: dict[str, Any] | None = None


def model_output_kinds(model) -> dict[str, str]:
    """{output name: "logits" | "softmax" | "sigmoid" | "unknown"} for a functional model."""
    if model is None or not getattr(model, "outputs", None):
        return {}
    from dlmodels.export._signature import as_functional
    from dlmodels.models.outputs import output_kind

    model = as_functional(model)
    kinds = output_kind(model)
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    return dict(zip(model.output_names, kinds, strict=False))


def model_task(model) -> tuple[str | None, int | None]:
    """(task, num_classes) read off a model's first output.

    Rank 4 (batch, H, W, C) with C > 1 is "segmentation" with C classes, rank 2 (batch, C) is
    "classification" with C classes (C == 1: one sigmoid/logit score, two classes); anything
    else is (None, None): artifacts are then checked for parity only.
    """
    outputs = getattr(model, "outputs", None)
    if not outputs:
        return None, None
    shape = tuple(outputs[0].shape)
    channels = shape[-1] if shape else None
    if len(shape) == 4 and channels is not None and channels > 1:
        return "segmentation", int(channels)
    if len(shape) == 2 and channels is not None:
        return "classification", int(channels) if channels > 1 else 2
    return None, None


_ROW_KEYS = {"format", "path", "max_abs_error", "size_bytes"}


def _entry_from_row(row: dict, baseline_metric, metric_name) -> ArtifactEntry:
    """Accept the row dicts `dlmodels.demo` builds (artifact, format, path, miou, ...)."""
    metric = row.get("metric", row.get(metric_name)) if metric_name else row.get("metric")
    extra = {k: v for k, v in row.items() if k not in _ROW_KEYS | {"metric", metric_name}}
    return ArtifactEntry(
        format=row["format"],
        path=row["path"],
        max_abs_error=row.get("max_abs_error"),
        metric_before=baseline_metric,
        metric_after=metric,
        metric_name=metric_name,
        extra=extra,
    )


def build_manifest(path: Path, entries: list[ArtifactEntry], model=None) -> dict:
    """The manifest dict (see `write_manifest`)."""
    root = path.parent.resolve()
    artifacts = []
    default_kinds = model_output_kinds(model)
    default_task, default_classes = model_task(model)
    for e in entries:
        p = Path(e.path)
        if not p.exists():
            raise FileNotFoundError(f"manifest entry {e.format!r}: {p} does not exist")
        if not p.resolve().is_relative_to(root):
            raise UserError(
                f"manifest entry {e.format!r}: {p} is outside {root}, the manifest's directory; "
                "readers refuse artifacts outside it: write the manifest next to its artifacts"
            )
        io = describe_io(p, e.format, model)
        kinds = e.output_kinds if e.output_kinds is not None else default_kinds
        for spec in io.get("outputs", []):
            spec["output_kind"] = kinds.get(spec["name"], "unknown")
        artifacts.append(
            {
                "format": e.format,
                "path": os.path.relpath(p.resolve(), root),
                "size_bytes": artifact_size(p),
                "sha256": artifact_sha256(p),
                **io,
                "task": e.task if e.task is not None else default_task,
                "num_classes": e.num_classes if e.num_classes is not None else default_classes,
                "parity": {"max_abs_error_vs_keras": e.max_abs_error, **e.parity},
                "metric": {
                    "name": e.metric_name,
                    "keras": e.metric_before,
                    "artifact": e.metric_after,
                },
                **({"quantization": e.quantization} if e.quantization is not None else {}),
                **({"simplification": e.simplification} if e.simplification is not None else {}),
                **({"extra": e.extra} if e.extra else {}),
            }
        )
    return _json_safe(
        {
            "manifest_version": MANIFEST_VERSION,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "source_model": model_source(model),
            "tools": tool_versions(),
            "artifacts": artifacts,
        }
    )


def write_manifest(
    path: str | os.PathLike,
    entries=None,
    *,
    model=None,
    artifacts=None,
    metric_name: str | None = "miou",
    overwrite: bool = True,
) -> Path:
    """Write manifest.json describing exported artifacts, atomically.

    Per artifact: format, path relative to the manifest, size in bytes, SHA-256
    (`artifact_sha256`), input/output names,
    shapes and dtypes read from the artifact (each output also carries `output_kind`: "logits",
    "softmax", "sigmoid" or "unknown", so a client knows whether it receives probabilities),
    `task` and `num_classes` (None when unknown), parity vs Keras, the task metric before
    (Keras) and after (artifact), for quantized files the `quantization` settings, and for
    simplified ONNX files the `simplification` (tool, node counts before/after). Once per
    manifest: the source model (name, class, params, config), tool versions (tensorflow, keras,
    tf2onnx, onnx, onnxruntime, numpy, dlmodels, onnxslim, ai-edge-litert (None when not
    installed), python) and a UTC timestamp.

    Args:
        path: the manifest file (conventionally `<artifact dir>/manifest.json`).
        entries: ArtifactEntry records (or dicts with ArtifactEntry's fields).
        model: the source Keras model (for its config and for `.keras` I/O specs).
        artifacts: alternatively, result rows as built by `dlmodels.demo`
            ({"artifact", "format", "path", "max_abs_error", "miou", ...}); the row with
            format "keras" supplies the baseline metric.
        metric_name: key of the metric in `artifacts` rows.
        overwrite: replace an existing manifest (default True: it describes the current files).

    Returns:
        The manifest path.
    """
    path = Path(path)
    all_entries: list[ArtifactEntry] = []
    for e in entries or []:
        all_entries.append(e if isinstance(e, ArtifactEntry) else ArtifactEntry(**e))
    if artifacts:
        baseline = next((r.get(metric_name) for r in artifacts if r.get("format") == "keras"), None)
        all_entries.extend(_entry_from_row(r, baseline, metric_name) for r in artifacts)
    manifest = build_manifest(path, all_entries, model)
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n", overwrite=overwrite)
    return path

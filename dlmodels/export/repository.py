"""One export pipeline for any functional Keras model: write, verify, describe.

`write_repository` writes each requested artifact (.keras, SavedModel, ONNX, static int8 ONNX,
fp16 ONNX, LiteRT fp32 / fp16 / int8) atomically into one directory, checks every one of them
against the Keras model on the caller's samples by running the artifact itself (the `.keras`
file is reloaded, the SavedModel loaded, ONNX files run in a fresh onnxruntime process, LiteRT
files in a fresh ai-edge-litert process), computes the caller's metric on Keras and on each
artifact, optionally times them side by side, and writes one manifest.json. The demo, the CLI
and notebooks all go through it; it imports no data set: samples, labels, calibration data and
the metric come from the caller.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dlmodels._progress import track
from dlmodels.errors import UserError
from dlmodels.export._atomic import check_target
from dlmodels.export.manifest import (
    ArtifactEntry,
    artifact_size,
    model_output_kinds,
    model_task,
    write_manifest,
)
from dlmodels.export.onnx import DEFAULT_OPSET, check_opset
from dlmodels.runtime.manifest import MANIFEST_FILENAME

FORMATS = (
    "keras",
    "saved_model",
    "onnx",
    "int8",
    "fp16",
    "litert",
    "litert_fp16",
    "litert_int8",
)
"""Formats `write_repository` can write, in the order it writes them."""

DEFAULT_FORMATS = ("keras", "saved_model", "onnx", "int8")
"""What `write_repository` writes unless told otherwise (fp16 and LiteRT only on request)."""

LITERT_PRECISIONS = {"litert": "fp32", "litert_fp16": "fp16", "litert_int8": "int8"}
"""LiteRT format -> `to_litert` precision (opt-in formats; they need ai-edge-litert)."""

ARTIFACT_PATHS = {
    "keras": "model.keras",
    "saved_model": "saved_model/1",
    "onnx": "model.onnx",
    "int8": "model.int8.onnx",
    "fp16": "model.fp16.onnx",
    "litert": "model.tflite",
    "litert_fp16": "model.fp16.tflite",
    "litert_int8": "model.int8.tflite",
}
"""Where each format goes, relative to the output directory (SavedModel in a TF Serving
version directory)."""

ARTIFACT_NAMES = {
    "keras": ".keras file",
    "saved_model": "SavedModel",
    "onnx": "ONNX fp32",
    "int8": "ONNX int8",
    "fp16": "ONNX fp16",
    "litert": "LiteRT fp32",
    "litert_fp16": "LiteRT fp16",
    "litert_int8": "LiteRT int8",
}
"""Display names used in tables and in the manifest's `extra.artifact`."""

BASELINE = "keras (TF)"
"""Display name of the in-memory Keras model every artifact is compared with."""


_METHODS = {
    "keras": "reloaded with keras.saving.load_model(safe_mode=True)",
    "saved_model": "tf.saved_model.load, signature serving_default",
    "onnx": "onnxruntime CPU in a fresh process",
    "int8": "onnxruntime CPU in a fresh process",
    "fp16": "onnxruntime CPU in a fresh process",
    "litert": "ai_edge_litert Interpreter (serving_default) in a fresh process",
    "litert_fp16": "ai_edge_litert Interpreter (serving_default) in a fresh process",
    "litert_int8": "ai_edge_litert Interpreter (serving_default) in a fresh process",
}


@dataclasses.dataclass
class ArtifactResult:
    """One written and verified artifact.

    Attributes:
        format: one of FORMATS ("keras", "saved_model", "onnx", "int8", "fp16", "litert", ...).
        artifact: display name (ARTIFACT_NAMES: ".keras file", "ONNX int8", "LiteRT fp16", ...).
        path: the file or directory written.
        size_bytes: bytes on disk.
        max_abs_error / mean_abs_error: |artifact - keras| over every output element.
        agreement: argmax agreement with Keras over outputs with more than one channel.
        metric: the caller's metric on this artifact's outputs (None without metric/labels).
        passed: whether the artifact met its bar (see `judged_by`).
        judged_by: the bar, in words.
        method: how the artifact was run.
        n_samples: samples compared.
        quantization: settings of a quantized file (`QuantizeReport.settings()`; for LiteRT
            int8 the converter settings and calibration sample count).
        simplification: for a simplified ONNX file, `SimplifyReport.settings()`.
        p50_ms / speedup_vs_keras: batch-1 latency and Keras p50 / this p50, when benchmarked.
    """

    format: str
    artifact: str
    path: Path
    size_bytes: int
    max_abs_error: float
    mean_abs_error: float
    agreement: float | None
    metric: float | None
    passed: bool
    judged_by: str
    method: str
    n_samples: int
    quantization: dict[str, Any] | None = None
    simplification: dict[str, Any] | None = None
    p50_ms: float | None = None
    speedup_vs_keras: float | None = None


@dataclasses.dataclass
class RepositoryReport:
    """What `write_repository` wrote and measured.

    Attributes:
        output_dir: the directory holding every artifact and the manifest.
        manifest_path: manifest.json.
        artifacts: one ArtifactResult per written format, in FORMATS order.
        task / num_classes: as recorded in the manifest (None when unknown).
        output_kinds: output name -> "logits" | "softmax" | "sigmoid" | "unknown".
        metric_name: name of the caller's metric (None without one).
        keras_metric: the metric on the in-memory Keras model's outputs.
        n_samples: verification samples.
        keras_p50_ms: batch-1 latency of the in-memory Keras model, when benchmarked.
    """

    output_dir: Path
    manifest_path: Path
    artifacts: list[ArtifactResult]
    task: str | None
    num_classes: int | None
    output_kinds: dict[str, str]
    metric_name: str | None
    keras_metric: float | None
    n_samples: int
    keras_p50_ms: float | None = None

    @property
    def passed(self) -> bool:
        """Every artifact met its bar."""
        return all(a.passed for a in self.artifacts)

    def __getitem__(self, fmt: str) -> ArtifactResult:
        for a in self.artifacts:
            if a.format == fmt:
                return a
        raise KeyError(f"no {fmt!r} artifact in this report; formats: {self.formats}")

    @property
    def formats(self) -> list[str]:
        return [a.format for a in self.artifacts]

    def failures(self) -> list[str]:
        """One line per artifact that missed its bar."""
        return [
            f"{a.artifact} ({a.path}): max |err| {a.max_abs_error:.3e}, "
            f"agreement {a.agreement}, metric {a.metric}; bar: {a.judged_by}"
            for a in self.artifacts
            if not a.passed
        ]

    def rows(self) -> list[dict]:
        """Table rows: the in-memory Keras baseline first, then one per artifact.

        Keys: artifact, format, path, size_bytes, max_abs_error, mean_abs_error, agreement,
        metric (plus the metric under its own name, e.g. "miou"), passed, p50_ms,
        speedup_vs_keras. The baseline row has format None and no error (it is the reference).
        """
        key = self.metric_name
        base = {
            "artifact": BASELINE,
            "format": None,
            "path": None,
            "size_bytes": None,
            "max_abs_error": None,
            "metric": self.keras_metric,
        }
        if key:
            base[key] = self.keras_metric
        if self.keras_p50_ms is not None:
            base["p50_ms"] = self.keras_p50_ms
        rows = [base]
        for a in self.artifacts:
            row = {
                "artifact": a.artifact,
                "format": a.format,
                "path": str(a.path),
                "size_bytes": a.size_bytes,
                "max_abs_error": a.max_abs_error,
                "mean_abs_error": a.mean_abs_error,
                "agreement": a.agreement,
                "metric": a.metric,
                "passed": a.passed,
            }
            if key:
                row[key] = a.metric
            if a.p50_ms is not None:
                row["p50_ms"] = a.p50_ms
                row["speedup_vs_keras"] = a.speedup_vs_keras
            rows.append(row)
        return rows


# -- samples ---------------------------------------------------------------------------------


def sample_dict(model, samples) -> dict[str, np.ndarray]:
    """Match `samples` to the model's inputs: {input name: array} in `model.inputs` order.

    Args:
        model: a functional Keras model.
        samples: one array (single-input models), a list/tuple in `model.inputs` order, or a
            dict keyed by input name. Every array has a batch axis and the same batch size.

    Returns:
        Arrays cast to each input's dtype (float64 -> float32, ints to the input's int type).

    Raises:
        ValueError: naming the input, the shape/dtype found and what the model expects.
    """
    from dlmodels.export._signature import input_names

    names = input_names(model)
    if isinstance(samples, Mapping):
        missing = [n for n in names if n not in samples]
        unknown = sorted(set(samples) - set(names))
        if missing or unknown:
            raise UserError(
                f"samples has keys {sorted(samples)}; the model's inputs are {names} "
                f"(missing {missing}, unknown {unknown}). Key the arrays by input name."
            )
        arrays = [samples[n] for n in names]
    elif isinstance(samples, list | tuple):
        if len(samples) != len(names):
            raise UserError(
                f"samples has {len(samples)} arrays; the model has {len(names)} inputs {names}. "
                "Give one array per input, in model.inputs order, or a dict by input name."
            )
        arrays = list(samples)
    else:
        if len(names) != 1:
            raise UserError(
                f"samples is one array but the model has inputs {names}; pass a list in that "
                "order or a dict keyed by input name."
            )
        arrays = [samples]
    out: dict[str, np.ndarray] = {}
    for name, tensor, a in zip(names, model.inputs, arrays, strict=True):
        a = np.asarray(a)
        want = tuple(tensor.shape)
        if a.ndim != len(want):
            hint = " (add the batch axis)" if a.ndim == len(want) - 1 else ""
            raise UserError(
                f"samples for input {name!r} have shape {a.shape}; the model expects rank "
                f"{len(want)} {_shape_text(want)}{hint}."
            )
        bad = [i for i, d in enumerate(want) if i > 0 and d is not None and a.shape[i] != d]
        if bad:
            raise UserError(
                f"samples for input {name!r} have shape {a.shape}; the model expects "
                f"{_shape_text(want)}. Resize or reshape the data to the model's input size."
            )
        dtype = np.dtype(str(tensor.dtype))
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise UserError(
                f"samples for input {name!r} have dtype {a.dtype}; the model expects {dtype}."
            )
        out[name] = np.ascontiguousarray(a, dtype=dtype)
    sizes = {len(a) for a in out.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise UserError(
            f"samples must have the same, non-zero batch size for every input; got "
            f"{ {k: len(v) for k, v in out.items()} }."
        )
    return out


def _shape_text(shape) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"


def _pack(model, outputs: Mapping[str, np.ndarray]):
    values = [outputs[k] for k in model.output_names]
    return values[0] if len(values) == 1 else values


# -- running each artifact -----------------------------------------------------------------


def _reload_keras(path: Path):
    import dlmodels

    # dlmodels.load_model registers every dlmodels serializable (layers, losses, metrics) and
    # looks keras.saving.load_model up at call time, so a test can replace the loader.
    return dlmodels.load_model(str(path), safe_mode=True)


def _saved_model_outputs(path: Path, samples: dict[str, np.ndarray], batch_size: int) -> dict:
    import tensorflow as tf

    fn = tf.saved_model.load(str(path)).signatures["serving_default"]
    n = len(next(iter(samples.values())))
    chunks: dict[str, list[np.ndarray]] = {}
    for i in range(0, n, batch_size):
        out = fn(**{k: tf.constant(v[i : i + batch_size]) for k, v in samples.items()})
        for k, v in out.items():
            chunks.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in chunks.items()}


def _saved_model_predictor(path: Path) -> Callable:
    import tensorflow as tf

    fn = tf.saved_model.load(str(path)).signatures["serving_default"]

    def predict(x: Mapping[str, np.ndarray]):
        return [v.numpy() for v in fn(**{k: tf.constant(v) for k, v in x.items()}).values()]

    return predict


def _check_formats(formats) -> list[str]:
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    wanted = list(dict.fromkeys(formats))
    unknown = [f for f in wanted if f not in FORMATS]
    if unknown or not wanted:
        raise UserError(
            f"formats={list(formats)!r}: unknown {unknown or 'none given'}; choose one or more of "
            f"{list(FORMATS)} (e.g. formats=('onnx', 'int8'))."
        )
    return [f for f in FORMATS if f in wanted]


def write_repository(
    model,
    output_dir: str | os.PathLike,
    *,
    samples,
    formats: Sequence[str] | str = DEFAULT_FORMATS,
    labels=None,
    metric: Callable | None = None,
    metric_name: str | None = None,
    calibration=None,
    opset: int = DEFAULT_OPSET,
    simplify: bool = False,
    atol: float = 1e-4,
    fp16_atol: float = 1e-2,
    int8_max_metric_drop: float = 0.01,
    int8_min_agreement: float = 0.9,
    per_channel: bool = True,
    reduce_range: bool | None = None,
    max_calibration_samples: int | None = 256,
    int8_held_out=None,
    int8_selection_metric=None,
    int8_selection_greater_is_better: bool = False,
    int8_candidates=None,
    task: str | None = None,
    num_classes: int | None = None,
    benchmark: bool = False,
    bench_iters: int = 30,
    bench_warmup: int = 5,
    batch_size: int = 32,
    overwrite: bool = False,
) -> RepositoryReport:
    """Write every requested artifact of `model`, verify each against Keras, write manifest.json.

    Works for any functional Keras model: one or several inputs (float or integer), one or
    several outputs. Each artifact is written atomically and then run on `samples`:
    the `.keras` file is reloaded (`keras.saving.load_model(safe_mode=True)`), the SavedModel
    loaded and called through `serving_default`, ONNX files run in a fresh onnxruntime process
    (`verify`), LiteRT files in a fresh ai-edge-litert process (`verify_litert`). fp32
    artifacts pass when max |artifact - keras| <= `atol`, fp16 ones (ONNX and LiteRT) when it is
    <= `fp16_atol`; int8 files (ONNX and LiteRT) pass when their argmax agreement with Keras is
    >= `int8_min_agreement` (outputs with more than one channel) and the metric drops by at most
    `int8_max_metric_drop` (when a metric is given). When "int8" or "fp16" is asked for without
    "onnx", the fp32 ONNX file is made in a temp directory; the LiteRT formats are converted from
    one SavedModel of the model's float32 clone, written to a temp directory.

    All arguments and targets are checked before any work (formats, samples, opset, the
    optional packages the formats need): with `overwrite=False` an existing artifact or
    manifest raises FileExistsError and nothing is written. With `overwrite=True` an existing
    manifest.json is removed before the first artifact is replaced, so the directory never holds
    a manifest that does not describe its files. If an export fails half-way, the artifacts
    already written stay (each is complete) and no manifest is written.

    Args:
        model: a functional Keras model (for subclassed models export functional sub-models).
        output_dir: directory for the artifacts (ARTIFACT_PATHS: `model.keras`,
            `saved_model/1`, `model.onnx`, `model.int8.onnx`, `model.fp16.onnx`, `model.tflite`,
            `model.fp16.tflite`, `model.int8.tflite`) and `manifest.json`.
        samples: verification inputs: one array, a list in `model.inputs` order, or a dict by
            input name, each with a batch axis.
        formats: subset of FORMATS (a sequence, or a comma-separated string); default
            DEFAULT_FORMATS. On request: "fp16" (`dlmodels.export.fp16`) and "litert",
            "litert_fp16", "litert_int8" (`dlmodels.export.litert`, needs ai-edge-litert).
        labels: ground truth for `metric`, in whatever form `metric` takes.
        metric: `metric(labels, outputs) -> float`, outputs being the single output array (or a
            list in `model.output_names` order); computed on Keras and on every artifact.
        metric_name: what the metric is called in the manifest ("miou", "accuracy").
        calibration: int8 calibration data for ONNX int8 and LiteRT int8 (see
            `quantize_with_report`); default: `samples`. Read once, up to
            `max_calibration_samples`, before anything is written, and the same batches feed
            both int8 formats (so a one-shot generator serves ONNX and LiteRT int8 alike).
            Calibrating on the verification samples flatters int8; pass separate data.
        opset: ONNX opset, 13..18 (`check_opset`).
        simplify: simplify the ONNX graph with onnxslim before it is verified (and before int8 /
            fp16 are made from it); kept only when it passes the checker, shape inference and
            parity with Keras on `samples` (`simplify_onnx`), else SimplificationError with the
            unsimplified file kept. Node counts before/after go to the manifest.
        atol: parity bar of the fp32 artifacts.
        fp16_atol: parity bar of the fp16 files (`dlmodels.export.fp16.FP16_ATOL`,
            `dlmodels.export.litert.TOLERANCES["fp16"]`).
        int8_max_metric_drop: largest tolerated `keras metric - int8 metric` (ONNX and LiteRT).
        int8_min_agreement: smallest tolerated argmax agreement of the int8 files.
        per_channel / reduce_range / max_calibration_samples: static int8 settings
            (reduce_range None: chosen from this CPU, see `default_reduce_range`);
            max_calibration_samples also caps the LiteRT representative dataset.
        int8_held_out: inputs (not the calibration data) on which the int8 settings are chosen:
            with it, `select_quantization` tries `int8_candidates` (None: its default grid of
            calibration methods, per-channel on/off, first/last conv in float) and keeps the best
            by `int8_selection_metric(outputs, fp32_outputs)` (None: mean abs error against the
            fp32 ONNX model; `int8_selection_greater_is_better` for accuracy-like metrics); the
            manifest's `quantization.selection` records every candidate's score and the choice.
            Needs "int8" in `formats`; the candidates and the metric are checked before any
            file is written.
        task / num_classes: recorded in the manifest; None: read from the model's first output
            (rank 4 with C > 1: segmentation, rank 2: classification).
        benchmark: time batch-1 latency of Keras and each artifact side by side (off by
            default: it takes seconds and measures the machine, not the export).
        bench_iters / bench_warmup: timed and untimed calls per predictor.
        batch_size: prediction batch size for Keras and the SavedModel.
        overwrite: replace existing artifacts and manifest (the old manifest is removed first).

    Returns:
        A RepositoryReport (one ArtifactResult per artifact, the manifest path).

    Raises:
        ValueError: unknown formats, samples that do not match the model's inputs, a metric
            without labels, an opset outside 13..18, ai-edge-litert (LiteRT formats) or
            onnxslim (simplify) not installed, invalid int8 selection arguments, empty
            calibration data (all before any file is written).
        FileExistsError: a target exists and `overwrite` is False.
        SimplificationError: the simplified ONNX graph failed a check.
        LiteRTConversionError: the TFLite converter cannot lower an op (names op and layer).
    """
    from dlmodels import export
    from dlmodels.export._signature import as_functional

    model = as_functional(model)  # a Sequential is exported (and saved) as the functional view
    wanted = _check_formats(formats)
    feeds = sample_dict(model, samples)
    if metric is not None and labels is None:
        raise UserError(
            "metric was given without labels; pass labels=... (ground truth for the samples) "
            "or leave metric=None to check parity only."
        )
    if int8_min_agreement is not None and not 0.0 <= int8_min_agreement <= 1.0:
        raise UserError(f"int8_min_agreement must be in [0, 1], got {int8_min_agreement}")
    opset = check_opset(opset)
    if any(f in LITERT_PRECISIONS for f in wanted):
        from dlmodels.export.litert import _interpreter_module

        _interpreter_module()  # names the extra before anything is written
    if simplify and any(f in ("onnx", "int8", "fp16") for f in wanted):
        from dlmodels.export.onnx import _onnxslim

        _onnxslim()
    if metric is None:
        metric_name = None
    elif metric_name is None:
        metric_name = getattr(metric, "__name__", "metric")
    _check_int8_selection(wanted, int8_held_out, int8_selection_metric, int8_candidates)
    if calibration is not None and any(f in ("int8", "litert_int8") for f in wanted):
        # Read once: a one-shot generator would be drained by the first int8 format and empty
        # for the next; both get the same batches.
        calibration = _materialize_calibration(model, calibration, max_calibration_samples)
    output_dir = Path(output_dir)
    targets = {f: output_dir / ARTIFACT_PATHS[f] for f in wanted}
    manifest_path = output_dir / MANIFEST_FILENAME
    for target in [*targets.values(), manifest_path]:
        check_target(target, overwrite=overwrite)
    found_task, found_classes = model_task(model)
    task = task if task is not None else found_task
    num_classes = num_classes if num_classes is not None else found_classes
    kinds = model_output_kinds(model)
    n = len(next(iter(feeds.values())))

    expected = export.keras_outputs(model, feeds, batch_size=batch_size)
    if overwrite:
        # The old manifest describes the files about to be replaced: drop it before the first
        # one is touched. A failure from here on leaves complete artifacts and no manifest.
        _remove_manifest(manifest_path)

    def score(outputs) -> float | None:
        from dlmodels.export.verify import metric_value

        return None if metric is None else metric_value(metric, labels, _pack(model, outputs))

    keras_metric = score(expected)
    results: list[ArtifactResult] = []
    verify_kw = {"labels": labels, "metric": metric, "expected": expected}

    def result(fmt, path, *, max_err, mean_err, agreement, metric_value, passed, judged_by, **kw):
        return ArtifactResult(
            format=fmt,
            artifact=ARTIFACT_NAMES[fmt],
            path=Path(path),
            size_bytes=artifact_size(path),
            max_abs_error=max_err,
            mean_abs_error=mean_err,
            agreement=agreement,
            metric=metric_value,
            passed=bool(passed),
            judged_by=judged_by,
            method=_METHODS[fmt],
            n_samples=n,
            **kw,
        )

    def verified_result(
        fmt, path, report, *, metric_value, passed, judged_by, **kw
    ) -> ArtifactResult:
        """An ArtifactResult from a parity report (`export.verify` for ONNX fp32, int8 and fp16,
        `verify_litert` for LiteRT): its errors and agreement, the caller's metric value and
        verdict."""
        return result(
            fmt,
            path,
            max_err=report.max_abs_error,
            mean_err=report.mean_abs_error,
            agreement=report.agreement,
            metric_value=metric_value,
            passed=passed,
            judged_by=judged_by,
            **kw,
        )

    def fp32_result(fmt, path, got) -> ArtifactResult:
        max_err, mean_err, agreement, finite = export.compare_outputs(
            expected, got, where=f"{ARTIFACT_NAMES[fmt]} {path}"
        )
        return result(
            fmt,
            path,
            max_err=max_err,
            mean_err=mean_err,
            agreement=agreement,
            metric_value=score(got),
            passed=finite and max_err <= atol,
            judged_by=f"max abs error <= {atol:g}",
        )

    def int8_bars(finite_ok: bool, agreement, int8_metric) -> tuple[bool, str]:
        from dlmodels.export.verify import int8_verdict

        return int8_verdict(
            finite_ok,
            agreement=agreement,
            min_agreement=int8_min_agreement,
            metric_before=keras_metric,
            metric_after=int8_metric,
            max_metric_drop=int8_max_metric_drop,
            metric_name=metric_name,
        )

    with tempfile.TemporaryDirectory(prefix="dlmodels-repo-") as scratch:
        made: dict[str, Any] = {}

        def onnx_file() -> Path:
            """The fp32 ONNX file (the target, or a scratch file for int8 / fp16 alone),
            converted and optionally simplified once."""
            if "onnx" not in made:
                path = targets.get("onnx", Path(scratch) / "model.onnx")
                export.to_onnx(model, path, opset=opset, overwrite=overwrite)
                made["simplification"] = None
                if simplify:
                    from dlmodels.export.onnx import simplify_onnx

                    report = simplify_onnx(model, path, samples=feeds, atol=atol)
                    made["simplification"] = report.settings()
                made["onnx"] = Path(path)
            return made["onnx"]

        def litert_saved_model() -> Path:
            """One SavedModel of the float32 clone every LiteRT precision converts from."""
            if "litert_sm" not in made:
                from dlmodels.export._signature import float32_copy

                made["litert_sm"] = export.to_saved_model(
                    float32_copy(model), Path(scratch) / "litert_saved_model"
                )
            return made["litert_sm"]

        for fmt in track(wanted, "exporting"):
            if fmt == "keras":
                path = export.to_keras(model, targets["keras"], overwrite=overwrite)
                loaded = _reload_keras(path)
                got = export.keras_outputs(loaded, feeds, batch_size=batch_size)
                results.append(fp32_result("keras", path, got))
            elif fmt == "saved_model":
                path = export.to_saved_model(model, targets["saved_model"], overwrite=overwrite)
                got = _saved_model_outputs(path, feeds, batch_size)
                results.append(fp32_result("saved_model", path, got))
            elif fmt == "onnx":
                path = onnx_file()
                report = export.verify(model, path, feeds, atol=atol, **verify_kw)
                results.append(
                    verified_result(
                        "onnx",
                        path,
                        report,
                        metric_value=report.metric_onnx,
                        passed=report.passed,
                        judged_by=f"max abs error <= {atol:g}",
                        simplification=made["simplification"],
                    )
                )
            elif fmt == "int8":
                q_kw = {
                    "calibration": feeds if calibration is None else calibration,
                    "reduce_range": reduce_range,
                    "max_calibration_samples": max_calibration_samples,
                    "overwrite": overwrite,
                }
                if int8_held_out is not None:
                    q = export.select_quantization(
                        onnx_file(),
                        targets["int8"],
                        held_out=int8_held_out,
                        metric=int8_selection_metric,
                        greater_is_better=int8_selection_greater_is_better,
                        candidates=int8_candidates,
                        **q_kw,
                    )
                else:
                    q = export.quantize_with_report(
                        onnx_file(), targets["int8"], mode="static", per_channel=per_channel, **q_kw
                    )
                report = export.verify(model, q.path, feeds, atol=np.inf, **verify_kw)
                # With atol=inf, report.passed means: every output finite.
                ok, judged = int8_bars(report.passed, report.agreement, report.metric_onnx)
                results.append(
                    verified_result(
                        "int8",
                        q.path,
                        report,
                        metric_value=report.metric_onnx,
                        passed=ok,
                        judged_by=judged,
                        quantization=q.settings(),
                    )
                )
            elif fmt == "fp16":
                from dlmodels.export.fp16 import to_fp16

                path = to_fp16(onnx_file(), targets["fp16"], overwrite=overwrite)
                report = export.verify(model, path, feeds, atol=fp16_atol, **verify_kw)
                results.append(
                    verified_result(
                        "fp16",
                        path,
                        report,
                        metric_value=report.metric_onnx,
                        passed=report.passed,
                        judged_by=f"max abs error <= {fp16_atol:g}",
                    )
                )
            else:
                results.append(
                    _litert_result(
                        fmt,
                        model,
                        targets[fmt],
                        feeds,
                        saved_model=litert_saved_model(),
                        calibration=feeds if calibration is None else calibration,
                        max_calibration_samples=max_calibration_samples,
                        overwrite=overwrite,
                        verify_kw=verify_kw,
                        atol=atol,
                        fp16_atol=fp16_atol,
                        int8_bars=int8_bars,
                        verified_result=verified_result,
                    )
                )

        keras_p50 = None
        if benchmark:
            keras_p50 = _benchmark(model, feeds, results, iters=bench_iters, warmup=bench_warmup)

    entries = [
        ArtifactEntry(
            format=r.format,
            path=r.path,
            max_abs_error=r.max_abs_error,
            metric_before=keras_metric,
            metric_after=r.metric,
            metric_name=metric_name,
            parity={
                "mean_abs_error_vs_keras": r.mean_abs_error,
                "argmax_agreement": r.agreement,
                "n_samples": r.n_samples,
                "passed": r.passed,
                "judged_by": r.judged_by,
                "method": r.method,
            },
            output_kinds=kinds,
            task=task,
            num_classes=num_classes,
            quantization=r.quantization,
            simplification=r.simplification,
            extra={
                "artifact": r.artifact,
                **({"p50_ms": r.p50_ms} if r.p50_ms is not None else {}),
                **({"speedup_vs_keras": r.speedup_vs_keras} if r.p50_ms is not None else {}),
                **({"keras_p50_ms": keras_p50} if keras_p50 is not None else {}),
            },
        )
        for r in results
    ]
    write_manifest(manifest_path, entries, model=model, overwrite=overwrite)
    return RepositoryReport(
        output_dir=output_dir,
        manifest_path=manifest_path,
        artifacts=results,
        task=task,
        num_classes=num_classes,
        output_kinds=kinds,
        metric_name=metric_name,
        keras_metric=keras_metric,
        n_samples=n,
        keras_p50_ms=keras_p50,
    )


def _litert_result(
    fmt,
    model,
    target,
    feeds,
    *,
    saved_model,
    calibration,
    max_calibration_samples,
    overwrite,
    verify_kw,
    atol,
    fp16_atol,
    int8_bars,
    verified_result,
) -> ArtifactResult:
    """Convert one LiteRT precision, run it in a fresh ai-edge-litert process, judge it."""
    from dlmodels.export.litert import _representative_dataset, to_litert, verify_litert

    precision = LITERT_PRECISIONS[fmt]
    dataset = None
    if precision == "int8":
        # Read once (a one-shot generator would be empty a second time), counted for the
        # manifest, then handed to the converter as a list of one-sample batches.
        dataset = _representative_dataset(model, calibration, max_calibration_samples)
    path = to_litert(
        model,
        target,
        precision=precision,
        calibration=dataset,
        max_calibration_samples=None,
        saved_model=saved_model,
        overwrite=overwrite,
    )
    bar = {"fp32": atol, "fp16": fp16_atol, "int8": np.inf}[precision]
    report = verify_litert(model, path, feeds, precision=precision, atol=bar, **verify_kw)
    quantization = None
    if precision == "int8":
        # report.passed also holds the default agreement bar; judge with the repository's own.
        finite = bool(np.isfinite(report.max_abs_error))
        ok, judged = int8_bars(finite, report.agreement, report.metric_litert)
        quantization = {
            "tool": "tf.lite.TFLiteConverter",
            "mode": "full integer post-training (TFLITE_BUILTINS_INT8)",
            "weight_type": "int8",
            "activation_type": "int8",
            "io_type": "float32",
            "per_channel": True,
            "calibration_samples": len(dataset),
        }
    else:
        ok, judged = report.passed, f"max abs error <= {bar:g}"
    return verified_result(
        fmt,
        path,
        report,
        metric_value=report.metric_litert,
        passed=ok,
        judged_by=judged,
        quantization=quantization,
    )


def _check_int8_selection(wanted, held_out, selection_metric, candidates) -> None:
    """The int8 selection arguments, checked before any file is written (select_quantization
    would only see them after the .keras / ONNX files are on disk)."""
    from dlmodels.export.quantize import _check_candidates

    if held_out is not None and "int8" not in wanted:
        raise UserError(
            f"int8_held_out was given but formats={wanted} has no 'int8'; add 'int8' to formats "
            "(the held-out data choose the ONNX int8 settings) or drop int8_held_out."
        )
    if candidates is not None:
        _check_candidates(candidates)
    if selection_metric is not None and not callable(selection_metric):
        raise UserError(
            f"int8_selection_metric must be callable(outputs, fp32_outputs), got "
            f"{selection_metric!r}"
        )


def _materialize_calibration(model, calibration, max_samples: int | None) -> list[dict]:
    """Every calibration batch, read once (at most `max_samples` samples), as {input name:
    array} dicts cast to the model's input dtypes: what both the ONNX and the LiteRT int8
    steps read, so a one-shot generator serves both."""
    from dlmodels.export._signature import input_names
    from dlmodels.export.quantize import ArrayCalibrationReader

    if isinstance(calibration, ArrayCalibrationReader):
        reader = calibration
        reader.rewind()
    else:
        reader = ArrayCalibrationReader(
            calibration,
            input_names=input_names(model),
            input_ranks=[len(t.shape) for t in model.inputs],
            input_dtypes=[np.dtype(str(t.dtype)) for t in model.inputs],
            batch_size=8,  # quantize_with_report's calibration batch size
            max_samples=max_samples,
        )
    batches = []
    while (batch := reader.get_next()) is not None:
        batches.append(batch)
    if not batches:
        raise UserError(
            "calibration is empty: the int8 formats need representative inputs (an array, a "
            "dict by input name or an iterable of batches with at least one sample)."
        )
    return batches


def _remove_manifest(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        raise IsADirectoryError(f"{path} is a directory; the manifest goes there: remove it")
    path.unlink(missing_ok=True)


def _benchmark(model, feeds, results, *, iters: int, warmup: int) -> float:
    """Batch-1 latency of Keras and each artifact, interleaved in one run; fills p50_ms."""
    from dlmodels import bench

    x = {k: v[:1] for k, v in feeds.items()}
    predictors: dict[str, Callable] = {BASELINE: bench.keras_predictor(model)}
    for r in results:
        if r.format == "saved_model":
            predictors[r.artifact] = _saved_model_predictor(r.path)
        elif r.format in ("onnx", "int8", "fp16"):
            predictors[r.artifact] = bench.ort_predictor(r.path)
        elif r.format in LITERT_PRECISIONS:
            from dlmodels.export.litert import LiteRTModel

            predictors[r.artifact] = LiteRTModel(r.path)
    timings = bench.compare_predictors(predictors, x, warmup=warmup, iters=iters)
    base = timings[BASELINE]["p50_ms"]
    for r in results:
        t = timings.get(r.artifact)
        if t is not None:
            r.p50_ms = t["p50_ms"]
            r.speedup_vs_keras = base / t["p50_ms"] if t["p50_ms"] > 0 else None
    return base

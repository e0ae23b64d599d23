"""LiteRT (TensorFlow Lite): fp32 / fp16 / int8 flatbuffers, run with ai-edge-litert, verified.

`to_litert` converts the same inference-only float32 clone the SavedModel and ONNX exporters
trace (`float32_copy` + `serving_function`: training=False, mixed-precision policies dropped)
with TensorFlow's `tf.lite.TFLiteConverter`. The converter is fed a SavedModel of that clone
(`from_saved_model`, as Keras 3's own `model.export(format="litert")` does): converting the
`tf.function` directly (`from_concrete_functions`) keeps Keras 3's resource variables as
READ_VARIABLE ops that the interpreter never initializes (NaN outputs under XNNPACK), while the
SavedModel route freezes them into constants. Precisions:

    "fp32"  float32 weights and compute.
    "fp16"  float16 weights (half the bytes), dequantized to float32 at load time; compute stays
            float32 on CPUs (post-training float16 quantization).
    "int8"  full-integer post-training quantization (Jacob et al., "Quantization and Training of
            Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018): int8
            weights (per-channel) and int8 activations with ranges from a representative
            dataset (the caller's calibration batches), every op int8 (TFLITE_BUILTINS_INT8, so a
            conversion that would leave float ops fails instead); inputs and outputs stay
            float32 (a Quantize op after each input, a Dequantize before each output), so the
            file is fed and read like the fp32 one.

Signature: `serving_default` with inputs named after the Keras inputs (`image`) and outputs
keyed by `model.output_names` (`logits`); the batch dimension is dynamic (shape_signature -1),
the interpreter resizes to each call's batch.

Tolerances against Keras (`TOLERANCES`, absolute, outputs of order one; measured max |err| on
the tiny BatchNorm + bilinear-resize test segmenter in brackets): fp32 1e-4 (1.2e-6), fp16 1e-2
(~1e-3), int8 judged by argmax agreement >= 0.9 and a task-metric drop <= 0.01
(`dlmodels.export.verify.int8_verdict`, the bar ONNX and OpenVINO int8 files meet too).

The runtime is `ai_edge_litert.interpreter.Interpreter` (`pip install "dlmodels[litert]"`),
not the deprecated `tf.lite.Interpreter`. Parity (`verify_litert`) runs the file in a fresh
process that imports numpy and ai_edge_litert only (this file is loaded there stand-alone,
which is why it imports TensorFlow only inside functions).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from dlmodels.errors import UserError
from dlmodels.runtime.feeds import match_feeds

PRECISIONS = ("fp32", "fp16", "int8")
"""What `to_litert` writes."""

TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2, "int8": math.inf}
"""Default max |LiteRT - Keras| per precision (int8 is judged by
`dlmodels.export.verify.INT8_MIN_AGREEMENT` and `INT8_MAX_METRIC_DROP`)."""

SIGNATURE = "serving_default"
"""The signature every file `to_litert` writes carries (named inputs and outputs)."""

BATCH_DIM = "batch"
"""How `litert_io` names a dynamic leading dimension (as `to_onnx` names it in ONNX)."""


class LiteRTConversionError(UserError):
    """The TFLite converter cannot lower an op of the model (named with its layer)."""


def _interpreter_module():
    try:
        from ai_edge_litert import interpreter
    except ImportError as err:
        raise UserError(
            "LiteRT artifacts need the ai-edge-litert runtime, which is not installed: "
            '`pip install "dlmodels[litert]"` (or `pip install ai-edge-litert`).'
        ) from err
    return interpreter


def check_precision(precision: str) -> str:
    """Return `precision` if it is one of PRECISIONS, else raise a UserError listing them."""
    if precision not in PRECISIONS:
        raise UserError(
            f"precision={precision!r} is not supported for LiteRT; choose one of "
            f"{list(PRECISIONS)} ('fp32' for parity, 'fp16' for half-size weights, 'int8' for "
            "full-integer quantization with calibration data)."
        )
    return precision


# -- conversion ------------------------------------------------------------------------------


def _representative_dataset(model, calibration, max_samples: int | None):
    """Calibration batches as a list of one-sample {input name: array} dicts, checked against
    the model's input shapes (fixed dims must match) and dtypes."""
    from dlmodels.export._signature import input_names
    from dlmodels.export.quantize import ArrayCalibrationReader

    names = input_names(model)
    shapes = [tuple(t.shape) for t in model.inputs]
    reader = ArrayCalibrationReader(
        calibration,
        input_names=names,
        input_ranks=[len(s) for s in shapes],
        input_dtypes=[np.dtype(str(t.dtype)) for t in model.inputs],
        batch_size=32,
        max_samples=max_samples,
    )
    samples: list[dict[str, np.ndarray]] = []
    while (batch := reader.get_next()) is not None:
        for name, shape in zip(names, shapes, strict=True):
            got = batch[name].shape
            if any(d is not None and g != d for g, d in zip(got[1:], shape[1:], strict=True)):
                raise UserError(
                    f"calibration batch for input {name!r} has shape {got}; the model expects "
                    f"(batch, {', '.join('None' if d is None else str(d) for d in shape[1:])}). "
                    "Give calibration data of the model's input size."
                )
        n = len(next(iter(batch.values())))
        samples.extend({k: v[i : i + 1] for k, v in batch.items()} for i in range(n))
    if not samples:
        raise UserError(
            "calibration is empty: precision='int8' needs representative inputs (an array, a "
            "dict by input name or an iterable of batches with at least one sample)."
        )
    return samples


_LOC = re.compile(r"""fused\["[A-Za-z0-9_]+:", "([^"@]+)@""")
_TF_OP = re.compile(r"'tfl?\.([A-Za-z0-9_]+)' op")


def _layer_names(model) -> set[str]:
    return {layer.name for layer in getattr(model, "_flatten_layers", lambda: model.layers)()}


def _conversion_error(err: Exception, model, precision: str) -> LiteRTConversionError:
    """The converter's MLIR diagnostics, boiled down to the ops it could not lower and the
    layers they come from (each op's location is its name scope, `model_1/layer_1/Op`)."""
    text = str(err)
    ops = sorted(set(_TF_OP.findall(text)))
    known = _layer_names(model)
    layers = sorted(
        {
            part
            for scope in _LOC.findall(text)
            for part in (re.sub(r"_\d+$", "", p) for p in scope.split("/")[1:-1])
            if part in known and part != model.name
        }
    )
    what = ", ".join(f"op {op}" for op in ops) if ops else "an op"
    where = f" in layer {', '.join(repr(n) for n in layers)}" if layers else ""
    reason = next(
        (m.group(0) for m in re.finditer(r"'tfl?\.[^']+' op [^\n]*", text)),
        next((ln.strip() for ln in text.splitlines() if ln.strip()), "")[:300],
    )
    return LiteRTConversionError(
        f"cannot convert {model.name!r} to LiteRT {precision}: the TFLite converter cannot "
        f"lower {what}{where} ({reason}). Replace the layer with ops LiteRT has builtin kernels "
        "for, or export a sub-model without it; no file was written."
    )


def _convert(saved_model_dir: Path, precision: str, dataset, model) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), [SIGNATURE])
    if precision == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.representative_dataset = lambda: iter(dataset)
        # inference_input_type / inference_output_type stay float32: float IO, int8 inside.
    try:
        with warnings.catch_warnings():
            # The int8 calibrator runs tf.lite.Interpreter internally; its deprecation notice is
            # for users of that class, not for us (we run files with ai_edge_litert).
            warnings.filterwarnings("ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated")
            return converter.convert()
    except Exception as err:  # ConverterError and friends; the message holds the diagnostics
        if type(err).__name__ not in ("ConverterError", "ValueError", "RuntimeError"):
            raise
        raise _conversion_error(err, model, precision) from err


def to_litert(
    model,
    path: str | os.PathLike,
    *,
    precision: str = "fp32",
    calibration=None,
    max_calibration_samples: int | None = 256,
    saved_model: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert `model` to a LiteRT flatbuffer (`.tflite`) and write it atomically.

    Args:
        model: a functional Keras model (1..n inputs, 1..n outputs).
        path: destination `.tflite` file; parent directories are created.
        precision: "fp32", "fp16" or "int8" (see the module docstring).
        calibration: int8 only (required there): representative inputs, as
            `dlmodels.export.quantize` takes them (one array, a dict by input name, a list in
            input order, or an iterable of batches / `(x, y)` tuples / a tf.data.Dataset).
        max_calibration_samples: cap on the calibration samples read (None: all).
        saved_model: a SavedModel directory of this model's float32 clone already written by
            `to_saved_model(float32_copy(model), ...)`, to convert several precisions from one
            trace; None writes one to a temp directory.
        overwrite: replace an existing `path`; otherwise FileExistsError before any work.

    Returns:
        The path written.

    Raises:
        FileExistsError: `path` exists and overwrite is False.
        UserError: unknown precision, ai-edge-litert missing (names the extra), int8 without or
            with empty / mis-shaped calibration data.
        LiteRTConversionError: an op the converter cannot lower (names the op and the layer);
            nothing is written.
    """
    import tempfile

    from dlmodels.export._atomic import atomic_path, check_target
    from dlmodels.export._signature import as_functional, float32_copy

    model = as_functional(model)
    path = Path(path)
    check_precision(precision)
    check_target(path, overwrite=overwrite)
    interpreter = _interpreter_module()  # before any work: a file we cannot run is no artifact
    if precision == "int8":
        if calibration is None:
            raise UserError(
                "precision='int8' needs `calibration` data (representative inputs for the "
                "activation ranges); pass calibration=... or choose precision='fp16' / 'fp32'."
            )
        dataset = _representative_dataset(model, calibration, max_calibration_samples)
    else:
        dataset = None
    name = getattr(model, "name", "model")
    with tempfile.TemporaryDirectory(prefix="dlmodels-litert-") as scratch:
        if saved_model is None:
            from dlmodels.export.saved_model import to_saved_model

            saved_model = to_saved_model(float32_copy(model), Path(scratch) / "saved_model")
        data = _convert(Path(saved_model), precision, dataset, model)
    # A flatbuffer the runtime cannot load is refused here, before it reaches the target.
    probe = interpreter.Interpreter(model_content=data)
    if SIGNATURE not in probe.get_signature_list():
        raise RuntimeError(f"the LiteRT file for {name!r} lost its {SIGNATURE!r} signature")
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return path


# -- running ---------------------------------------------------------------------------------


def _np_dtype(dtype) -> str:
    return np.dtype(dtype).name


class LiteRTModel:
    """A `.tflite` file in `ai_edge_litert.interpreter.Interpreter`, called by signature.

    Args:
        path: the `.tflite` file.
        threads: interpreter threads (None: the runtime's default).

    Attributes:
        path, input_names, output_names (the `serving_default` signature's, outputs in the
        signature's order), input_dtypes ({name: numpy dtype}).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no LiteRT file at {self.path}; write one with to_litert")
        interpreter = _interpreter_module()
        self._interpreter = interpreter.Interpreter(model_path=str(self.path), num_threads=threads)
        signatures = self._interpreter.get_signature_list()
        if SIGNATURE not in signatures:
            raise UserError(
                f"{self.path} has signatures {sorted(signatures)}; dlmodels reads "
                f"{SIGNATURE!r} (files written by to_litert carry it)."
            )
        self.input_names = list(signatures[SIGNATURE]["inputs"])
        self.output_names = list(signatures[SIGNATURE]["outputs"])
        self._runner = self._interpreter.get_signature_runner(SIGNATURE)
        details = self._runner.get_input_details()
        self.input_dtypes = {n: np.dtype(details[n]["dtype"]) for n in self.input_names}

    def __repr__(self) -> str:
        return (
            f"LiteRTModel({str(self.path)!r}, inputs={self.input_names}, "
            f"outputs={self.output_names})"
        )

    def io(self) -> dict:
        """Names, shapes (`batch` for the dynamic leading dim, None for other dynamic dims)
        and dtypes of the signature's inputs and outputs."""

        def describe(name, d):
            sig = [int(v) for v in d.get("shape_signature", d["shape"])]
            shape = [(BATCH_DIM if i == 0 else None) if v < 0 else v for i, v in enumerate(sig)]
            return {"name": name, "shape": shape, "dtype": _np_dtype(d["dtype"])}

        ins = self._runner.get_input_details()
        outs = self._runner.get_output_details()
        return {
            "inputs": [describe(n, ins[n]) for n in self.input_names],
            "outputs": [describe(n, outs[n]) for n in self.output_names],
        }

    def feeds(self, inputs) -> dict[str, np.ndarray]:
        """Map `inputs` (one array, a list in input order or a dict by name) to contiguous
        arrays of the signature's dtypes, converted as numpy converts ("unsafe" casting)."""
        return match_feeds(
            inputs, self.input_names, self.input_dtypes, owner=self.path.name, cast="unsafe"
        )

    def run(self, inputs) -> dict[str, np.ndarray]:
        """Run once (any batch size); returns output name -> array in signature order."""
        out = self._runner(**self.feeds(inputs))
        return {n: np.array(out[n]) for n in self.output_names}

    def __call__(self, inputs):
        """The single output's array, else a list in signature order (a predictor for
        `dlmodels.bench.compare_predictors`)."""
        out = self.run(inputs)
        return next(iter(out.values())) if len(out) == 1 else list(out.values())


def litert_io(path: str | os.PathLike) -> dict:
    """`LiteRTModel(path).io()`: what a manifest records for a `.tflite` file."""
    return LiteRTModel(path).io()


# -- fresh-process parity --------------------------------------------------------------------


def _worker_main(argv: list[str]) -> int:
    """`MODEL IN.npz OUT.npz`: run the file and save the outputs (this process imports numpy,
    ai_edge_litert and `dlmodels.runtime` only, never TensorFlow)."""
    if len(argv) != 3:
        print("usage: MODEL.tflite IN.npz OUT.npz", file=sys.stderr)
        return 2
    model_path, in_path, out_path = argv
    model = LiteRTModel(model_path)
    from dlmodels.runtime.worker import run_model_file  # TF-free, like this worker

    return run_model_file(model, in_path, out_path)


# Loads this file as a stand-alone module, so the worker never imports `dlmodels.export`
# (whose __init__ imports TensorFlow through the exporters).
_BOOT = (
    "import importlib.util, sys; "
    "spec = importlib.util.spec_from_file_location('_dlmodels_litert_worker', sys.argv[1]); "
    "mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; "
    "spec.loader.exec_module(mod); "
    "sys.exit(mod._worker_main(sys.argv[2:]))"
)


def litert_predict(
    path: str | os.PathLike, inputs, *, fresh_process: bool = True
) -> dict[str, np.ndarray]:
    """Run a `.tflite` file with ai-edge-litert; output name -> array.

    Args:
        path: the `.tflite` file.
        inputs: one array, a list in input order, or a dict by input name.
        fresh_process: run in a new Python process importing numpy and ai_edge_litert only
            (what an edge or serving process sees); False runs here.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LiteRT file at {path}; write one with to_litert")
    if not fresh_process:
        return LiteRTModel(path).run(inputs)
    _interpreter_module()  # a clear error here rather than an ImportError from the worker
    outputs, names, tf_loaded = _run_worker(path, inputs)
    if tf_loaded:
        raise RuntimeError("the LiteRT worker imported TensorFlow; parity is not isolated")
    return dict(zip(names, outputs, strict=True))


def _run_worker(path: Path, inputs):
    from dlmodels.export.verify import run_fresh_worker

    command = [sys.executable, "-c", _BOOT, str(Path(__file__).resolve()), str(path.resolve())]
    return run_fresh_worker(
        command, inputs, what=f"LiteRT worker failed on {path}", prefix="dlmodels-litert-"
    )


@dataclasses.dataclass
class LiteRTVerifyReport:
    """`verify_litert`'s result.

    Attributes:
        path, precision, max_abs_error, mean_abs_error, atol, min_agreement, agreement,
        passed (finite, max |err| <= atol, agreement >= min_agreement and metric drop <=
        max_metric_drop, each when set and measured), n_samples, metric_keras / metric_litert
        (when `metric` and `labels` were given), max_metric_drop, judged_by (the bars applied,
        in words; for int8 `FINITE_ONLY` when nothing but finiteness could be judged).
    """

    path: str
    precision: str
    max_abs_error: float
    mean_abs_error: float
    atol: float
    passed: bool
    n_samples: int
    agreement: float | None = None
    min_agreement: float | None = None
    metric_keras: float | None = None
    metric_litert: float | None = None
    max_metric_drop: float | None = None
    judged_by: str = ""

    def __str__(self) -> str:
        text = (
            f"{'PASS' if self.passed else 'FAIL'} {self.path} [LiteRT {self.precision}]: max "
            f"|err| {self.max_abs_error:.3e}, mean |err| {self.mean_abs_error:.3e}, "
            f"atol {self.atol:g}"
        )
        if self.agreement is not None:
            text += f", argmax agreement {self.agreement:.4f}"
        if self.min_agreement is not None:
            text += f" (min {self.min_agreement:g})"
        if self.metric_keras is not None:
            text += f", metric keras {self.metric_keras:.4f} / litert {self.metric_litert:.4f}"
        if self.judged_by:
            text += f"; judged by {self.judged_by}"
        return text


def verify_litert(
    model,
    path: str | os.PathLike,
    inputs,
    *,
    precision: str = "fp32",
    atol: float | None = None,
    min_agreement: float | None = None,
    labels=None,
    metric: Callable | None = None,
    max_metric_drop: float | None = None,
    expected: Mapping[str, np.ndarray] | None = None,
    raise_on_fail: bool = False,
) -> LiteRTVerifyReport:
    """Compare a `.tflite` file, run in a fresh ai-edge-litert process, with Keras.

    Args:
        model: the Keras model the file came from.
        path: the `.tflite` file.
        inputs: samples: one array, a list in input order, or a dict by input name.
        precision: the file's precision, "fp32", "fp16" or "int8" (picks the default bar).
        atol: largest tolerated |LiteRT - Keras|; None: `TOLERANCES[precision]`.
        min_agreement: smallest tolerated argmax agreement (outputs with > 1 channel); None:
            `INT8_MIN_AGREEMENT` for int8, unchecked otherwise.
        labels / metric: `metric(labels, outputs) -> float` (higher is better) on Keras and
            LiteRT outputs.
        max_metric_drop: largest tolerated metric drop (Keras - LiteRT) when a metric is
            given; None: `INT8_MAX_METRIC_DROP` for int8, unchecked otherwise.
        expected: Keras outputs already computed ({output name: array}).
        raise_on_fail: raise `VerificationError` instead of returning a failed report.

    Raises:
        RuntimeError: the worker could not run the file (e.g. a corrupted flatbuffer).
    """
    from dlmodels.export.verify import (
        INT8_MAX_METRIC_DROP,
        INT8_MIN_AGREEMENT,
        VerificationError,
        _n_samples,
        judge_outputs,
        keras_outputs,
    )

    check_precision(precision)
    atol = TOLERANCES[precision] if atol is None else float(atol)
    if precision == "int8":
        min_agreement = INT8_MIN_AGREEMENT if min_agreement is None else min_agreement
        max_metric_drop = INT8_MAX_METRIC_DROP if max_metric_drop is None else max_metric_drop
    expected = dict(expected) if expected is not None else keras_outputs(model, inputs)
    got = litert_predict(path, inputs, fresh_process=True)
    judged = judge_outputs(
        expected,
        got,
        where=f"{path} [LiteRT {precision}]",
        atol=atol,
        min_agreement=min_agreement,
        labels=labels,
        metric=metric,
        max_metric_drop=max_metric_drop,
    )
    metric_litert = judged.pop("metric_runtime")
    report = LiteRTVerifyReport(
        path=str(path),
        precision=precision,
        atol=atol,
        n_samples=_n_samples(inputs),
        min_agreement=min_agreement,
        metric_litert=metric_litert,
        max_metric_drop=max_metric_drop,
        **judged,
    )
    if raise_on_fail and not report.passed:
        raise VerificationError(str(report))
    return report

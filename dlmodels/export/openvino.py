"""OpenVINO: IR conversion, NNCF int8 quantization, fp32 / bf16 / int8 inference, parity.

OpenVINO's CPU plugin runs the ONNX files `to_onnx` and `quantize` write: `to_openvino`
converts one to OpenVINO IR (`model.xml` + `model.bin`, fp32 weights) with
`openvino.convert_model` + `openvino.save_model`; `quantize_openvino` quantizes an fp32 ONNX
file or IR to an int8 IR with OpenVINO's own post-training quantizer NNCF; and `OpenVINOModel`
compiles an IR or ONNX file for a precision:

    "f32"   INFERENCE_PRECISION_HINT f32. The CPU plugin's default on CPUs with AVX512-BF16 is
            bf16, so fp32 parity needs the explicit hint.
    "bf16"  INFERENCE_PRECISION_HINT bf16 (AVX512-BF16 / AMX): bfloat16 activations and
            weights with fp32 accumulation (Kalamkar et al., "A Study of BFLOAT16 for Deep
            Learning Training", 2019: 8-bit significand, fp32 range).
    "int8"  an int8 file: an onnxruntime static QDQ file (or its IR), whose
            QuantizeLinear/DequantizeLinear pairs OpenVINO reads as FakeQuantize, or an IR from
            `quantize_openvino`, whose FakeQuantize nodes NNCF placed where the CPU plugin fuses
            them; the convolutions run in int8 (u8 activations, i8 weights), the rest in f32.

Why a second int8 path: the QDQ placement is onnxruntime's. On ResNet-50 OpenVINO runs the QDQ
file with 6 of its 53 convolutions in f32 (both convolutions reading the input of the first block
of stages 3-5); NNCF's IR of the same fp32 model runs all 53 in u8. Timed interleaved (2 threads,
AVX-512 VNNI, a shared machine at load 2-3; three runs), OpenVINO on the QDQ file vs the NNCF IR:
batch 1 10.5-11.5 ms vs 5.8-8.2 ms (1.4-1.8x), batch 32 332-411 ms vs 214-312 ms (1.3-1.6x),
argmax agreement with Keras 100% for both on 32 random images.

Tolerances against Keras (`TOLERANCES`, absolute, for outputs of order one; measured max |err|
on the tiny BatchNorm + Resize test segmenter in brackets): f32 1e-4 (1e-6), bf16 5e-2 (1.1e-2),
int8 judged by argmax agreement >= 0.9 (QDQ file 98%, NNCF IR 97%) and the task metric, not by
an absolute error.

`openvino` and `nncf` are optional (`pip install 'dlmodels[openvino]'`): they are imported when
first needed. Parity (`verify_openvino`) runs the file in a fresh process that imports numpy and
openvino only.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from dlmodels.errors import UserError
from dlmodels.runtime.feeds import match_feeds

PRECISIONS = ("f32", "bf16", "int8")
"""What `OpenVINOModel` compiles for; "int8" means "an int8 file (QDQ or NNCF IR), everything
else in f32"."""

TOLERANCES = {"f32": 1e-4, "bf16": 5e-2, "int8": math.inf}
"""Default max |OpenVINO - Keras| per precision (int8 is judged by `INT8_MIN_AGREEMENT`)."""

INT8_MIN_AGREEMENT = 0.9
"""Default smallest argmax agreement with Keras of an int8 file: a copy of
`dlmodels.export.verify.INT8_MIN_AGREEMENT` (this file is loaded stand-alone in its worker, so it
does not import `dlmodels.export`; a test checks the two agree)."""

IR_XML = "model.xml"
IR_BIN = "model.bin"

_HINT = {"f32": "f32", "bf16": "bf16", "int8": "f32"}


def _openvino():
    try:
        import openvino
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise UserError(
            "OpenVINO is not installed; `pip install openvino` (it is an optional dependency "
            "of dlmodels) to convert and run OpenVINO artifacts."
        ) from err
    return openvino


def check_precision(precision: str) -> str:
    """Return `precision` if it is one of PRECISIONS, else raise a UserError listing them."""
    if precision not in PRECISIONS:
        raise UserError(
            f"precision={precision!r} is not supported; choose one of {list(PRECISIONS)} "
            "('f32' for parity, 'bf16' on CPUs with AVX512-BF16 / AMX, 'int8' for a QDQ file "
            "or an IR from quantize_openvino)."
        )
    return precision


def cpu_capabilities() -> list[str]:
    """The CPU plugin's OPTIMIZATION_CAPABILITIES (e.g. ["BF16", "FP32", "INT8", ...])."""
    ov = _openvino()
    return [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def supports_bf16() -> bool:
    """Whether OpenVINO's CPU plugin computes in bf16 on this CPU (AVX512-BF16 or AMX)."""
    return "BF16" in cpu_capabilities()


def to_openvino(
    onnx_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Convert an ONNX file to OpenVINO IR with fp32 weights, written atomically.

    The directory gets `model.xml` (the graph) and `model.bin` (the weights); both appear
    together or not at all. Graph input and output names stay those of the ONNX file (`image`,
    `logits`). An int8 QDQ file converts too: its QuantizeLinear/DequantizeLinear pairs become
    FakeQuantize nodes that the CPU plugin runs in int8.

    Args:
        onnx_path: an ONNX file (fp32 from `to_onnx`, or a static int8 QDQ file).
        out_dir: destination directory.
        overwrite: replace an existing `out_dir`; otherwise FileExistsError before any work.

    Returns:
        The path of `model.xml`.
    """
    from dlmodels.export._atomic import atomic_path, check_target

    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX file at {onnx_path}; export one with to_onnx first")
    check_target(out_dir, overwrite=overwrite)
    ov = _openvino()
    converted = ov.convert_model(str(onnx_path))
    with atomic_path(out_dir, overwrite=overwrite, directory=True) as tmp:
        # compress_to_fp16 defaults to True in save_model; keep the fp32 weights the file had.
        ov.save_model(converted, str(tmp / IR_XML), compress_to_fp16=False)
    return out_dir / IR_XML


NNCF_PRESETS = ("mixed", "performance")
"""`quantize_openvino` presets: "mixed" (NNCF's default: symmetric int8 weights, asymmetric u8
activations) or "performance" (symmetric weights and activations)."""

DEFAULT_SUBSET_SIZE = 300
"""NNCF's default number of calibration samples the activation ranges are taken from."""


def _nncf():
    try:
        import nncf
    except ImportError as err:
        raise UserError(
            "NNCF is not installed; `pip install 'dlmodels[openvino]'` (OpenVINO with its "
            "quantizer NNCF, optional dependencies of dlmodels) to quantize with "
            "quantize_openvino."
        ) from err
    return nncf


def _calibration_samples(calibration, inputs) -> tuple[int, list]:
    """Check `calibration` against the model's inputs; (n, one feed per sample, batch 1)."""
    names = [p.get_any_name() for p in inputs]
    if isinstance(calibration, Mapping):
        if sorted(calibration) != sorted(names):
            raise UserError(
                f"calibration has inputs {sorted(calibration)}; the model takes {names}: give "
                "one array per model input, by name"
            )
        arrays = {n: np.asarray(calibration[n]) for n in names}
    elif len(names) == 1:
        arrays = {names[0]: np.asarray(calibration)}
    else:
        raise UserError(
            f"the model has {len(names)} inputs {names}: give calibration as a dict of arrays "
            "by input name"
        )
    counts = set()
    for port, (name, arr) in zip(inputs, arrays.items(), strict=True):
        if arr.ndim == 0 or arr.shape[0] == 0:
            raise UserError(
                f"calibration for input {name!r} is empty (shape {arr.shape}); give at least one "
                "sample, e.g. a few hundred images like the data the model will see"
            )
        want = port.get_partial_shape()
        if want.rank.is_static and (
            want.rank.get_length() != arr.ndim
            or any(
                d.is_static and d.get_length() != got
                for d, got in zip(list(want)[1:], arr.shape[1:], strict=True)
            )
        ):
            raise UserError(
                f"calibration for input {name!r} has shape {arr.shape}; the model takes {want} "
                "(batch first): give (num_samples, *input_shape)"
            )
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise UserError(f"calibration for input {name!r} holds NaN or inf values")
        counts.add(arr.shape[0])
    if len(counts) != 1:
        raise UserError(f"calibration inputs have different sample counts {sorted(counts)}")
    n = counts.pop()
    arrays = {k: a.astype(np.float32) if a.dtype == np.float64 else a for k, a in arrays.items()}
    return n, [{k: a[i : i + 1] for k, a in arrays.items()} for i in range(n)]


def quantize_openvino(
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    calibration,
    *,
    preset: str = "mixed",
    subset_size: int = DEFAULT_SUBSET_SIZE,
    fast_bias_correction: bool = True,
    overwrite: bool = False,
) -> Path:
    """Quantize an fp32 ONNX file or IR to an int8 OpenVINO IR with NNCF, written atomically.

    NNCF (Kozlov et al., "Neural Network Compression Framework for fast model inference",
    2020) runs the model on the calibration samples, takes each activation's range, and inserts
    FakeQuantize nodes (int8 weights per output channel, u8/i8 activations; Jacob et al.,
    "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference", CVPR 2018) where OpenVINO's CPU plugin fuses them into int8 kernels (residual
    adds, concatenations), then corrects the biases for the quantization error (Nagel et al.,
    "Data-Free Quantization Through Weight Equalization and Bias Correction", ICCV 2019).
    Run the result with `OpenVINOModel(out_dir, precision="int8")`, check it with
    `verify_openvino(..., precision="int8")`; `nncf_settings(out_dir)` reads back the settings
    NNCF recorded in it.

    Args:
        model_path: an fp32 `.onnx` file (from `to_onnx`), an IR directory or `.xml` (from
            `to_openvino`). An already quantized file is refused.
        out_dir: destination directory; gets `model.xml` + `model.bin` (both or neither).
        calibration: (num_samples, *input_shape) array for a one-input model, else a dict of
            such arrays by input name: samples like the data the model will serve.
        preset: one of NNCF_PRESETS.
        subset_size: how many calibration samples NNCF uses (at most all of them).
        fast_bias_correction: NNCF's fast bias correction (False: its slower full algorithm).
        overwrite: replace an existing `out_dir`; otherwise FileExistsError before any work.

    Returns:
        The path of `model.xml`.
    """
    from dlmodels.export._atomic import atomic_path, check_target

    if preset not in NNCF_PRESETS:
        raise UserError(f"preset={preset!r} is not supported; choose one of {list(NNCF_PRESETS)}")
    if isinstance(subset_size, bool) or not isinstance(subset_size, int) or subset_size < 1:
        raise UserError(f"subset_size must be an int >= 1, got {subset_size!r}")
    out_dir = Path(out_dir)
    src = _resolve(model_path)
    check_target(out_dir, overwrite=overwrite)
    ov, nncf = _openvino(), _nncf()
    fp32 = ov.Core().read_model(str(src))
    n_fq = sum(op.get_type_name() == "FakeQuantize" for op in fp32.get_ops())
    if n_fq:
        raise UserError(
            f"{src} is already quantized ({n_fq} FakeQuantize nodes); quantize_openvino takes "
            "the fp32 ONNX file or IR"
        )
    n, samples = _calibration_samples(calibration, fp32.inputs)
    quantized = nncf.quantize(
        fp32,
        nncf.Dataset(samples),
        preset={
            "mixed": nncf.QuantizationPreset.MIXED,
            "performance": nncf.QuantizationPreset.PERFORMANCE,
        }[preset],
        subset_size=min(subset_size, n),
        fast_bias_correction=bool(fast_bias_correction),
    )
    with atomic_path(out_dir, overwrite=overwrite, directory=True) as tmp:
        ov.save_model(quantized, str(tmp / IR_XML), compress_to_fp16=False)
    return out_dir / IR_XML


def _rt_value(text: str):
    if text in ("True", "False"):
        return text == "True"
    if text == "None":
        return None
    return int(text) if text.isdigit() else text


def nncf_settings(path: str | os.PathLike) -> dict | None:
    """What NNCF recorded in an IR it quantized (`quantize_openvino`): its `rt_info` "nncf"
    section, e.g. {"preset": "mixed", "subset_size": 300, "fast_bias_correction": True, ...,
    "nncf_version": "3.4.0"}; None for a file NNCF did not quantize (fp32 IR, QDQ file).

    Args:
        path: IR directory, `.xml` or `.onnx` file.
    """
    ov = _openvino()
    model = ov.Core().read_model(str(_resolve(path)))
    if not model.has_rt_info(["nncf", "quantization"]):
        return None
    raw = model.get_rt_info(["nncf", "quantization"]).astype(dict)
    out = {k: _rt_value(v.astype(str)) for k, v in raw.items()}
    if model.has_rt_info(["nncf", "version"]):
        out["nncf_version"] = model.get_rt_info(["nncf", "version"]).astype(str)
    return out


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / IR_XML
    if not path.is_file():
        raise FileNotFoundError(f"no OpenVINO IR or ONNX file at {path}")
    return path


def _static_batch(core, path: Path, batch_size: int):
    """The model at `path` read and reshaped so that every input's first dimension is
    `batch_size` (an `openvino.Model` ready to compile)."""
    model = core.read_model(str(path))
    shapes = {}
    for port in model.inputs:
        shape = port.get_partial_shape()
        if shape.rank.is_dynamic or shape.rank.get_length() == 0:
            raise UserError(
                f"batch_size={batch_size} needs a batch dimension, but input "
                f"{port.get_any_name()!r} of {path.name} has shape {shape}; use batch_size=None"
            )
        shape[0] = batch_size
        shapes[port.get_any_name()] = shape
    try:
        model.reshape(shapes)
    except RuntimeError as e:
        raise UserError(
            f"{path.name} cannot be reshaped to batch {batch_size} ({str(e).splitlines()[0]}); "
            "use batch_size=None"
        ) from e
    return model


class OpenVINOModel:
    """An OpenVINO CPU compiled model with named inputs and outputs.

    Args:
        path: an IR directory (from `to_openvino`), a `.xml` file or an `.onnx` file.
        precision: "f32", "bf16" or "int8" (see the module docstring).
        threads: INFERENCE_NUM_THREADS (None: the CPUs this process may use).
        performance_hint: "LATENCY" (one stream, default) or "THROUGHPUT".
        batch_size: None (default) compiles the file as it is (a dynamic batch stays dynamic:
            any batch runs); an int N fixes the first dimension of every input to N before
            compiling (`Model.reshape`). With static shapes the CPU plugin plans its memory and
            picks its kernels once, at compile time, instead of on every call. In a side check
            (2 threads, NNCF int8 IRs, median of 4-10 calls): 2-8% faster (DeepLabV3+ batch 32
            532 -> 497 ms, U-Net batch 1 4.7 -> 4.3 ms, ResNet-50 batch 32 140 -> 136 ms);
            onnxruntime gains nothing from the same fix (fp32 within 1%). Calls with
            another batch are refused: compile one model per batch size you serve.

    Attributes:
        path, precision, threads, batch_size, input_names, output_names, compiled (the
        CompiledModel), config (the properties it was compiled with).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        precision: str = "f32",
        threads: int | None = None,
        performance_hint: str = "LATENCY",
        batch_size: int | None = None,
    ):
        self.path = _resolve(path)
        self.precision = check_precision(precision)
        if batch_size is not None and (
            not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1
        ):
            raise UserError(
                f"batch_size must be an int >= 1 (a static batch) or None (the file's own "
                f"batch dimension), got {batch_size!r}"
            )
        self.batch_size = batch_size
        if threads is not None and (
            not isinstance(threads, int) or isinstance(threads, bool) or threads < 1
        ):
            raise UserError(f"threads must be an int >= 1 (or None), got {threads!r}")
        if performance_hint not in ("LATENCY", "THROUGHPUT"):
            raise UserError(
                f"performance_hint must be 'LATENCY' or 'THROUGHPUT', got {performance_hint!r}"
            )
        if threads is None:
            try:
                threads = max(len(os.sched_getaffinity(0)), 1)
            except (AttributeError, OSError):
                threads = max(os.cpu_count() or 1, 1)
        self.threads = threads
        ov = _openvino()
        core = ov.Core()
        if precision == "bf16" and "BF16" not in core.get_property(
            "CPU", "OPTIMIZATION_CAPABILITIES"
        ):
            raise UserError(
                "precision='bf16' needs a CPU with AVX512-BF16 or AMX; OpenVINO reports "
                f"{list(core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))} here."
            )
        self.config = {
            "INFERENCE_PRECISION_HINT": _HINT[precision],
            "INFERENCE_NUM_THREADS": int(threads),
            "PERFORMANCE_HINT": performance_hint,
        }
        if performance_hint == "LATENCY":
            self.config["NUM_STREAMS"] = 1
        source = (
            str(self.path) if batch_size is None else _static_batch(core, self.path, batch_size)
        )
        self.compiled = core.compile_model(source, "CPU", self.config)
        self.input_names = [p.get_any_name() for p in self.compiled.inputs]
        self.output_names = [p.get_any_name() for p in self.compiled.outputs]
        self._request = self.compiled.create_infer_request()

    def __repr__(self) -> str:
        batch = "" if self.batch_size is None else f", batch_size={self.batch_size}"
        return (
            f"OpenVINOModel({str(self.path)!r}, precision={self.precision!r}{batch}, "
            f"inputs={self.input_names}, outputs={self.output_names})"
        )

    def runtime_precisions(self) -> dict[str, dict[str, int]]:
        """layer type -> {runtime precision: count} of the compiled graph (e.g. how many
        Convolutions run in u8 or bf16), from OpenVINO's runtime model."""
        out: dict[str, dict[str, int]] = {}
        for op in self.compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            kind = str(info["layerType"].astype(str))
            prec = str(info["runtimePrecision"].astype(str))
            out.setdefault(kind, {})
            out[kind][prec] = out[kind].get(prec, 0) + 1
        return out

    def feeds(self, inputs) -> dict[str, np.ndarray]:
        """Map `inputs` (one array, a list in input order or a dict by name) to contiguous
        arrays by input name: float64 (numpy's default, parsed JSON) becomes float32; other
        dtypes pass as given, for OpenVINO to take or refuse."""
        feeds = match_feeds(inputs, self.input_names, owner=self.path.name)
        if self.batch_size is not None:
            for name, array in feeds.items():
                if array.ndim == 0 or array.shape[0] != self.batch_size:
                    got = "a scalar" if array.ndim == 0 else f"batch {array.shape[0]}"
                    raise UserError(
                        f"input {name!r} has {got}, but this model was compiled for batch "
                        f"{self.batch_size} (batch_size={self.batch_size}); pass batches of "
                        f"{self.batch_size}, or compile with batch_size=None for any batch"
                    )
        return {n: a.astype(np.float32) if a.dtype == np.float64 else a for n, a in feeds.items()}

    def run(self, inputs) -> dict[str, np.ndarray]:
        """Run once; returns output name -> array (copied out of OpenVINO's buffers)."""
        result = self._request.infer(self.feeds(inputs))
        return {
            name: np.array(result[port])
            for name, port in zip(self.output_names, self.compiled.outputs, strict=True)
        }

    def __call__(self, inputs):
        """The single output's array, else a list of arrays in graph order (a predictor for
        `dlmodels.bench.compare_predictors`)."""
        out = self.run(inputs)
        return next(iter(out.values())) if len(out) == 1 else list(out.values())


# -- fresh-process parity ------------------------------------------------------------------


def _worker_main(argv: list[str]) -> int:
    """`MODEL PRECISION IN.npz OUT.npz`: run the model and save the outputs (in this process
    only numpy, openvino and `dlmodels.runtime` are imported, never TensorFlow)."""
    if len(argv) != 4:
        print("usage: MODEL PRECISION IN.npz OUT.npz", file=sys.stderr)
        return 2
    model_path, precision, in_path, out_path = argv
    model = OpenVINOModel(model_path, precision=precision)
    from dlmodels.runtime.worker import run_model_file  # TF-free, like this worker

    return run_model_file(model, in_path, out_path)


# Loads this file as a stand-alone module, so the worker never imports `dlmodels.export`
# (whose __init__ imports TensorFlow through the exporters).
_BOOT = (
    "import importlib.util, sys; "
    "spec = importlib.util.spec_from_file_location('_dlmodels_openvino_worker', sys.argv[1]); "
    "mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; "
    "spec.loader.exec_module(mod); "
    "sys.exit(mod._worker_main(sys.argv[2:]))"
)


def openvino_predict(
    path: str | os.PathLike, inputs, *, precision: str = "f32", fresh_process: bool = True
) -> dict[str, np.ndarray]:
    """Run an IR / ONNX file in OpenVINO; output name -> array.

    Args:
        path: IR directory, `.xml` or `.onnx` file.
        inputs: one array, a list in input order, or a dict by input name.
        precision: "f32", "bf16" or "int8".
        fresh_process: run in a new Python process importing numpy and openvino only (what a
            serving process sees); False runs here.
    """
    check_precision(precision)
    path = _resolve(path)
    if not fresh_process:
        return OpenVINOModel(path, precision=precision).run(inputs)
    outputs, names, tf_loaded = _run_worker(path, inputs, precision)
    if tf_loaded:
        raise RuntimeError("the OpenVINO worker imported TensorFlow; parity is not isolated")
    return dict(zip(names, outputs, strict=True))


def _run_worker(path: Path, inputs, precision: str):
    from dlmodels.export.verify import run_fresh_worker

    command = [sys.executable, "-c", _BOOT, str(Path(__file__).resolve()), str(path.resolve())]
    return run_fresh_worker(
        [*command, precision],
        inputs,
        what=f"OpenVINO worker failed on {path}",
        prefix="dlmodels-ov-",
    )


@dataclasses.dataclass
class OpenVINOVerifyReport:
    """`verify_openvino`'s result: `VerifyReport`'s fields plus the precision and the bar.

    Attributes:
        path, precision, max_abs_error, mean_abs_error, atol, min_agreement, agreement,
        passed (finite, max |err| <= atol, agreement >= min_agreement and metric drop <=
        max_metric_drop, each when set and measured), n_samples, metric_keras /
        metric_openvino (when `metric` and `labels` were given), max_metric_drop, judged_by
        (the bars applied, in words; for int8 `FINITE_ONLY` when nothing but finiteness could
        be judged).
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
    metric_openvino: float | None = None
    max_metric_drop: float | None = None
    judged_by: str = ""

    def __str__(self) -> str:
        text = (
            f"{'PASS' if self.passed else 'FAIL'} {self.path} [{self.precision}]: max |err| "
            f"{self.max_abs_error:.3e}, mean |err| {self.mean_abs_error:.3e}, atol {self.atol:g}"
        )
        if self.agreement is not None:
            text += f", argmax agreement {self.agreement:.4f}"
        if self.min_agreement is not None:
            text += f" (min {self.min_agreement:g})"
        if self.metric_keras is not None:
            text += f", metric keras {self.metric_keras:.4f} / openvino {self.metric_openvino:.4f}"
        if self.judged_by:
            text += f"; judged by {self.judged_by}"
        return text


def verify_openvino(
    model,
    path: str | os.PathLike,
    inputs,
    *,
    precision: str = "f32",
    atol: float | None = None,
    min_agreement: float | None = None,
    labels=None,
    metric: Callable | None = None,
    max_metric_drop: float | None = None,
    expected: Mapping[str, np.ndarray] | None = None,
    raise_on_fail: bool = False,
) -> OpenVINOVerifyReport:
    """Compare an OpenVINO IR / ONNX file, run in a fresh OpenVINO process, with Keras.

    Args:
        model: the Keras model the file came from.
        path: IR directory, `.xml` or `.onnx` file.
        inputs: samples: one array, a list in input order, or a dict by input name.
        precision: "f32", "bf16" or "int8".
        atol: largest tolerated |OpenVINO - Keras|; None: `TOLERANCES[precision]`.
        min_agreement: smallest tolerated argmax agreement (outputs with > 1 channel); None:
            `INT8_MIN_AGREEMENT` for int8, unchecked otherwise.
        labels / metric: `metric(labels, outputs) -> float` (higher is better) on Keras and
            OpenVINO outputs.
        max_metric_drop: largest tolerated metric drop (Keras - OpenVINO) when a metric is
            given; None: `INT8_MAX_METRIC_DROP` for int8, unchecked otherwise.
        expected: Keras outputs already computed ({output name: array}).
        raise_on_fail: raise `VerificationError` instead of returning a failed report.
    """
    from dlmodels.export.verify import (
        INT8_MAX_METRIC_DROP,
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
    got = openvino_predict(path, inputs, precision=precision, fresh_process=True)
    judged = judge_outputs(
        expected,
        got,
        where=f"{path} [OpenVINO {precision}]",
        atol=atol,
        min_agreement=min_agreement,
        labels=labels,
        metric=metric,
        max_metric_drop=max_metric_drop,
    )
    metric_openvino = judged.pop("metric_runtime")
    report = OpenVINOVerifyReport(
        path=str(path),
        precision=precision,
        atol=atol,
        n_samples=_n_samples(inputs),
        min_agreement=min_agreement,
        metric_openvino=metric_openvino,
        max_metric_drop=max_metric_drop,
        **judged,
    )
    if raise_on_fail and not report.passed:
        raise VerificationError(str(report))
    return report

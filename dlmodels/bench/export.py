"""Every deployment precision of one model, timed side by side against the machine's peak.

In one run for one model (random weights: latency does not depend on them): TensorFlow
(`tf.function`), onnxruntime fp32 / static int8 (QDQ, `dlmodels.export.quantize`) / fp16
(`dlmodels.export.fp16`), OpenVINO fp32 / bf16 (IR from the same ONNX file) / int8 (the same QDQ
file, and an IR quantized by NNCF on the same calibration set,
`dlmodels.export.openvino.quantize_openvino`), at batch 1 and 32, with fixed threads, warm-up,
interleaved rounds, median and p90. The OpenVINO rows run models compiled for the timed batch
(static shapes, `--openvino-batch static`, the default; `dynamic` compiles once for any batch).
Each row reports achieved GOP/s (2 x MACs per image x batch / median latency; MACs from
`dlmodels.bench.flops.count_macs`; `effective_gops` from its effective count, which leaves out
convolution taps that read padding) against a peak measured in the same run: a large square
MatMul in the same runtime and precision (onnxruntime MatMul fp32 / fp16, MatMulInteger
u8 x s8 for int8, OpenVINO MatMul f32 / bf16), with the same threads. Each row also carries its
max |err| and argmax agreement against Keras on the timed batch. Results go to
`benchmarks/results/export_<model>.json` with the load average before and after (the machine
is shared: read the numbers with it), the int8 file's quantization settings with the share of
ops that run in int8 (`dlmodels.export.quantize.quantized_ops`) and, with `--profile`, where the
time goes: onnxruntime's profiler per op type, fp32 and int8 side by side (`profile_ort`,
`compare_profiles`).

    python -m dlmodels.bench.export --model resnet50 --profile
    python -m dlmodels.bench.export --model unet --iters 50
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from dlmodels.errors import UserError

MODELS = {
    "resnet50": {"input_shape": (224, 224, 3), "num_classes": 1000},
    "unet": {
        "input_shape": (128, 128, 3),
        "num_classes": 4,
        "depth": 4,
        "base_filters": 32,
        "upsampling": "bilinear",
    },
    "deeplabv3plus": {"input_shape": (256, 256, 3), "num_classes": 21, "output_stride": 16},
}
"""Benchmarked models: registry name -> builder arguments (the U-Net of FIELD_NOTES)."""

RUNTIMES = (
    ("tf", "TensorFlow tf.function", "fp32"),
    ("ort_fp32", "onnxruntime fp32", "fp32"),
    ("ort_int8", "onnxruntime static int8 (QDQ U8S8 per-channel)", "int8"),
    ("ort_fp16", "onnxruntime fp16 (fp32 IO)", "fp16"),
    ("openvino_fp32", "OpenVINO IR, INFERENCE_PRECISION_HINT f32", "fp32"),
    ("openvino_bf16", "OpenVINO IR, INFERENCE_PRECISION_HINT bf16", "bf16"),
    ("openvino_int8", "OpenVINO on the onnxruntime QDQ int8 file", "int8"),
    ("openvino_int8_nncf", "OpenVINO int8 quantized by NNCF on the calibration set", "int8"),
)
"""(key, description, precision) of every row, in table order."""

_MODULES = {"deeplabv3plus": "dlmodels.models.deeplab"}

DEFAULT_OUT_DIR = Path("benchmarks/results")


def _log(verbose, *parts):
    if verbose:
        print(*parts, flush=True)


def build_model(name: str, model_kwargs: Mapping | None = None):
    """The registry model `name` with `MODELS[name]` arguments updated by `model_kwargs`."""
    import importlib

    import dlmodels.models as registry

    if name not in MODELS:
        raise UserError(f"--model {name!r} is not benchmarked; choose one of {list(MODELS)}")
    if name not in registry.list() and name in _MODULES:
        # A model module the registry package does not import (yet).
        with contextlib.suppress(ImportError):
            importlib.import_module(_MODULES[name])
    if name not in registry.list():
        raise UserError(
            f"model {name!r} is not in this dlmodels registry (has {registry.list()}); it "
            "cannot be benchmarked here"
        )
    kwargs = {**MODELS[name], **dict(model_kwargs or {})}
    return registry.get(name, **kwargs), kwargs


def resolve_model(model, model_kwargs: Mapping | None = None):
    """(keras model, builder kwargs, name, weights) for what `run` benchmarks.

    `model`: a key of `MODELS` (built with random weights), a `keras.Model`, or the path of a
    `.keras` file (loaded with `safe_mode=True` by `dlmodels.load_model`, which registers the
    dlmodels layers, losses and metrics first). The model must take one input with every
    dimension but the batch fixed (the calibration images and the MAC count need them) and
    give one output (the parity columns compare one array)."""
    import keras

    import dlmodels

    if isinstance(model, keras.Model):
        built, kwargs, name, weights = model, {}, model.name, "the given model's"
    elif isinstance(model, os.PathLike) or (isinstance(model, str) and model.endswith(".keras")):
        path = Path(model)
        if not path.is_file():
            raise UserError(
                f"no .keras file at {path}: pass a saved model or one of {list(MODELS)}"
            )
        if model_kwargs:
            raise UserError("model_kwargs only apply to the built-in models, not to a .keras file")
        try:
            built = dlmodels.load_model(path, safe_mode=True)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise UserError(
                f"cannot load {path} as a Keras model ({type(err).__name__}: {first[:300]}); "
                "custom layers must be registered (keras.saving.register_keras_serializable) "
                "and imported before the benchmark runs"
            ) from err
        kwargs, name, weights = {"file": str(path)}, path.stem, f"from {path.name}"
    elif isinstance(model, str):
        built, kwargs = build_model(model, model_kwargs)
        name, weights = model, None
    else:
        raise UserError(
            f"model must be one of {list(MODELS)}, a keras.Model or a .keras path, got "
            f"{type(model).__name__}"
        )
    shape = tuple(built.inputs[0].shape) if len(built.inputs) == 1 else None
    if shape is None or len(shape) < 2 or any(d is None for d in shape[1:]):
        got = [tuple(i.shape) for i in built.inputs]
        raise UserError(
            f"{name}: the export benchmark takes a model with one input whose dimensions, "
            f"batch aside, are fixed; it has inputs {got}. Save the model with a fixed input "
            "size (e.g. keras.Input((224, 224, 3)))"
        )
    if len(built.outputs) != 1:
        raise UserError(
            f"{name}: the export benchmark compares one output with Keras, but the model has "
            f"{len(built.outputs)} outputs; benchmark keras.Model(model.inputs, "
            "model.outputs[0]) (the head you deploy)"
        )
    return built, kwargs, name, weights


# -- peaks ---------------------------------------------------------------------------------


def _matmul_onnx(path: Path, n: int, kind: str) -> None:
    """A one-node graph y = x @ W with W (n, n) constant; kind: fp32 | fp16 | int8."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if kind == "int8":
        w = numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "W")
        node = helper.make_node("MatMulInteger", ["x", "W"], ["y"])
        x_type, y_type = TensorProto.UINT8, TensorProto.INT32
    else:
        dtype = np.float16 if kind == "fp16" else np.float32
        w = numpy_helper.from_array(rng.standard_normal((n, n)).astype(dtype), "W")
        node = helper.make_node("MatMul", ["x", "W"], ["y"])
        x_type = y_type = TensorProto.FLOAT16 if kind == "fp16" else TensorProto.FLOAT
    graph = helper.make_graph(
        [node],
        "matmul_peak",
        [helper.make_tensor_value_info("x", x_type, [n, n])],
        [helper.make_tensor_value_info("y", y_type, [n, n])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def measure_peaks(
    *, n: int = 1024, threads: int, iters: int = 10, warmup: int = 3, openvino: bool = True
) -> dict[str, dict]:
    """GOP/s of an n x n x n MatMul (2 n^3 operations) in each runtime and precision.

    Returns:
        key -> {"gops" (from the best call), "gops_median", "best_ms", "p50_ms", "n", "iters",
        "what"} for ort_fp32, ort_fp16, ort_int8 and, with OpenVINO installed, openvino_fp32
        and openvino_bf16 (when the CPU supports bf16).
    """
    from dlmodels.bench.harness import ort_predictor

    ops = 2.0 * n**3
    rng = np.random.default_rng(1)
    out: dict[str, dict] = {}

    def record(key, fn, x, what):
        for _ in range(max(warmup, 0)):
            fn(x)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
        best, median = min(times), float(np.median(times))
        # The peak is what the machine can do: the best call, not the median (on a shared
        # machine the median of a short kernel measures the neighbours as much as the CPU).
        out[key] = {
            "gops": ops / (best * 1e9),
            "gops_median": ops / (median * 1e9),
            "best_ms": best * 1e3,
            "p50_ms": median * 1e3,
            "n": n,
            "iters": iters,
            "what": what,
        }

    with tempfile.TemporaryDirectory(prefix="dlmodels-peak-") as tmp:
        files = {}
        for kind in ("fp32", "fp16", "int8"):
            files[kind] = Path(tmp) / f"matmul_{kind}.onnx"
            _matmul_onnx(files[kind], n, kind)
        xf = rng.standard_normal((n, n)).astype(np.float32)
        record("ort_fp32", ort_predictor(files["fp32"], threads), xf, "onnxruntime MatMul fp32")
        record(
            "ort_fp16",
            ort_predictor(files["fp16"], threads),
            xf.astype(np.float16),
            "onnxruntime MatMul fp16",
        )
        record(
            "ort_int8",
            ort_predictor(files["int8"], threads),
            rng.integers(0, 256, (n, n), dtype=np.uint8),
            "onnxruntime MatMulInteger u8 x s8 -> s32",
        )
        if openvino:
            from dlmodels.export import openvino as ovx

            record(
                "openvino_fp32",
                ovx.OpenVINOModel(files["fp32"], precision="f32", threads=threads),
                xf,
                "OpenVINO MatMul f32",
            )
            if ovx.supports_bf16():
                record(
                    "openvino_bf16",
                    ovx.OpenVINOModel(files["fp32"], precision="bf16", threads=threads),
                    xf,
                    "OpenVINO MatMul bf16 (fp32 graph, bf16 hint)",
                )
    return out


def _peak_for(key: str, precision: str, peaks: Mapping[str, dict]) -> tuple[str | None, float]:
    """Which measured peak a row is judged against: the same precision's MatMul, the fastest
    runtime's where several measured it (the machine's limit, not one library's)."""
    candidates = {
        "fp32": ("ort_fp32", "openvino_fp32"),
        "fp16": ("ort_fp16",),
        "int8": ("ort_int8",),
        "bf16": ("openvino_bf16",),
    }[precision]
    best = max((k for k in candidates if k in peaks), key=lambda k: peaks[k]["gops"], default=None)
    return best, (peaks[best]["gops"] if best else float("nan"))


# -- where the time goes ---------------------------------------------------------------------

_OPT_LEVELS = ("disable", "basic", "extended", "all")


def profile_ort(
    onnx_path: str | os.PathLike,
    inputs,
    *,
    threads: int | None = None,
    iters: int = 10,
    warmup: int = 3,
    optimization: str = "all",
) -> dict:
    """Per-op-type time of one onnxruntime CPU session, from onnxruntime's own profiler.

    The session runs with `SessionOptions.enable_profiling`; every node's `*_kernel_time` event
    of the timed calls (the warm-up calls are left out) is summed by the op type onnxruntime
    actually ran (after its graph optimizations: `QLinearConv`, `Conv` / fused `FusedConv`,
    `NchwcConv`, `QuantizeLinear`, ...), so an int8 graph shows which ops stayed float and what
    the quantize / dequantize and layout changes cost.

    Args:
        onnx_path: the .onnx file.
        inputs: one array (single-input graphs) or a dict by input name.
        threads: intra-op threads (None: onnxruntime's default).
        iters: profiled calls (averaged).
        warmup: unprofiled calls first (the profiler starts after them).
        optimization: graph optimization level: "disable", "basic", "extended" or "all".

    Returns:
        {"kernel_ms_per_call": sum of kernel times per call, "wall_ms_per_call": mean wall time
        of a profiled call, "iters", "optimization", "by_op_type": {op type: {"ms_per_call",
        "share" (of kernel time), "nodes" (distinct nodes)}}} with op types by time, largest
        first.
    """
    import json

    import onnxruntime as ort

    if optimization not in _OPT_LEVELS:
        raise UserError(f"optimization must be one of {_OPT_LEVELS}, got {optimization!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise UserError(f"iters must be an int >= 1, got {iters!r}")
    level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    with tempfile.TemporaryDirectory(prefix="dlmodels-profile-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        feeds = dict(inputs) if isinstance(inputs, Mapping) else {sess.get_inputs()[0].name: inputs}
        for _ in range(max(warmup, 0)):
            sess.run(None, feeds)
        t0 = time.perf_counter()
        for _ in range(iters):
            sess.run(None, feeds)
        wall = (time.perf_counter() - t0) / iters
        events = json.loads(Path(sess.end_profiling()).read_text())
    # Only the node events inside the last `iters` runs count (not set-up, not warm-up).
    runs = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("cat") == "Session" and e.get("name") == "model_run"
    )[-iters:]
    by_op: dict[str, dict] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not any(lo <= e["ts"] <= hi for lo, hi in runs):
            continue
        op = e.get("args", {}).get("op_name", "?")
        entry = by_op.setdefault(op, {"us": 0.0, "nodes": set()})
        entry["us"] += float(e["dur"])
        entry["nodes"].add(e["name"])
    total_us = sum(v["us"] for v in by_op.values())
    table = {
        op: {
            "ms_per_call": v["us"] / iters / 1e3,
            "share": v["us"] / total_us if total_us else 0.0,
            "nodes": len(v["nodes"]),
        }
        for op, v in sorted(by_op.items(), key=lambda kv: -kv[1]["us"])
    }
    return {
        "kernel_ms_per_call": total_us / iters / 1e3,
        "wall_ms_per_call": wall * 1e3,
        "iters": iters,
        "optimization": optimization,
        "by_op_type": table,
    }


_OP_FAMILY = {
    "QLinearConv": "Conv",
    "FusedConv": "Conv",
    "NchwcConv": "Conv",
    "ConvInteger": "Conv",
    "QLinearMatMul": "MatMul",
    "MatMulInteger": "MatMul",
    "FusedMatMul": "MatMul",
    "FusedGemm": "Gemm",
    "QGemm": "Gemm",
    "QLinearAdd": "Add",
    "QLinearMul": "Mul",
    "QLinearConcat": "Concat",
    "QLinearGlobalAveragePool": "GlobalAveragePool",
    "QLinearAveragePool": "AveragePool",
    "NhwcMaxPool": "MaxPool",
    "NchwcMaxPool": "MaxPool",
    "Upsample": "Resize",
    "NchwcUpsample": "Resize",
    "QuantizeLinear": "Quantize / Dequantize",
    "DequantizeLinear": "Quantize / Dequantize",
    "DynamicQuantizeLinear": "Quantize / Dequantize",
    "ReorderInput": "layout (NCHWc reorder)",
    "ReorderOutput": "layout (NCHWc reorder)",
}
"""onnxruntime's kernel op types -> the ONNX op they implement, to line fp32 and int8 up."""


def compare_profiles(fp32: Mapping, int8: Mapping) -> list[dict]:
    """fp32 and int8 `profile_ort` results side by side, by the ONNX op each kernel implements
    (`QLinearConv`, `NchwcConv` and `FusedConv` are all "Conv"), largest int8 time first.

    Returns:
        rows {"op", "fp32_ms", "int8_ms", "speedup" (fp32 / int8, None where one is 0),
        "int8_share", "int8_kernels"} per call.
    """
    table: dict[str, dict] = {}
    for key, prof in (("fp32", fp32), ("int8", int8)):
        for op, v in prof["by_op_type"].items():
            family = _OP_FAMILY.get(op, op)
            row = table.setdefault(
                family, {"op": family, "fp32_ms": 0.0, "int8_ms": 0.0, "int8_kernels": []}
            )
            row[f"{key}_ms"] += v["ms_per_call"]
            if key == "int8":
                row["int8_kernels"].append(op)
    total = sum(r["int8_ms"] for r in table.values()) or 1.0
    rows = sorted(table.values(), key=lambda r: (-r["int8_ms"], -r["fp32_ms"]))
    for r in rows:
        r["speedup"] = r["fp32_ms"] / r["int8_ms"] if r["fp32_ms"] and r["int8_ms"] else None
        r["int8_share"] = r["int8_ms"] / total
    return rows


# -- the benchmark ---------------------------------------------------------------------------


def _set_tf_threads(threads: int) -> str:
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        return f"intra-op {threads}, inter-op 1"
    except RuntimeError:  # TensorFlow already initialized (e.g. in a test process)
        return (
            f"TensorFlow already initialized: intra-op "
            f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'}"
        )


NNCF_SETTINGS = {"preset": "mixed", "fast_bias_correction": True}
"""`quantize_openvino` settings of the openvino_int8_nncf row: NNCF's defaults. Timed against
them (interleaved, shared 2-core machine): the "performance" preset was as fast on ResNet-50 and
slower or as fast on the U-Net and DeepLabV3+; the full bias correction as fast on ResNet-50."""


def _nncf_version() -> str | None:
    """NNCF's version, None where it cannot be imported."""
    try:
        from importlib import metadata

        import nncf  # noqa: F401

        return metadata.version("nncf")
    except Exception:
        return None


def _export_all(
    model, tmp: Path, calibration: np.ndarray, verbose: bool
) -> tuple[dict, dict, dict]:
    """Every artifact of `model` in `tmp`: (paths, seconds per export, int8 settings).

    The NNCF IR ("openvino_int8_nncf") is left out when NNCF is not installed."""
    from dlmodels import export
    from dlmodels.export import fp16
    from dlmodels.export import openvino as ovx

    paths, seconds, int8_settings = {}, {}, {}

    def int8():
        report = export.quantize_with_report(
            paths["onnx"], tmp / "model.int8.onnx", calibration=calibration, batch_size=8
        )
        int8_settings.update(report.settings())
        return report.path

    def step(key, fn):
        t0 = time.perf_counter()
        paths[key] = fn()
        seconds[key] = time.perf_counter() - t0
        _log(verbose, f"  {key}: {seconds[key]:.1f} s")

    step("onnx", lambda: export.to_onnx(model, tmp / "model.onnx"))
    step("int8", int8)
    step("fp16", lambda: fp16.to_fp16(paths["onnx"], tmp / "model.fp16.onnx"))
    step("openvino_ir", lambda: ovx.to_openvino(paths["onnx"], tmp / "openvino").parent)
    if _nncf_version() is not None:
        step(
            "openvino_int8_nncf",
            lambda: (
                ovx.quantize_openvino(
                    paths["openvino_ir"],
                    tmp / "openvino_int8_nncf",
                    calibration,
                    # The samples the ORT int8 file was calibrated on (its default cap).
                    subset_size=min(len(calibration), 256),
                    **NNCF_SETTINGS,
                ).parent
            ),
        )
    return paths, seconds, int8_settings


def _predictors(
    model, paths: Mapping[str, Path], threads: int, openvino_batch: int | None = None
) -> dict:
    """Every runtime's predictor; the OpenVINO ones compiled for a static batch when
    `openvino_batch` is an int (`OpenVINOModel(batch_size=...)`), else for any batch."""
    from dlmodels.bench.harness import keras_predictor, ort_predictor

    return {
        "tf": keras_predictor(model),
        "ort_fp32": ort_predictor(paths["onnx"], threads),
        "ort_int8": ort_predictor(paths["int8"], threads),
        "ort_fp16": ort_predictor(paths["fp16"], threads),
        **_openvino_predictors(paths, threads, openvino_batch),
    }


def _openvino_predictors(paths: Mapping[str, Path], threads: int, batch: int | None) -> dict:
    from dlmodels.export import openvino as ovx

    def compiled(key, precision):
        return ovx.OpenVINOModel(paths[key], precision=precision, threads=threads, batch_size=batch)

    preds = {
        "openvino_fp32": compiled("openvino_ir", "f32"),
        "openvino_int8": compiled("int8", "int8"),
    }
    if ovx.supports_bf16():
        preds["openvino_bf16"] = compiled("openvino_ir", "bf16")
    if "openvino_int8_nncf" in paths:
        preds["openvino_int8_nncf"] = compiled("openvino_int8_nncf", "int8")
    return preds


_SKIPPED = {
    "openvino_bf16": "CPU without bf16 support",
    "openvino_int8_nncf": "nncf not installed (pip install 'dlmodels[openvino]')",
}


def _openvino_int8_info(predictors: Mapping) -> dict:
    """Per OpenVINO int8 row: the runtime precision of every Convolution of the compiled model
    (how many really run in u8/i8) and, for the NNCF IR, the settings NNCF recorded in the
    file that ran (`dlmodels.export.openvino.nncf_settings`)."""
    from dlmodels.export import openvino as ovx

    out = {}
    for key in ("openvino_int8", "openvino_int8_nncf"):
        if key in predictors:
            out[key] = {"convolutions": predictors[key].runtime_precisions().get("Convolution")}
    if "openvino_int8_nncf" in out:
        out["openvino_int8_nncf"]["nncf"] = ovx.nncf_settings(predictors["openvino_int8_nncf"].path)
    return out


def _parity(reference: np.ndarray, got: np.ndarray) -> dict:
    diff = np.abs(got.astype(np.float64) - reference.astype(np.float64))
    out = {
        "max_abs_keras": float(np.abs(reference).max()),
        "max_abs_error_vs_keras": float(diff.max()),
        "mean_abs_error_vs_keras": float(diff.mean()),
    }
    if reference.ndim >= 2 and reference.shape[-1] > 1:
        out["argmax_agreement"] = float(np.mean(got.argmax(-1) == reference.argmax(-1)))
    return out


def run(
    model_name="resnet50",
    *,
    output: str | os.PathLike | None = "default",
    batches: Sequence[int] = (1, 32),
    iters: int = 30,
    iters_large: int = 6,
    warmup: int = 3,
    rounds: int = 3,
    threads: int | None = None,
    model_kwargs: Mapping | None = None,
    calibration_samples: int = 32,
    peak_size: int = 1024,
    peak_iters: int = 20,
    seed: int = 0,
    profile: bool = False,
    profile_iters: int = 5,
    openvino_batch: str = "static",
    verbose: bool = True,
) -> dict:
    """Export one model to every precision, time each runtime at each batch, write the JSON.

    Args:
        model_name: a key of `MODELS` (built with random weights: latency does not depend on
            them), a `keras.Model`, or the path of a `.keras` file (`resolve_model`).
        output: the JSON file; "default": `benchmarks/results/export_<model>.json`; None: none.
        batches: batch sizes timed (each with its own interleaved rounds).
        iters: timed calls per runtime at batch 1; `iters_large` at larger batches.
        warmup: untimed calls per runtime and batch.
        rounds: interleaved rounds (`dlmodels.bench.compare_predictors`).
        threads: intra-op threads of every runtime (None: the CPUs this process may use).
        model_kwargs: overrides of `MODELS[model_name]` (e.g. a small input for a smoke test).
        calibration_samples: random images the int8 ranges are calibrated on (latency only; the
            QDQ file and the NNCF IR on the same images).
        peak_size: n of the n x n x n MatMul peaks.
        peak_iters: timed MatMul calls per peak.
        seed: weights and inputs.
        profile: also profile onnxruntime fp32 and int8 at each batch (`profile_ort`, after the
            timings, so the profiler never slows a timed call) and put the per-op-type times
            side by side (`compare_profiles`) under "profiles".
        profile_iters: profiled calls per runtime and batch.
        openvino_batch: "static" (default): at each batch the OpenVINO rows run models compiled
            for that batch (`OpenVINOModel(batch_size=batch)`, what a deployment with a known
            batch does; the IR and ONNX files keep their dynamic batch); "dynamic": compiled
            once for any batch. onnxruntime and TF always run the dynamic-batch files
            (onnxruntime fp32 with the batch fixed in the file measured within 1% here).

    Returns:
        The payload written: settings, MACs, peaks, load averages, the int8 file's quantization
        settings with the share of ops quantized ("int8_quantization"), the runtime precisions
        of the OpenVINO int8 rows' convolutions and NNCF's settings ("openvino_int8"), optional
        "profiles",
        and one row per (runtime, batch) with p50/p90/mean ms, images/s, GOP/s and fraction
        of the peak (nominal and effective MACs), speed-up over onnxruntime fp32 and TF, and
        parity against Keras on the timed batch.
    """
    import keras

    from dlmodels._progress import track
    from dlmodels.bench.flops import count_macs
    from dlmodels.bench.harness import compare_predictors, machine_info, write_results
    from dlmodels.runtime import default_threads

    checked = (("iters", iters), ("iters_large", iters_large), ("rounds", rounds))
    checked += (("profile_iters", profile_iters),)
    for name, value in checked:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be an int >= 1, got {value!r}")
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise UserError(f"batches must be ints >= 1, got {list(batches)!r}")
    if openvino_batch not in ("static", "dynamic"):
        raise UserError(f"openvino_batch must be 'static' or 'dynamic', got {openvino_batch!r}")
    threads = default_threads() if threads is None else int(threads)
    load_before = list(os.getloadavg())
    tf_threads = _set_tf_threads(threads)
    keras.utils.set_random_seed(seed)
    model, kwargs, model_name, weights = resolve_model(model_name, model_kwargs)
    input_shape = tuple(model.inputs[0].shape[1:])
    macs = count_macs(model, input_shape)
    effective_macs = count_macs(model, input_shape, effective=True)
    _log(
        verbose,
        f"{model_name}: {model.count_params():,} params, {macs / 1e9:.3f} GMACs/image "
        f"({effective_macs / 1e9:.3f} effective: convolution taps on padding left out)",
    )
    rng = np.random.default_rng(seed)
    calibration = rng.uniform(0, 1, (calibration_samples, *input_shape)).astype(np.float32)
    _log(verbose, "peaks ...")
    peaks_before = measure_peaks(n=peak_size, threads=threads, iters=peak_iters)
    for k, v in peaks_before.items():
        _log(verbose, f"  {k}: {v['gops']:.0f} GOP/s")
    rows, profiles = [], {}
    with tempfile.TemporaryDirectory(prefix="dlmodels-bench-export-") as tmp:
        _log(verbose, "exports ...")
        paths, export_seconds, int8_settings = _export_all(model, Path(tmp), calibration, verbose)
        cov = int8_settings["coverage"]
        _log(
            verbose,
            f"  int8: {cov['int8_nodes']}/{cov['int8_nodes'] + cov['float_nodes']} nodes in int8 "
            f"({cov['compute_int8']}/{cov['compute_total']} Conv/MatMul/Gemm)",
        )
        sizes = {
            "onnx": paths["onnx"].stat().st_size,
            "int8": paths["int8"].stat().st_size,
            "fp16": paths["fp16"].stat().st_size,
            "openvino_ir": sum(p.stat().st_size for p in paths["openvino_ir"].iterdir()),
        }
        if "openvino_int8_nncf" in paths:
            sizes["openvino_int8_nncf"] = sum(
                p.stat().st_size for p in paths["openvino_int8_nncf"].iterdir()
            )
        artifact_of = {
            "tf": None,
            "ort_fp32": "onnx",
            "ort_int8": "int8",
            "ort_fp16": "fp16",
            "openvino_fp32": "openvino_ir",
            "openvino_bf16": "openvino_ir",
            "openvino_int8": "int8",
            "openvino_int8_nncf": "openvino_int8_nncf",
        }
        # Static: the OpenVINO models are compiled for the first batch here and recompiled
        # only when the timed batch changes (never a dynamic compile thrown away unused).
        static = openvino_batch == "static"
        predictors = _predictors(model, paths, threads, batches[0] if static else None)
        openvino_int8 = _openvino_int8_info(predictors)
        for batch in track(list(batches), f"timing {model_name}"):
            if static and predictors["openvino_fp32"].batch_size != batch:
                for key in [k for k in predictors if k.startswith("openvino_")]:
                    del predictors[key]  # the previous batch's compiled models, freed first
                predictors.update(_openvino_predictors(paths, threads, batch))
            x = rng.uniform(0, 1, (batch, *input_shape)).astype(np.float32)
            reference = np.asarray(model(x, training=False))
            n = iters if batch == 1 else iters_large
            _log(verbose, f"batch {batch}: {n} timed calls per runtime ...")
            timings = compare_predictors(
                predictors, x, warmup=warmup, iters=n, rounds=min(rounds, n)
            )
            base_ort = timings["ort_fp32"]["p50_ms"]
            base_tf = timings["tf"]["p50_ms"]
            for key, description, precision in RUNTIMES:
                if key not in timings:
                    rows.append({"runtime": key, "batch": batch, "skipped": _SKIPPED[key]})
                    continue
                t = timings[key]
                gops = 2.0 * macs * batch / (t["p50_ms"] * 1e6)
                effective_gops = 2.0 * effective_macs * batch / (t["p50_ms"] * 1e6)
                peak_key, peak = _peak_for(key, precision, peaks_before)
                art = artifact_of[key]
                row = {
                    "runtime": key,
                    "description": description,
                    "precision": precision,
                    "batch": batch,
                    **t,
                    "images_per_s": batch / (t["p50_ms"] / 1e3),
                    "gops": gops,
                    "peak": peak_key,
                    "peak_gops": peak,
                    "fraction_of_peak": gops / peak if peak == peak else None,
                    "effective_gops": effective_gops,
                    "fraction_of_peak_effective": effective_gops / peak if peak == peak else None,
                    "speedup_vs_ort_fp32": base_ort / t["p50_ms"],
                    "speedup_vs_tf": base_tf / t["p50_ms"],
                    "artifact": art,
                    "size_bytes": sizes.get(art) if art else None,
                    # OpenVINO: the batch the model was compiled for (None: any batch).
                    "compiled_batch": getattr(predictors[key], "batch_size", None),
                    **_parity(reference, np.asarray(predictors[key](x))),
                }
                rows.append(row)
                _log(
                    verbose,
                    f"  {key:18s} b{batch:<3d} p50 {t['p50_ms']:8.2f} ms  p90 "
                    f"{t['p90_ms']:8.2f}  {gops:6.0f} GOP/s  x{row['speedup_vs_ort_fp32']:.2f} "
                    f"vs ORT fp32  max|err| {row['max_abs_error_vs_keras']:.2e} (|keras| max "
                    f"{row['max_abs_keras']:.2e})",
                )
            if profile:
                prof = {
                    key: profile_ort(
                        paths[artifact_of[key]], x, threads=threads, iters=profile_iters
                    )
                    for key in ("ort_fp32", "ort_int8")
                }
                prof["by_op"] = compare_profiles(prof["ort_fp32"], prof["ort_int8"])
                profiles[f"batch_{batch}"] = prof
                for r in prof["by_op"][:6]:
                    speedup = f"x{r['speedup']:.2f}" if r["speedup"] else "-"
                    _log(
                        verbose,
                        f"    {r['op']:24s} fp32 {r['fp32_ms']:8.2f} ms  int8 {r['int8_ms']:8.2f}"
                        f" ms ({100 * r['int8_share']:4.1f}% of int8)  {speedup}",
                    )
    # Peaks again after the model timings: on a shared machine the load changes during the run,
    # and a peak measured in a busy minute would flatter every row; each row is judged against
    # the higher of the two.
    _log(verbose, "peaks again ...")
    peaks_after = measure_peaks(n=peak_size, threads=threads, iters=peak_iters)
    peaks = {
        k: max(v, peaks_after.get(k, v), key=lambda p: p["gops"]) for k, v in peaks_before.items()
    }
    for row in rows:
        if "skipped" in row:
            continue
        peak_key, peak = _peak_for(row["runtime"], row["precision"], peaks)
        row.update(
            peak=peak_key,
            peak_gops=peak,
            fraction_of_peak=row["gops"] / peak if peak == peak else None,
            fraction_of_peak_effective=row["effective_gops"] / peak if peak == peak else None,
        )
    payload = {
        "benchmark": "export",
        "model": model_name,
        "builder_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
        "params": int(model.count_params()),
        "macs_per_image": int(macs),
        "effective_macs_per_image": int(effective_macs),
        "weights": f"{weights or f'random (seed {seed})'}; int8 calibrated on "
        f"{calibration_samples} random images",
        "threads": {"runtimes": threads, "tensorflow": tf_threads},
        "openvino_batch": openvino_batch,
        "timing": {
            "warmup": warmup,
            "iters_batch1": iters,
            "iters_larger_batches": iters_large,
            "rounds": rounds,
            "statistic": "median (p50) and p90 of per-call wall time, interleaved rounds",
        },
        "gops_definition": "gops: 2 x macs_per_image x batch / p50 latency, macs_per_image "
        "counting every kernel tap of every conv output position (the papers' convention; "
        "conv, transposed conv, depthwise conv and matmul MACs, dlmodels.bench.flops."
        "count_macs; a dilated conv counts its own output positions, not those of "
        "TensorFlow's SpaceToBatchND lowering); effective_gops: the same with "
        "effective_macs_per_image, which leaves out the (output position, kernel tap) pairs "
        "of Conv2D / depthwise convs whose input coordinate falls in padding (SAME or explicit "
        "padding, zero Pad ops; e.g. ASPP's atrous taps beyond a small feature map), "
        "count_macs(effective=True); fraction_of_peak and fraction_of_peak_effective divide "
        "each by peak_gops",
        "peak_definition": f"{peak_size}^3 MatMul, 2 n^3 ops / best of {peak_iters} calls, "
        "measured before and after the model timings; the higher is used",
        "peaks": peaks,
        "peaks_before": peaks_before,
        "peaks_after": peaks_after,
        "export_seconds": export_seconds,
        "int8_quantization": int8_settings,
        "openvino_int8": openvino_int8,
        **({"profiles": profiles} if profile else {}),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "rows": rows,
        "machine": {**machine_info(), "openvino": _openvino_version(), "nncf": _nncf_version()},
    }
    if output == "default":
        output = DEFAULT_OUT_DIR / f"export_{model_name}.json"
    if output is not None:
        write_results(output, payload)
        _log(verbose, f"wrote {output}")
    return payload


ACCURACY_TRAINING = {
    "image_size": (64, 64),
    "epochs": 7,
    "batch_size": 16,
    "train_samples": 2000,
    "learning_rate": 3e-3,
    "model_kwargs": {"depth": 3, "base_filters": 16, "upsampling": "bilinear"},
}
"""The accuracy side: the demo's U-Net with the demo's training settings (`demo.DEMO_CONFIG`)
on `dlmodels.data.shapes`."""


def accuracy(
    *,
    output: str | os.PathLike | None = "default",
    training: Mapping | None = None,
    test_samples: int = 200,
    calibration_samples: int = 64,
    threads: int | None = None,
    seed: int = 0,
    verbose: bool = True,
) -> dict:
    """Task-metric cost of every precision: a U-Net trained briefly on the synthetic shapes,
    exported like `run` does, and its held-out mIoU computed from each runtime's outputs.

    int8 is calibrated on train-split images, the metric is computed on the test split (never
    seen in training or calibration). Rows: runtime, precision, mIoU, drop in points
    (100 x (keras - runtime)), max |err| and argmax agreement against Keras.

    Args:
        output: the JSON file; "default": `benchmarks/results/export_unet_accuracy.json`.
        training: overrides of `ACCURACY_TRAINING`.
        test_samples / calibration_samples: held-out and calibration images.
        threads: intra-op threads of the runtimes (None: the CPUs this process may use).
        seed: data and initialization seed.
    """
    from dlmodels import demo
    from dlmodels.bench.harness import keras_predictor, machine_info, write_results
    from dlmodels.data import shapes
    from dlmodels.runtime import default_threads

    unknown = sorted(set(training or {}) - set(ACCURACY_TRAINING))
    if unknown:
        raise UserError(
            f"unknown training settings {unknown}; known: {', '.join(ACCURACY_TRAINING)}"
        )
    settings = {**ACCURACY_TRAINING, **dict(training or {})}
    threads = default_threads() if threads is None else int(threads)
    load_before = list(os.getloadavg())
    result = demo.train_segmentation(
        model_name="unet",
        image_size=tuple(settings["image_size"]),
        epochs=settings["epochs"],
        batch_size=settings["batch_size"],
        train_samples=settings["train_samples"],
        learning_rate=settings["learning_rate"],
        model_kwargs=dict(settings["model_kwargs"]),
        strategy="default",
        seed=seed,
        progress=False,
    )
    model = result.model
    size = tuple(settings["image_size"])
    x_test, y_test = shapes.load("test", image_size=size, num_samples=test_samples, seed=seed)
    calib, _ = shapes.load("train", image_size=size, num_samples=calibration_samples, seed=seed)
    num_classes = int(model.outputs[0].shape[-1])

    def miou(outputs):
        return demo.segmentation_miou(y_test, outputs, num_classes=num_classes)

    rows = []
    with tempfile.TemporaryDirectory(prefix="dlmodels-bench-acc-") as tmp:
        paths, _, int8_settings = _export_all(model, Path(tmp), calib.astype(np.float32), verbose)
        predictors = _predictors(model, paths, threads)
        predictors = {"tf": keras_predictor(model), **predictors}
        openvino_int8 = _openvino_int8_info(predictors)
        reference = np.concatenate(
            [
                np.asarray(model(x_test[i : i + 32], training=False))
                for i in range(0, len(x_test), 32)
            ]
        )
        keras_miou = miou(reference)
        for key, description, precision in RUNTIMES:
            if key not in predictors:
                rows.append({"runtime": key, "skipped": _SKIPPED[key]})
                continue
            fn = predictors[key]
            got = np.concatenate(
                [np.asarray(fn(x_test[i : i + 32])) for i in range(0, len(x_test), 32)]
            )
            value = miou(got)
            rows.append(
                {
                    "runtime": key,
                    "description": description,
                    "precision": precision,
                    "miou": value,
                    "miou_drop_points": 100.0 * (keras_miou - value),
                    **_parity(reference, got),
                }
            )
            _log(verbose, f"  {key:18s} mIoU {value:.4f} (drop {rows[-1]['miou_drop_points']:.2f})")
    payload = {
        "benchmark": "export_accuracy",
        "model": "unet",
        "training": {**settings, "image_size": list(size)},
        "keras_miou": keras_miou,
        "int8_quantization": int8_settings,
        "openvino_int8": openvino_int8,
        "train_seconds": result.train_seconds,
        "data": f"dlmodels.data.shapes test split ({test_samples} images); int8 calibrated on "
        f"{calibration_samples} train-split images",
        "threads": threads,
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "rows": rows,
        "machine": {**machine_info(), "openvino": _openvino_version(), "nncf": _nncf_version()},
    }
    if output == "default":
        output = DEFAULT_OUT_DIR / "export_unet_accuracy.json"
    if output is not None:
        write_results(output, payload)
        _log(verbose, f"wrote {output}")
    return payload


def _openvino_version() -> str | None:
    try:
        from importlib import metadata

        return metadata.version("openvino")
    except Exception:
        return None


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="resnet50",
        help=f"one of {list(MODELS)} (random weights) or the path of a .keras model",
    )
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--iters-large", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--peak-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile onnxruntime fp32 and int8 per op type (onnxruntime's profiler)",
    )
    parser.add_argument("--profile-iters", type=int, default=5)
    parser.add_argument(
        "--openvino-batch",
        choices=("static", "dynamic"),
        default="static",
        help="compile the OpenVINO models for each timed batch (static, default) or once for "
        "any batch (dynamic)",
    )
    parser.add_argument(
        "--accuracy",
        action="store_true",
        help="instead of latency: train the demo U-Net briefly and report each precision's mIoU",
    )
    args = parser.parse_args(argv)
    if args.accuracy:
        accuracy(
            output=args.output if args.output is not None else "default",
            threads=args.threads,
            seed=args.seed,
        )
        return
    run(
        args.model,
        output=args.output if args.output is not None else "default",
        batches=args.batches,
        iters=args.iters,
        iters_large=args.iters_large,
        warmup=args.warmup,
        rounds=args.rounds,
        threads=args.threads,
        peak_size=args.peak_size,
        seed=args.seed,
        profile=args.profile,
        profile_iters=args.profile_iters,
        openvino_batch=args.openvino_batch,
    )


if __name__ == "__main__":
    main()

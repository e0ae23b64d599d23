"""Every deployment precision of one model, timed side by side against the machine's peak.

In one run for one model (random weights: latency does not depend on them): TensorFlow
(`tf.function`), onnxruntime fp32 / static int8 (QDQ, `dlmodels.export.quantize`) / fp16
(`dlmodels.export.fp16`), OpenVINO fp32 / bf16 (IR from the same ONNX file) / int8 (the same QDQ
file), at batch 1 and 32, with fixed threads, warm-up, interleaved rounds, median and p90.
Each row reports achieved GOP/s (2 x MACs per image x batch / median latency; MACs from
`dlmodels.bench.flops.count_macs`) against a peak measured in the same run: a large square
MatMul in the same runtime and precision (onnxruntime MatMul fp32 / fp16, MatMulInteger
u8 x s8 for int8, OpenVINO MatMul f32 / bf16), with the same threads. Each row also carries its
max |err| and argmax agreement against Keras on the timed batch. Results go to
`benchmarks/results/export_<model>.json` with the load average before and after (the machine
is shared: read the numbers with it).

    python -m dlmodels.bench.export --model resnet50
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


def _export_all(model, tmp: Path, calibration: np.ndarray, verbose: bool) -> tuple[dict, dict]:
    from dlmodels import export
    from dlmodels.export import fp16
    from dlmodels.export import openvino as ovx

    paths, seconds = {}, {}

    def step(key, fn):
        t0 = time.perf_counter()
        paths[key] = fn()
        seconds[key] = time.perf_counter() - t0
        _log(verbose, f"  {key}: {seconds[key]:.1f} s")

    step("onnx", lambda: export.to_onnx(model, tmp / "model.onnx"))
    step(
        "int8",
        lambda: export.quantize(
            paths["onnx"], tmp / "model.int8.onnx", calibration=calibration, batch_size=8
        ),
    )
    step("fp16", lambda: fp16.to_fp16(paths["onnx"], tmp / "model.fp16.onnx"))
    step("openvino_ir", lambda: ovx.to_openvino(paths["onnx"], tmp / "openvino").parent)
    return paths, seconds


def _predictors(model, paths: Mapping[str, Path], threads: int) -> dict:
    from dlmodels.bench.harness import keras_predictor, ort_predictor
    from dlmodels.export import openvino as ovx

    preds = {
        "tf": keras_predictor(model),
        "ort_fp32": ort_predictor(paths["onnx"], threads),
        "ort_int8": ort_predictor(paths["int8"], threads),
        "ort_fp16": ort_predictor(paths["fp16"], threads),
        "openvino_fp32": ovx.OpenVINOModel(paths["openvino_ir"], precision="f32", threads=threads),
        "openvino_int8": ovx.OpenVINOModel(paths["int8"], precision="int8", threads=threads),
    }
    if ovx.supports_bf16():
        preds["openvino_bf16"] = ovx.OpenVINOModel(
            paths["openvino_ir"], precision="bf16", threads=threads
        )
    return preds


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
    model_name: str = "resnet50",
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
    verbose: bool = True,
) -> dict:
    """Export one model to every precision, time each runtime at each batch, write the JSON.

    Args:
        model_name: a key of `MODELS`.
        output: the JSON file; "default": `benchmarks/results/export_<model>.json`; None: none.
        batches: batch sizes timed (each with its own interleaved rounds).
        iters: timed calls per runtime at batch 1; `iters_large` at larger batches.
        warmup: untimed calls per runtime and batch.
        rounds: interleaved rounds (`dlmodels.bench.compare_predictors`).
        threads: intra-op threads of every runtime (None: the CPUs this process may use).
        model_kwargs: overrides of `MODELS[model_name]` (e.g. a small input for a smoke test).
        calibration_samples: random images the int8 ranges are calibrated on (latency only).
        peak_size: n of the n x n x n MatMul peaks.
        peak_iters: timed MatMul calls per peak.
        seed: weights and inputs.

    Returns:
        The payload written: settings, MACs, peaks, load averages and one row per
        (runtime, batch) with p50/p90/mean ms, images/s, GOP/s, fraction of the peak, speed-up
        over onnxruntime fp32 and TF, and parity against Keras on the timed batch.
    """
    import keras

    from dlmodels.bench.flops import count_macs
    from dlmodels.bench.harness import compare_predictors, machine_info, write_results
    from dlmodels.runtime import default_threads

    for name, value in (("iters", iters), ("iters_large", iters_large), ("rounds", rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be an int >= 1, got {value!r}")
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise UserError(f"batches must be ints >= 1, got {list(batches)!r}")
    threads = default_threads() if threads is None else int(threads)
    load_before = list(os.getloadavg())
    tf_threads = _set_tf_threads(threads)
    keras.utils.set_random_seed(seed)
    model, kwargs = build_model(model_name, model_kwargs)
    input_shape = tuple(model.inputs[0].shape[1:])
    macs = count_macs(model, input_shape)
    _log(verbose, f"{model_name}: {model.count_params():,} params, {macs / 1e9:.3f} GMACs/image")
    rng = np.random.default_rng(seed)
    calibration = rng.uniform(0, 1, (calibration_samples, *input_shape)).astype(np.float32)
    _log(verbose, "peaks ...")
    peaks_before = measure_peaks(n=peak_size, threads=threads, iters=peak_iters)
    for k, v in peaks_before.items():
        _log(verbose, f"  {k}: {v['gops']:.0f} GOP/s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dlmodels-bench-export-") as tmp:
        _log(verbose, "exports ...")
        paths, export_seconds = _export_all(model, Path(tmp), calibration, verbose)
        sizes = {
            "onnx": paths["onnx"].stat().st_size,
            "int8": paths["int8"].stat().st_size,
            "fp16": paths["fp16"].stat().st_size,
            "openvino_ir": sum(p.stat().st_size for p in paths["openvino_ir"].iterdir()),
        }
        artifact_of = {
            "tf": None,
            "ort_fp32": "onnx",
            "ort_int8": "int8",
            "ort_fp16": "fp16",
            "openvino_fp32": "openvino_ir",
            "openvino_bf16": "openvino_ir",
            "openvino_int8": "int8",
        }
        predictors = _predictors(model, paths, threads)
        for batch in batches:
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
                    rows.append(
                        {"runtime": key, "batch": batch, "skipped": "CPU without bf16 support"}
                    )
                    continue
                t = timings[key]
                gops = 2.0 * macs * batch / (t["p50_ms"] * 1e6)
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
                    "speedup_vs_ort_fp32": base_ort / t["p50_ms"],
                    "speedup_vs_tf": base_tf / t["p50_ms"],
                    "artifact": art,
                    "size_bytes": sizes.get(art) if art else None,
                    **_parity(reference, np.asarray(predictors[key](x))),
                }
                rows.append(row)
                _log(
                    verbose,
                    f"  {key:14s} b{batch:<3d} p50 {t['p50_ms']:8.2f} ms  p90 "
                    f"{t['p90_ms']:8.2f}  {gops:6.0f} GOP/s  x{row['speedup_vs_ort_fp32']:.2f} "
                    f"vs ORT fp32  max|err| {row['max_abs_error_vs_keras']:.2e} (|keras| max "
                    f"{row['max_abs_keras']:.2e})",
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
        )
    payload = {
        "benchmark": "export",
        "model": model_name,
        "builder_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
        "params": int(model.count_params()),
        "macs_per_image": int(macs),
        "weights": f"random (seed {seed}); int8 calibrated on {calibration_samples} random images",
        "threads": {"runtimes": threads, "tensorflow": tf_threads},
        "timing": {
            "warmup": warmup,
            "iters_batch1": iters,
            "iters_larger_batches": iters_large,
            "rounds": rounds,
            "statistic": "median (p50) and p90 of per-call wall time, interleaved rounds",
        },
        "gops_definition": "2 x MACs per image x batch / p50 latency (MACs: conv + matmul)",
        "peak_definition": f"{peak_size}^3 MatMul, 2 n^3 ops / best of {peak_iters} calls, "
        "measured before and after the model timings; the higher is used",
        "peaks": peaks,
        "peaks_before": peaks_before,
        "peaks_after": peaks_after,
        "export_seconds": export_seconds,
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "rows": rows,
        "machine": {**machine_info(), "openvino": _openvino_version()},
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
        paths, _ = _export_all(model, Path(tmp), calib.astype(np.float32), verbose)
        predictors = _predictors(model, paths, threads)
        predictors = {"tf": keras_predictor(model), **predictors}
        reference = np.concatenate(
            [
                np.asarray(model(x_test[i : i + 32], training=False))
                for i in range(0, len(x_test), 32)
            ]
        )
        keras_miou = miou(reference)
        for key, description, precision in RUNTIMES:
            if key not in predictors:
                rows.append({"runtime": key, "skipped": "CPU without bf16 support"})
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
            _log(verbose, f"  {key:14s} mIoU {value:.4f} (drop {rows[-1]['miou_drop_points']:.2f})")
    payload = {
        "benchmark": "export_accuracy",
        "model": "unet",
        "training": {**settings, "image_size": list(size)},
        "keras_miou": keras_miou,
        "train_seconds": result.train_seconds,
        "data": f"dlmodels.data.shapes test split ({test_samples} images); int8 calibrated on "
        f"{calibration_samples} train-split images",
        "threads": threads,
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "rows": rows,
        "machine": {**machine_info(), "openvino": _openvino_version()},
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
    parser.add_argument("--model", default="resnet50", choices=list(MODELS))
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
    )


if __name__ == "__main__":
    main()

"""Timing primitives, predictors and machine description for the benchmarks."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from dlmodels.export._atomic import atomic_write_text


def _stats(samples_s: list[float]) -> dict:
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "mean_ms": float(np.mean(ms)),
        "iters": int(ms.size),
    }


def _time_calls(fn: Callable, inputs, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(inputs)
        samples.append(time.perf_counter() - t0)
    return samples


def measure_latency(fn: Callable, inputs, *, warmup: int = 5, iters: int = 30) -> dict:
    """Per-call latency of `fn(inputs)`.

    Args:
        fn: a predictor (e.g. from `keras_predictor` / `ort_predictor`); must block until the
            result is computed (both do: they return numpy arrays).
        inputs: what `fn` takes.
        warmup: untimed calls first (graph tracing, allocator and thread-pool start-up).
        iters: timed calls.

    Returns:
        {"p50_ms", "p90_ms", "mean_ms", "iters"}.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    for _ in range(max(warmup, 0)):
        fn(inputs)
    return _stats(_time_calls(fn, inputs, iters))


def keras_predictor(model) -> Callable:
    """The fair TensorFlow baseline: `tf.function(model(x, training=False))` without XLA.

    `model.predict` pays ~ms of per-call overhead (data adapter, callbacks) that serving code
    does not, which would flatter every other runtime.

    Args:
        model: a Keras model.

    Returns:
        `predict(x) -> numpy array` (or a list of arrays for multi-output models). `x` is one
        array, a list in `model.inputs` order, or a dict by input name.
    """
    import tensorflow as tf

    from dlmodels.export._signature import pack_inputs

    names = [t.name for t in getattr(model, "inputs", None) or []]

    @tf.function(jit_compile=False, reduce_retracing=True)
    def run(x):
        return model(x, training=False)

    def predict(x):
        if isinstance(x, Mapping):
            x = pack_inputs(model, [tf.convert_to_tensor(x[n]) for n in names])
        elif isinstance(x, list | tuple):
            x = pack_inputs(model, [tf.convert_to_tensor(v) for v in x])
        else:
            x = tf.convert_to_tensor(x)
        out = run(x)
        if isinstance(out, list | tuple):
            return [o.numpy() for o in out]
        if isinstance(out, dict):
            return {k: v.numpy() for k, v in out.items()}
        return out.numpy()

    return predict


def ort_predictor(onnx_path: str | os.PathLike, threads: int | None = None) -> Callable:
    """An onnxruntime CPU session with all graph optimizations, as a callable.

    Args:
        onnx_path: the .onnx file.
        threads: intra-op threads (None: onnxruntime's default, one per physical core).

    Returns:
        `predict(x) -> numpy array` for single-output graphs, else a list of arrays. `x` is one
        array (single-input graphs), a list in graph-input order, or a dict by input name.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    single_output = len(sess.get_outputs()) == 1

    def predict(x):
        if isinstance(x, Mapping):
            feeds = dict(x)
        elif isinstance(x, list | tuple):
            feeds = dict(zip(names, x, strict=True))
        else:
            feeds = {names[0]: x}
        out = sess.run(None, feeds)
        return out[0] if single_output else out

    return predict


def compare_predictors(
    predictors: Mapping[str, Callable],
    inputs,
    *,
    warmup: int = 5,
    iters: int = 30,
    rounds: int = 5,
) -> dict[str, dict]:
    """Time several predictors on the same inputs, interleaved so drift hits all of them.

    Each predictor is warmed up, then the timed calls are split into `rounds` rounds; in every
    round each predictor runs its share back to back, in turn. Load from other processes on a
    shared machine then spreads over all candidates instead of penalising whichever ran last.

    Args:
        predictors: name -> callable(inputs).
        inputs: passed to every predictor (e.g. one batch-1 image).
        warmup: untimed calls per predictor.
        iters: timed calls per predictor (in total over all rounds).
        rounds: number of interleaved rounds.

    Returns:
        name -> {"p50_ms", "p90_ms", "mean_ms", "iters"}.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    x = np.ascontiguousarray(inputs) if isinstance(inputs, np.ndarray) else inputs
    for fn in predictors.values():
        for _ in range(max(warmup, 0)):
            fn(x)
    rounds = max(1, min(rounds, iters))
    per_round = [iters // rounds + (1 if r < iters % rounds else 0) for r in range(rounds)]
    samples: dict[str, list[float]] = {name: [] for name in predictors}
    for n in per_round:
        for name, fn in predictors.items():
            samples[name].extend(_time_calls(fn, x, n))
    return {name: _stats(s) for name, s in samples.items()}


def compare(
    model,
    artifacts: Mapping[str, str | os.PathLike],
    x,
    *,
    warmup: int = 5,
    iters: int = 30,
    rounds: int = 5,
    threads: int | None = None,
) -> list[dict]:
    """Latency of the Keras model (TF tf.function) and each ONNX file, side by side.

    Args:
        model: the Keras model (the baseline row, named "keras (TF)").
        artifacts: row name -> ONNX path (e.g. {"ONNX fp32": ..., "ONNX int8": ...}).
        x: the input batch (batch 1 for serving latency).
        warmup / iters / rounds: see `compare_predictors`.
        threads: onnxruntime intra-op threads (None: default).

    Returns:
        Rows {"name", "path", "size_bytes", "p50_ms", "p90_ms", "mean_ms", "iters",
        "speedup_vs_keras"} with the Keras row first.
    """
    predictors: dict[str, Callable] = {"keras (TF)": keras_predictor(model)}
    paths: dict[str, str | None] = {"keras (TF)": None}
    for name, path in artifacts.items():
        if name in predictors:
            raise ValueError(f"artifact name {name!r} is reserved for the Keras baseline")
        predictors[name] = ort_predictor(path, threads=threads)
        paths[name] = str(path)
    timings = compare_predictors(predictors, x, warmup=warmup, iters=iters, rounds=rounds)
    base = timings["keras (TF)"]["p50_ms"]
    rows = []
    for name, t in timings.items():
        path = paths[name]
        rows.append(
            {
                "name": name,
                "path": path,
                "size_bytes": os.path.getsize(path) if path else None,
                **t,
                "speedup_vs_keras": base / t["p50_ms"] if t["p50_ms"] > 0 else None,
            }
        )
    return rows


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _version(module: str) -> str | None:
    try:
        from importlib import metadata

        return metadata.version(module)
    except Exception:
        return None


def machine_info() -> dict:
    """Where the numbers came from: CPU model, cores, platform and tool versions."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": usable,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": _version("tensorflow") or _version("tensorflow-cpu"),
        "keras": _version("keras"),
        "onnxruntime": _version("onnxruntime"),
        "onnx": _version("onnx"),
        "tf2onnx": _version("tf2onnx"),
        "numpy": _version("numpy"),
        "dlmodels": _version("dlmodels"),
    }


def write_results(path: str | os.PathLike, payload: Mapping) -> Path:
    """Write benchmark results as JSON (atomically), adding machine info and a UTC timestamp.

    Args:
        path: e.g. `benchmarks/results/unet_latency.json`; parent directories are created.
        payload: JSON-serialisable results; a "machine" key given by the caller is kept.

    Returns:
        The path written.
    """
    data = dict(payload)
    data.setdefault("machine", machine_info())
    data.setdefault("created", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n", overwrite=True)
    return Path(path)

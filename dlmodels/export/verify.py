"""Parity of an exported ONNX file against the Keras model it came from."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

_WORKER_MODULE = "dlmodels.runtime.worker"
"""Runs an ONNX file in a fresh process that imports only numpy and onnxruntime."""

_WORKER_PYTHON: tuple[str, ...] = (sys.executable,)
"""The interpreter command the worker runs under (a test may add flags such as -S)."""


def package_root() -> Path:
    """The directory that holds the `dlmodels` package (a source checkout or site-packages)."""
    import dlmodels

    return Path(dlmodels.__file__).resolve().parents[1]


def worker_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the worker process: `base` (default: this process's environment)
    with `package_root()` first on PYTHONPATH, so `python -m dlmodels.runtime.worker` imports
    this same dlmodels whether or not it is pip-installed (the worker runs in a temp dir)."""
    env = dict(os.environ if base is None else base)
    root = str(package_root())
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env["PYTHONPATH"] = os.pathsep.join([root, *rest])
    return env


INT8_MIN_AGREEMENT = 0.9
"""Default smallest argmax agreement with Keras of an int8 file (ONNX, LiteRT, OpenVINO)."""

INT8_MAX_METRIC_DROP = 0.01
"""Default largest tolerated drop of the caller's metric (Keras - int8) of an int8 file."""

FINITE_ONLY = "finite outputs only (no output with classes, no metric)"
"""`judged_by` of an int8 file with nothing to judge it by but finite outputs."""


def int8_verdict(
    finite: bool,
    *,
    agreement: float | None,
    min_agreement: float | None,
    metric_before: float | None,
    metric_after: float | None,
    max_metric_drop: float | None,
    metric_name: str | None = None,
) -> tuple[bool, str]:
    """The int8 bar, shared by `verify_litert`, `verify_openvino` and `write_repository`:
    finite outputs, argmax agreement >= `min_agreement` (outputs with classes) and a metric
    drop (before - after, higher is better) <= `max_metric_drop`, each where measured and set.

    Returns:
        (passed, the bars applied in words; `FINITE_ONLY` when none applied).
    """
    bars, ok = [], bool(finite)
    if agreement is not None and min_agreement is not None:
        bars.append(f"argmax agreement >= {min_agreement:g}")
        ok = ok and agreement >= min_agreement
    if metric_before is not None and metric_after is not None and max_metric_drop is not None:
        bars.append(f"{metric_name or 'metric'} drop <= {max_metric_drop:g}")
        ok = ok and metric_before - metric_after <= max_metric_drop
    return bool(ok), " and ".join(bars) or FINITE_ONLY


def metric_value(metric: Callable, labels, outputs) -> float:
    """`float(metric(labels, outputs))` from a fresh state. A stateful metric (a
    `keras.metrics.Metric`, whose call adds to a running result) is reset first, so a runtime's
    value is its own and not the running mean over Keras' outputs and its own."""
    reset = getattr(metric, "reset_state", None)
    if callable(reset):
        reset()
    return float(metric(labels, outputs))


def _metric_name(metric: Callable | None) -> str | None:
    """What a metric is called: a function's `__name__`, a Keras metric's `name`, else None."""
    name = getattr(metric, "__name__", None) or getattr(metric, "name", None)
    return name if isinstance(name, str) else None


def judge_outputs(
    expected: Mapping[str, np.ndarray],
    got: Mapping[str, np.ndarray],
    *,
    where: str,
    atol: float,
    min_agreement: float | None = None,
    labels=None,
    metric: Callable | None = None,
    max_metric_drop: float | None = None,
) -> dict:
    """A runtime's outputs against Keras' under one bar (what `verify_litert` and
    `verify_openvino` share): max / mean |err| <= `atol` (unless inf), argmax agreement >=
    `min_agreement` and metric drop <= `max_metric_drop` where measured and set
    (`int8_verdict`). Warns when an infinite `atol` leaves only finiteness to judge.

    Returns:
        {"max_abs_error", "mean_abs_error", "agreement", "metric_keras", "metric_runtime",
        "passed", "judged_by"}.
    """
    import math
    import warnings

    max_err, mean_err, agreement, finite = compare_outputs(expected, got, where=where)
    metric_keras = metric_runtime = None
    if metric is not None and labels is not None:
        names = list(expected)

        def pack(d):
            values = [d[k] for k in names]
            return values[0] if len(values) == 1 else values

        metric_keras = metric_value(metric, labels, pack(expected))
        metric_runtime = metric_value(metric, labels, pack(got))
    passed, judged_by = int8_verdict(
        finite and max_err <= atol,
        agreement=agreement,
        min_agreement=min_agreement,
        metric_before=metric_keras,
        metric_after=metric_runtime,
        max_metric_drop=max_metric_drop,
        metric_name=_metric_name(metric),
    )
    if math.isfinite(atol):
        judged_by = f"max abs error <= {atol:g}" + (
            "" if judged_by == FINITE_ONLY else f" and {judged_by}"
        )
    elif judged_by == FINITE_ONLY:
        warnings.warn(
            f"{where}: no output with classes and no metric, so it is judged on finite outputs "
            "only; pass labels and metric to judge it by the task.",
            stacklevel=3,
        )
    return {
        "max_abs_error": max_err,
        "mean_abs_error": mean_err,
        "agreement": agreement,
        "metric_keras": metric_keras,
        "metric_runtime": metric_runtime,
        "passed": passed,
        "judged_by": judged_by,
    }


class VerificationError(AssertionError):
    """An exported artifact disagrees with its Keras model beyond the tolerance."""


@dataclasses.dataclass
class VerifyReport:
    """What `verify` measured.

    Attributes:
        path: the ONNX file checked.
        max_abs_error: largest |onnx - keras| over every output element.
        mean_abs_error: mean |onnx - keras| over every output element.
        atol: the tolerance `passed` was judged against.
        passed: max_abs_error <= atol and every ONNX output is finite.
        n_samples: number of input samples compared.
        agreement: fraction of positions whose argmax over the last axis agrees, for outputs with
            more than one channel (class scores); None otherwise.
        metric_keras / metric_onnx: `metric(labels, outputs)` on Keras and ONNX outputs when a
            metric and labels were given.
    """

    path: str
    max_abs_error: float
    mean_abs_error: float
    atol: float
    passed: bool
    n_samples: int
    agreement: float | None = None
    metric_keras: float | None = None
    metric_onnx: float | None = None

    def __str__(self) -> str:
        parts = [
            f"{'PASS' if self.passed else 'FAIL'} {self.path}: max |err| {self.max_abs_error:.3e}",
            f"mean |err| {self.mean_abs_error:.3e}",
            f"atol {self.atol:g}",
            f"n={self.n_samples}",
        ]
        if self.agreement is not None:
            parts.append(f"argmax agreement {self.agreement:.4f}")
        if self.metric_keras is not None:
            parts.append(f"metric keras {self.metric_keras:.4f} / onnx {self.metric_onnx:.4f}")
        return ", ".join(parts)


def onnx_predict(
    path: str | os.PathLike, inputs, *, fresh_process: bool = False
) -> list[np.ndarray]:
    """Run an ONNX file with onnxruntime on CPU and return its outputs in graph order.

    Args:
        path: the .onnx file.
        inputs: one array (single-input graphs), a list in graph-input order, or a dict by name.
        fresh_process: run in a new Python process importing only numpy + onnxruntime. This is
            what a serving process sees, with nothing shared with the exporting process.

    Returns:
        A list of numpy arrays, one per graph output.

    Raises:
        ValueError / TypeError: inputs that do not match the graph (the checks of
            `dlmodels.runtime.OnnxModel`, which runs the file in both modes).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    if not fresh_process:
        from dlmodels.runtime import OnnxModel

        # The same session, feed checks and casts as a server and the fresh-process worker.
        return list(OnnxModel(path).run(inputs).values())
    return _run_worker(path, inputs)[0]


def _run_worker(path: Path, inputs) -> tuple[list[np.ndarray], list[str], bool]:
    return run_fresh_worker(
        [*_WORKER_PYTHON, "-m", _WORKER_MODULE, str(path.resolve())],
        inputs,
        what=f"onnxruntime worker failed on {path}",
        prefix="dlmodels-ort-",
    )


def run_fresh_worker(
    command: list[str], inputs, *, what: str, prefix: str = "dlmodels-worker-"
) -> tuple[list[np.ndarray], list[str], bool]:
    """Run a worker process on `inputs`: `command + [in.npz, out.npz]` in a temp directory.

    The worker (`dlmodels.runtime.worker`, or the OpenVINO one) reads the feeds from `in.npz`
    and writes `output_names`, `output_<i>` and `tensorflow_loaded` to `out.npz`.

    Returns:
        `(outputs, output names, whether the worker had TensorFlow loaded)`.

    Raises:
        RuntimeError: the worker failed; the message starts with `what` and ends with its
            stderr.
    """
    # Arrays travel by name when the caller named them, else by position (`input_0`, ...); the
    # worker maps them onto its graph inputs, so this process never has to open the model.
    if isinstance(inputs, Mapping):
        feeds = {str(k): np.require(v, requirements="C") for k, v in inputs.items()}
    else:
        arrays = list(inputs) if isinstance(inputs, list | tuple) else [inputs]
        feeds = {f"input_{i}": np.require(a, requirements="C") for i, a in enumerate(arrays)}
    feeds = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in feeds.items()}
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        in_path, out_path = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        np.savez(in_path, **feeds)
        proc = subprocess.run(
            [*command, in_path, out_path],
            cwd=tmp,
            env=worker_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{what} (exit {proc.returncode}):\n{proc.stderr.strip()[-3000:]}")
        with np.load(out_path) as data:
            out_names = [str(n) for n in data["output_names"]]
            outputs = [data[f"output_{i}"] for i in range(len(out_names))]
            tf_loaded = bool(data["tensorflow_loaded"])
    return outputs, out_names, tf_loaded


def keras_outputs(model, inputs, *, batch_size: int = 32) -> dict[str, np.ndarray]:
    """`model.predict(inputs)` (inference mode) as {output name: array}.

    Args:
        model: a functional Keras model.
        inputs: one array, a list in `model.inputs` order, or a dict by input name.
        batch_size: prediction batch size.
    """
    from dlmodels.export._signature import as_functional, pack_inputs

    model = as_functional(model)

    if isinstance(inputs, Mapping):
        flat = [inputs[t.name] for t in model.inputs]
    elif isinstance(inputs, list | tuple):
        flat = list(inputs)
    else:
        flat = [inputs]
    out = model.predict(pack_inputs(model, flat), verbose=0, batch_size=batch_size)
    import keras

    flat = keras.tree.flatten(out)
    return {k: np.asarray(v) for k, v in zip(model.output_names, flat, strict=True)}


def _n_samples(inputs) -> int:
    if isinstance(inputs, Mapping):
        inputs = next(iter(inputs.values()))
    elif isinstance(inputs, list | tuple):
        inputs = inputs[0]
    return int(np.shape(inputs)[0])


def compare_outputs(
    expected: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], *, where: str = "artifact"
) -> tuple[float, float, float | None, bool]:
    """Element-wise comparison of two {output name: array} dicts (Keras vs an artifact).

    Returns:
        (max_abs_error, mean_abs_error, argmax agreement, finite): the errors over every element
        of every output (max is inf when the artifact produced NaN/inf), the fraction of
        positions whose argmax over the last axis agrees for outputs with more than one channel
        (None when there is none), and whether every artifact value is finite.

    Raises:
        VerificationError: the output names or shapes differ.
    """
    if set(got) != set(expected):
        raise VerificationError(
            f"{where}: outputs {sorted(got)} do not match Keras output_names {sorted(expected)}"
        )
    abs_sum, count, max_err = 0.0, 0, 0.0
    agree_hits, agree_total = 0, 0
    for name, e in expected.items():
        e = np.asarray(e)
        g = np.asarray(got[name])
        if g.shape != e.shape:
            raise VerificationError(
                f"{where}: output {name!r} has shape {g.shape}, {e.shape} in Keras"
            )
        diff = np.abs(g.astype(np.float64) - e.astype(np.float64))
        max_err = max(max_err, float(np.max(diff)) if diff.size else 0.0)
        abs_sum += float(np.sum(diff))
        count += diff.size
        if e.ndim >= 2 and e.shape[-1] > 1:
            agree_hits += int(np.sum(np.argmax(g, -1) == np.argmax(e, -1)))
            agree_total += int(np.prod(e.shape[:-1]))
    finite = all(np.all(np.isfinite(np.asarray(g, dtype=np.float64))) for g in got.values())
    if not finite or not np.isfinite(max_err):
        # NaN/inf never passes, not even against atol=inf (the int8 convention).
        max_err = float("inf")
    agreement = agree_hits / agree_total if agree_total else None
    return max_err, abs_sum / max(count, 1), agreement, bool(finite)


def verify(
    model,
    onnx_path: str | os.PathLike,
    inputs,
    *,
    atol: float = 1e-4,
    labels=None,
    metric: Callable | None = None,
    raise_on_fail: bool = False,
    expected: Mapping[str, np.ndarray] | None = None,
) -> VerifyReport:
    """Compare an ONNX file, run in a fresh onnxruntime process, with Keras inference.

    Keras runs `model.predict(inputs)` (inference mode); the ONNX file runs in a new process that
    imports only numpy and onnxruntime, so the numbers are what a serving process would produce.
    Outputs are matched by name (ONNX output names must equal `model.output_names`, which
    `to_onnx` guarantees). For int8 files pass a large atol (or np.inf) and judge by
    `agreement` / the metric instead.

    Args:
        model: the Keras model the file was exported from.
        onnx_path: the ONNX file.
        inputs: samples: one array, a list in input order, or a dict by input name.
        atol: largest tolerated absolute error.
        labels: ground truth for `metric`.
        metric: `metric(labels, outputs) -> float`, where outputs is the single output array
            (or the list of outputs for multi-output models); computed on Keras and on ONNX
            outputs when `labels` is given.
        raise_on_fail: raise VerificationError instead of returning a failed report.
        expected: Keras outputs on `inputs` already computed ({output name: array}, as
            `keras_outputs` returns); saves running the model again when several artifacts
            are checked against the same samples.

    Returns:
        A VerifyReport.
    """
    from dlmodels.export._signature import as_functional

    model = as_functional(model)
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX file at {onnx_path}; export one with to_onnx first")
    expected = dict(expected) if expected is not None else keras_outputs(model, inputs)
    got_list, got_names, tf_loaded = _run_worker(onnx_path, inputs)
    if tf_loaded:  # the worker's contract; a regression here would invalidate the check
        raise RuntimeError("the onnxruntime worker imported TensorFlow; parity is not isolated")
    got = dict(zip(got_names, got_list, strict=True))
    if set(got) != set(expected):
        raise VerificationError(
            f"{onnx_path}: ONNX outputs {got_names} do not match Keras output_names "
            f"{list(expected)}; re-export with dlmodels.export.to_onnx"
        )
    max_err, mean_err, agreement, finite = compare_outputs(expected, got, where=str(onnx_path))
    report = VerifyReport(
        path=str(onnx_path),
        max_abs_error=max_err,
        mean_abs_error=mean_err,
        atol=float(atol),
        passed=bool(finite and max_err <= atol),
        n_samples=_n_samples(inputs),
        agreement=agreement,
    )
    if metric is not None and labels is not None:

        def pack(d: dict[str, np.ndarray]):
            values = [d[k] for k in model.output_names]
            return values[0] if len(values) == 1 else values

        report.metric_keras = metric_value(metric, labels, pack(expected))
        report.metric_onnx = metric_value(metric, labels, pack(got))
    if raise_on_fail and not report.passed:
        raise VerificationError(str(report))
    return report

"""Run an exported ONNX file with onnxruntime: named inputs and outputs, checked feeds.

Imports only numpy and onnxruntime. This is what a serving process, the benchmark harness and
the parity worker run, so all three see the same session settings and the same input checks:
a wrong dtype, rank, fixed size or input name fails here with a message naming the input and
what the model expects, instead of onnxruntime's terse `INVALID_ARGUMENT`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from dlmodels.errors import UserError
from dlmodels.runtime.feeds import match_feeds
from dlmodels.runtime.manifest import Artifact, Manifest, TensorSpec, load_manifest

# onnxruntime reports element types as "tensor(<type>)".
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "object",
}

_CASTS = ("no", "equiv", "safe", "same_kind")

# Feeds are cast to these input dtypes; bfloat16 (numpy has none) and unknown types pass as given.
_CASTABLE = frozenset(_ORT_DTYPES.values()) - {"bfloat16"}

_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def default_threads() -> int:
    """The CPUs this process may run on (its affinity mask, which honours `taskset` and
    container CPU sets), else the machine's CPU count."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # not on Linux
        return max(os.cpu_count() or 1, 1)


def _spec(node) -> TensorSpec:
    shape = tuple(d if isinstance(d, int | str) or d is None else None for d in node.shape or ())
    return TensorSpec(name=node.name, shape=shape, dtype=_ORT_DTYPES.get(node.type, node.type))


class OnnxModel:
    """An onnxruntime inference session with named inputs/outputs and checked feeds.

    The session uses every graph optimization, `threads` intra-op threads (default: the CPUs
    this process may use) and one inter-op thread with sequential execution, which is fastest
    for the single-request latency a server and a benchmark care about.

    Args:
        path: the .onnx file.
        threads: intra-op threads (None: `default_threads()`; 0: onnxruntime's own default).
        providers: onnxruntime execution providers in priority order (default
            ["CPUExecutionProvider"]); each must be in `onnxruntime.get_available_providers()`.
        optimization: graph optimization level: "all" (default), "extended", "basic", "disable".
        cast: numpy casting rule for feeds whose dtype differs from the input's (default
            "same_kind": float64 arrays feed float32 inputs, floats never feed int inputs);
            "no" demands the exact dtype.
        session_config: extra onnxruntime session config entries (e.g.
            {"session.intra_op.allow_spinning": "0"} for a shared machine).

    Attributes:
        path, inputs / outputs (TensorSpecs read from the graph), input_names, output_names,
        threads, providers, session (the onnxruntime.InferenceSession), and, for models made by
        `from_manifest`, `manifest` and `artifact`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        optimization: str = "all",
        cast: str = "same_kind",
        session_config: Mapping[str, str] | None = None,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX file at {self.path}")
        if threads is not None and (
            not isinstance(threads, int) or isinstance(threads, bool) or threads < 0
        ):
            raise UserError(
                f"threads must be an int >= 0 (0: onnxruntime decides), got {threads!r}"
            )
        if optimization not in _OPTIMIZATION:
            raise UserError(
                f"optimization must be one of {list(_OPTIMIZATION)}, got {optimization!r}"
            )
        if cast not in _CASTS:
            raise UserError(f"cast must be one of {list(_CASTS)}, got {cast!r}")
        available = ort.get_available_providers()
        providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        unknown = [p for p in providers if p not in available]
        if not providers or unknown:
            raise UserError(
                f"providers {unknown or providers} are not available in this onnxruntime "
                f"({ort.__version__}); available: {available}"
            )
        self.threads = default_threads() if threads is None else threads
        self.cast = cast
        opts = ort.SessionOptions()
        opts.graph_optimization_level = _OPTIMIZATION[optimization]
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        for key, value in (session_config or {}).items():
            opts.add_session_config_entry(str(key), str(value))
        self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        self.providers = self.session.get_providers()
        self.inputs = tuple(_spec(i) for i in self.session.get_inputs())
        self.outputs = tuple(_spec(o) for o in self.session.get_outputs())
        self.input_names = [t.name for t in self.inputs]
        self.output_names = [t.name for t in self.outputs]
        self.manifest: Manifest | None = None
        self.artifact: Artifact | None = None

    @classmethod
    def from_manifest(
        cls, manifest: str | os.PathLike | Manifest, format: str = "onnx", **kwargs: Any
    ) -> OnnxModel:
        """The artifact of `format` ("onnx", "int8", ...) listed in a manifest.

        Also checks that the graph's input and output names are those the manifest recorded,
        so a file replaced behind the manifest's back fails at load.

        Args:
            manifest: a manifest.json path, a directory holding one, or a loaded Manifest.
            format: which artifact to run.
            **kwargs: passed to `OnnxModel` (threads, providers, ...).
        """
        if not isinstance(manifest, Manifest):
            manifest = load_manifest(manifest)
        artifact = manifest.artifact(format)
        if not artifact.is_onnx:
            raise UserError(
                f"{manifest.path}: artifact {format!r} ({artifact.relpath}) is not an ONNX file; "
                f"the ONNX artifacts are {[a.format for a in manifest.onnx_artifacts()]}"
            )
        model = cls(artifact.path, **kwargs)
        for kind, recorded, actual in (
            ("inputs", artifact.input_names, model.input_names),
            ("outputs", artifact.output_names, model.output_names),
        ):
            if recorded and recorded != actual:
                raise UserError(
                    f"{manifest.path}: artifact {format!r} records {kind} {recorded}, but "
                    f"{artifact.path} has {actual}; the file changed after export: re-export"
                )
        model.manifest, model.artifact = manifest, artifact
        return model

    def __repr__(self) -> str:
        ins = ", ".join(f"{t.name}: {t.dtype}{list(t.shape)}" for t in self.inputs)
        outs = ", ".join(f"{t.name}: {t.dtype}{list(t.shape)}" for t in self.outputs)
        return f"OnnxModel({str(self.path)!r}, inputs=[{ins}], outputs=[{outs}])"

    def feeds(self, inputs) -> dict[str, np.ndarray]:
        """Map `inputs` to checked, contiguous arrays by input name (see `run`)."""
        specs = {s.name: s for s in self.inputs}
        return match_feeds(
            inputs,
            self.input_names,
            [s.dtype if s.dtype in _CASTABLE else None for s in self.inputs],
            owner=self.path.name,
            cast=self.cast,
            check=lambda name, arr: self._check_shape(specs[name], arr),
        )

    def _check_shape(self, spec: TensorSpec, arr: np.ndarray) -> None:
        if not spec.compatible_shape(arr.shape):
            expected = "[" + ", ".join("?" if d is None else str(d) for d in spec.shape) + "]"
            if arr.ndim != spec.rank:
                problem = f"rank {arr.ndim} (shape {list(arr.shape)})"
            else:
                problem = f"shape {list(arr.shape)}"
            raise UserError(
                f"{self.path.name}: input {spec.name!r} expects rank {spec.rank} with shape "
                f"{expected} (names and ? are free sizes), got {problem}"
            )

    def run(self, inputs, output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the model.

        Args:
            inputs: one array (single-input models), a list/tuple in input order, or a dict by
                input name. Arrays are cast to the input's dtype under the `cast` rule; rank and
                fixed sizes are checked against the graph.
            output_names: which outputs to compute (default: all, in graph order).

        Returns:
            Output name -> numpy array, in the requested (default: graph) order.

        Raises:
            ValueError: a missing/unexpected input name, wrong number of inputs, wrong rank or
                size. TypeError: a dtype that cannot be cast.
        """
        names = list(output_names) if output_names is not None else self.output_names
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise UserError(
                f"{self.path.name}: no outputs {unknown}; the model's outputs are "
                f"{self.output_names}"
            )
        outputs = self.session.run(names, self.feeds(inputs))
        return {n: np.asarray(o) for n, o in zip(names, outputs, strict=True)}

    def __call__(self, inputs):
        """`run` for callers that want arrays: the single output's array, else a list of arrays
        in graph order (what `dlmodels.bench.ort_predictor` returns)."""
        out = self.run(inputs)
        return next(iter(out.values())) if len(out) == 1 else list(out.values())

    def example_inputs(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Zeros of each input's dtype and shape, `batch` for every free size (a warm-up feed)."""
        return {
            s.name: np.zeros(
                s.example_shape(batch), dtype=s.dtype if s.dtype != "bfloat16" else "float32"
            )
            for s in self.inputs
        }

    def warmup(self, runs: int = 1, batch: int = 1) -> dict[str, np.ndarray]:
        """Run `example_inputs` `runs` times (first-call allocations, thread-pool start-up) and
        return the last outputs."""
        feeds = self.example_inputs(batch)
        out: dict[str, np.ndarray] = {}
        for _ in range(max(runs, 1)):
            out = self.run(feeds)
        return out

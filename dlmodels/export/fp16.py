"""ONNX float16: half-size weights, with shape-carrying ops kept in float32.

`to_fp16` converts an fp32 ONNX file (from `to_onnx`) with `onnxconverter_common.float16`
(Micikevicius et al., "Mixed Precision Training", ICLR 2018, for why fp16 weights and
activations lose little for inference). Two kinds of ops stay float32:

- shape-carrying and index ops (`Resize` / `Upsample` scales and sizes, `Range`, `TopK`,
  `NonMaxSuppression`, `RoiAlign`, `CumSum`, `Min`, `Max`, ...: onnxconverter-common's
  `DEFAULT_OP_BLOCK_LIST`): a scale of 1.9999 in fp16 is a different output size, and these ops
  feed indices, not activations;
- any op the caller adds through `op_block_list`.

What onnxruntime's CPU execution provider actually runs in fp16 depends on the build and the
CPU: where it has no fp16 kernel it inserts Casts around the node (`InsertedPrecisionFreeCast`
nodes) and computes in fp32. `fp16_fallback_ops` lists those nodes for a given file. Measured
here (onnxruntime 1.32, x86 AMD EPYC with AVX-512 but without AVX512-FP16): every compute op
tried falls back (Conv, ConvTranspose, MatMul, Relu, Add, Sub, Mul, Sigmoid, MaxPool,
AveragePool, GlobalAveragePool, ReduceMean, Sqrt, Reciprocal, Neg, Concat). So on this CPU an
fp16 ONNX file is a storage format (half the bytes, weights rounded to fp16, fp32 compute plus
casts: not faster, measured slower at batch 32); on GPUs and ARM CPUs with fp16 units the same
file computes in fp16. Keeping the fallback ops in fp32
explicitly would only give back an fp32 file, so they are not in the default block list.

Tolerance: `FP16_ATOL` (1e-2 on outputs of order one; measured max |err| 1.5e-3 on the tiny
BatchNorm + Resize test segmenter). fp16 has an 11-bit significand, so errors scale with the
output magnitude: pass `atol` scaled to the outputs for models with large logits.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from dlmodels.errors import UserError

logger = logging.getLogger(__name__)

FP16_ATOL = 1e-2
"""Default parity tolerance of an fp16 ONNX file against Keras (outputs of order one)."""

_INSERTED_CAST = "InsertedPrecisionFreeCast_"
"""Name prefix onnxruntime gives the Casts it inserts around nodes without an fp16 kernel."""


def default_op_block_list() -> list[str]:
    """The ops `to_fp16` keeps in float32 by default: onnxconverter-common's
    `DEFAULT_OP_BLOCK_LIST` (shape-carrying / index ops such as Resize, Upsample, Range, TopK,
    NonMaxSuppression, RoiAlign, CumSum, Min, Max and the ONNX-ML ops)."""
    from onnxconverter_common import float16

    return sorted(set(float16.DEFAULT_OP_BLOCK_LIST))


def to_fp16(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    keep_io_types: bool = True,
    op_block_list: Iterable[str] | None = None,
    node_block_list: Iterable[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert an fp32 ONNX file to float16 and write it atomically.

    Args:
        onnx_path: the fp32 ONNX file (from `to_onnx`).
        out_path: destination `.onnx` file.
        keep_io_types: keep float32 graph inputs and outputs (a Cast is inserted after each
            input and before each output), so callers feed and receive the same arrays as with
            the fp32 file. False makes the graph's float inputs and outputs float16.
        op_block_list: op types kept in float32. None: `default_op_block_list()`. A given list
            replaces the default; include Resize / Upsample yourself when you pass one (a
            warning-free way: `default_op_block_list() + ["Softmax"]`).
        node_block_list: node names kept in float32 (e.g. one numerically sensitive layer).
        overwrite: replace an existing `out_path`; otherwise FileExistsError before any work.

    Returns:
        The path written.

    Raises:
        FileNotFoundError: no file at `onnx_path`.
        FileExistsError: `out_path` exists and overwrite is False.
        ValueError: `onnx_path` is not an fp32 graph, or a block-list entry is not a string.
    """
    import onnx
    from onnxconverter_common import float16

    from dlmodels.export._atomic import atomic_path, check_target

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX file at {onnx_path}; export one with to_onnx first")
    check_target(out_path, overwrite=overwrite)
    ops = (
        default_op_block_list() if op_block_list is None else _names("op_block_list", op_block_list)
    )
    nodes = [] if node_block_list is None else _names("node_block_list", node_block_list)
    model = onnx.load(str(onnx_path))
    already = [
        i.name
        for i in model.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT16 and i.dims and _size(i.dims) > 1
    ]
    if already:
        raise UserError(
            f"{onnx_path} already holds float16 weights ({already[:3]}...); to_fp16 converts "
            "an fp32 file: pass the file written by to_onnx."
        )
    with warnings.catch_warnings(record=True) as caught:
        # One warning per weight below fp16's smallest normal (clipped to +-1e-7): count them.
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(
            model,
            keep_io_types=bool(keep_io_types),
            op_block_list=ops,
            node_block_list=nodes,
            disable_shape_infer=False,
        )
    clipped = sum("will be truncated" in str(w.message) for w in caught)
    if clipped:
        logger.info("%s: %d tiny float32 values clipped to +-1e-7 in fp16", onnx_path, clipped)
    converted.producer_name = "dlmodels (onnxconverter-common float16)"
    onnx.checker.check_model(converted)
    with atomic_path(out_path, overwrite=overwrite) as tmp:
        onnx.save(converted, str(tmp))
    return out_path


def _size(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _names(arg: str, values: Iterable[str]) -> list[str]:
    if isinstance(values, str):
        raise UserError(
            f"{arg} must be a list of names, got the string {values!r}; write [{values!r}]."
        )
    out = list(values)
    bad = [v for v in out if not isinstance(v, str) or not v]
    if bad:
        raise UserError(f"{arg} must hold non-empty strings (op types / node names), got {bad}.")
    return out


def _node_precisions(path) -> dict[str, tuple[str, str]]:
    """node name -> (op type, "float16" | "float32") for nodes with a float first output."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    graph = model.graph
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in [*graph.value_info, *graph.output, *graph.input]
    }
    names = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.FLOAT: "float32"}
    out = {}
    for node in graph.node:
        if node.op_type == "Cast" or not node.output:
            continue
        kind = names.get(types.get(node.output[0]))
        if kind is not None:
            out[node.name] = (node.op_type, kind)
    return out


def fp16_op_summary(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Which nodes of an ONNX file compute in float16 and which in float32, by op type.

    A node counts as float16 when its first output is float16 per ONNX shape inference, float32
    when it is float32; Casts and nodes without a float output are not counted.

    Returns:
        {"float16": {op_type: count}, "float32": {op_type: count}}.
    """
    out: dict[str, Counter] = {"float16": Counter(), "float32": Counter()}
    for op_type, kind in _node_precisions(path).values():
        out[kind][op_type] += 1
    return {k: dict(sorted(v.items())) for k, v in out.items()}


def fp16_fallback_ops(path: str | os.PathLike) -> dict[str, int]:
    """Op types of float16 nodes that onnxruntime's CPU execution provider runs in float32.

    Loads the file with graph optimizations off (so onnxruntime's own cast clean-up does not
    hide them) and counts the file's float16 nodes that read a Cast onnxruntime inserted because
    it has no float16 kernel for them (names starting with `InsertedPrecisionFreeCast_`).

    Layout ops (Reshape, Squeeze, Transpose) can appear although they have fp16 kernels:
    onnxruntime moves them to the fp32 side when their neighbours fall back, to save casts.

    Returns:
        op_type -> number of such nodes (empty when every fp16 node has an fp16 kernel).
    """
    import tempfile

    import onnx
    import onnxruntime as ort

    half = {name for name, (_, kind) in _node_precisions(path).items() if kind == "float16"}
    with tempfile.TemporaryDirectory(prefix="dlmodels-fp16-") as tmp:
        dumped = os.path.join(tmp, "session.onnx")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.optimized_model_filepath = dumped
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(dumped).graph
    counts: Counter = Counter()
    for node in graph.node:
        if node.name in half and any(i.startswith(_INSERTED_CAST) for i in node.input):
            counts[node.op_type] += 1
    return dict(sorted(counts.items()))


def verify_fp16(
    model,
    fp16_path: str | os.PathLike,
    inputs,
    *,
    atol: float = FP16_ATOL,
    labels=None,
    metric: Callable | None = None,
    raise_on_fail: bool = False,
    expected=None,
):
    """`dlmodels.export.verify` with the fp16 tolerance: the fp16 file runs in a fresh
    onnxruntime process and is compared with Keras (max / mean abs error, argmax agreement, the
    task metric before and after when `metric` and `labels` are given).

    Returns:
        A `VerifyReport`.
    """
    from dlmodels.export.verify import verify

    return verify(
        model,
        fp16_path,
        inputs,
        atol=atol,
        labels=labels,
        metric=metric,
        raise_on_fail=raise_on_fail,
        expected=expected,
    )

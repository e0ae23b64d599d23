"""ONNX export through tf2onnx, with the Keras input/output names and a symbolic batch dimension."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx
import tensorflow as tf

from dlmodels.errors import UserError
from dlmodels.export._atomic import atomic_path, check_target
from dlmodels.export._signature import (
    as_functional,
    float32_copy,
    input_names,
    output_names,
    serving_function,
)

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
"""tf2onnx 1.17 supports opsets up to 18; 17 is what current onnxruntime builds run everywhere."""

BATCH_DIM = "batch"
"""dim_param given to the leading dimension of every graph input and output."""


def _convert(fn, opset: int) -> onnx.ModelProto:
    """tf2onnx's `from_function`, but with continue_on_error=False.

    tf2onnx's public `from_function` hard-codes continue_on_error=True, which turns an
    unsupported op (random sampling, exact GELU, ...) into a silently invalid graph that only
    fails when a runtime loads it. Calling the same steps with the flag off raises at export time,
    naming the op.
    """
    from tf2onnx import convert as tfconvert
    from tf2onnx import tf_loader

    if not hasattr(tfconvert, "_convert_common"):  # a future tf2onnx without the private step
        with tf.device("/cpu:0"):
            proto, _ = tfconvert.from_function(fn, input_signature=fn.input_signature, opset=opset)
        return proto  # unsupported ops are still caught by _check_ops
    concrete = fn.get_concrete_function()
    in_names = [t.name for t in concrete.inputs if t.dtype != tf.dtypes.resource]
    out_names = [t.name for t in concrete.outputs if t.dtype != tf.dtypes.resource]
    renames = tfconvert.tensor_names_from_structed(concrete, in_names, out_names)
    with tf.device("/cpu:0"):
        frozen = tf_loader.from_function(concrete, in_names, out_names)
        model_proto, _ = tfconvert._convert_common(
            frozen,
            name=concrete.name,
            continue_on_error=False,
            opset=opset,
            input_names=in_names,
            output_names=out_names,
            tensors_to_rename=renames,
        )
    return model_proto


class UnsupportedOpError(UserError):
    """The model uses TensorFlow ops tf2onnx cannot map to ONNX."""


def _check_ops(model_proto: onnx.ModelProto, model_name: str, opset: int) -> None:
    """Fail with the op names when tf2onnx left TensorFlow ops in the graph.

    tf2onnx only logs unmapped ops ("Unsupported ops: ...") and passes them through as nodes of
    the ONNX domain, so without this check the error would surface later as an opaque checker or
    runtime failure.
    """
    bad: dict[str, list[str]] = {}
    for node in model_proto.graph.node:
        if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type):
            bad.setdefault(node.op_type, []).append(node.name)
    if bad:
        details = "; ".join(f"{op} (e.g. node {names[0]!r})" for op, names in sorted(bad.items()))
        raise UnsupportedOpError(
            f"cannot export {model_name!r} to ONNX opset {opset}: tf2onnx has no ONNX mapping "
            f"for {details}. Replace the layer using it with ONNX-expressible ops, or export a "
            "deterministic sub-model without it (random sampling belongs outside the graph)."
        )


def _check_types(model_proto: onnx.ModelProto, model_name: str) -> None:
    """Strict ONNX type/shape inference: catches graphs onnx.checker accepts but onnxruntime
    refuses to load (e.g. float16/float32 operands mixed in one node, which tf2onnx emits for
    some mixed-precision Keras layers)."""
    try:
        onnx.shape_inference.infer_shapes(model_proto, check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as err:
        raise ValueError(
            f"tf2onnx produced an ONNX graph for {model_name!r} that fails type checking, so "
            f"onnxruntime would refuse to load it: {err}"
        ) from err


def _rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if vi.name == old:
            vi.name = new


def _fix_names(model_proto: onnx.ModelProto, want_in: list[str], want_out: list[str]) -> None:
    """Make graph inputs/outputs read exactly like the Keras model (`image` -> `logits`)."""
    graph = model_proto.graph
    got_in = [i.name for i in graph.input]
    got_out = [o.name for o in graph.output]
    if len(got_in) != len(want_in) or len(got_out) != len(want_out):
        raise RuntimeError(
            f"tf2onnx produced inputs {got_in} / outputs {got_out}; expected {want_in} / "
            f"{want_out}. The model structure did not survive conversion."
        )
    if set(got_out) == set(want_out):
        # tf.nest sorts dict outputs by key; restore the Keras order (logits first, ...).
        by_name = {
            o.name: onnx.ValueInfoProto.FromString(o.SerializeToString()) for o in graph.output
        }
        del graph.output[:]
        graph.output.extend(by_name[n] for n in want_out)
    else:
        for old, new in zip(got_out, want_out, strict=True):
            if old != new:
                _rename_tensor(graph, old, new)
    for old, new in zip(got_in, want_in, strict=True):
        if old != new:
            _rename_tensor(graph, old, new)
    for vi in [*graph.input, *graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = BATCH_DIM


def _native_rnn_plan(source, name: str, opset: int) -> bool:
    """Whether `to_onnx` builds native recurrent nodes for `source`: it has recurrent layers (a
    cheap walk over its layers; models without any keep the plain path) and opset >= 13.

    Raises for `stateful=True` layers: tf2onnx freezes the state held at export time into a
    constant and drops the state update, so the graph would silently differ from the model.
    """
    from dlmodels.export import onnx_rnn

    layers = onnx_rnn.all_layers(source)
    recurrent = [layer for layer in layers if onnx_rnn.is_recurrent(layer)]
    if not recurrent:
        return False
    stateful = [layer.name for layer in layers if getattr(layer, "stateful", False)]
    if stateful:
        raise onnx_rnn.NativeRNNError(
            f"cannot export {name!r}: layers {stateful} are stateful=True. An ONNX inference "
            "graph cannot carry state between calls (tf2onnx would freeze the state held at "
            "export time into a constant and drop its update). Rebuild the model with "
            "stateful=False, copy the weights with set_weights, and export that."
        )
    if opset < onnx_rnn.MIN_OPSET:
        logger.warning(
            "%s: native ONNX recurrent nodes need opset >= %d; at opset %d its recurrent layers "
            "%s stay tf2onnx Loops",
            name,
            onnx_rnn.MIN_OPSET,
            opset,
            [layer.name for layer in recurrent],
        )
        return False
    return True


def to_onnx(
    model,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    native_rnn: bool = True,
) -> Path:
    """Convert `model` to an ONNX file whose graph reads like the Keras model.

    Models built under a mixed precision policy are exported as a float32 copy with the same
    weights (a CPU serving graph wants float32; tf2onnx mistypes some float16 layers).

    The model is traced on CPU (so no cuDNN-only op such as CudnnRNNV3 ends up in the graph) as
    a tf.function with a named input signature, converted with tf2onnx with errors surfaced
    (continue_on_error off), checked with `onnx.checker`, and written atomically. Graph inputs
    carry the Keras input names (`image`), graph outputs `model.output_names` (`logits`), and the
    batch dimension is the symbolic `batch`.

    Args:
        model: a functional Keras model (1..n inputs, 1..n outputs).
        path: destination `.onnx` file; parent directories are created.
        opset: ONNX opset (tf2onnx 1.17 supports up to 18).
        overwrite: replace an existing file. Without it an existing `path` raises
            FileExistsError before anything is converted.
        native_rnn: export Keras GRU / LSTM / SimpleRNN layers (also in Bidirectional, masked
            or not) as native ONNX GRU / LSTM / RNN nodes built from the same weights instead of
            tf2onnx's `Loop` (opset >= 13, else a warning; `dlmodels.export.onnx_rnn`), in a
            single conversion. Layers the native ops cannot express (e.g. hard_sigmoid, selu,
            layer-norm cells) stay tf2onnx Loops with a logged warning. False keeps tf2onnx's
            graph as it comes. Models without recurrent layers take the plain path either way.

    Returns:
        The path written.

    Raises:
        FileExistsError: `path` exists and overwrite is False.
        NativeRNNError: with native_rnn, a `stateful=True` recurrent layer (no ONNX graph
            carries state between calls).
        Exception from tf2onnx naming the op when the graph holds an op ONNX cannot express.
    """
    model = as_functional(model)
    path = Path(path)
    check_target(path, overwrite=overwrite)
    if not 7 <= int(opset) <= 18:
        raise UserError(f"opset must be between 7 and 18 for tf2onnx 1.17, got {opset}.")
    want_in, want_out = input_names(model), output_names(model)
    source = float32_copy(model)
    if source is not model:
        logger.warning(
            "%s computes in half precision; exporting a float32 copy with the same weights",
            model.name,
        )
    name = getattr(model, "name", "model")
    native = _native_rnn_plan(source, name, int(opset)) if native_rnn else False
    if native:
        # One conversion: tf2onnx for everything but the recurrent layers, native ONNX GRU /
        # LSTM / RNN nodes built from the Keras weights for those (instead of tf2onnx's Loops);
        # layers the native ops cannot express stay Loops, with a warning.
        from dlmodels.export.onnx_rnn import build_native_rnn

        model_proto = build_native_rnn(source, opset=int(opset), strict=False)
        _fix_names(model_proto, want_in, want_out)
    else:
        with tf.device("/cpu:0"):
            fn = serving_function(source)
            model_proto = _convert(fn, int(opset))
        _check_ops(model_proto, name, int(opset))
        _fix_names(model_proto, want_in, want_out)
        model_proto.producer_name = "dlmodels (tf2onnx)"
    onnx.checker.check_model(model_proto)
    _check_types(model_proto, getattr(model, "name", "model"))
    with atomic_path(path, overwrite=overwrite) as tmp:
        onnx.save(model_proto, str(tmp))
    return path


def onnx_io(path: str | os.PathLike) -> dict:
    """Names, shapes (None / dim name for symbolic dims) and dtypes of an ONNX file's inputs and
    outputs, read from the graph without loading the weights into a session."""
    model = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}

    def describe(vi):
        tt = vi.type.tensor_type
        shape = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        ]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        return {"name": vi.name, "shape": shape, "dtype": dtype}

    return {
        "inputs": [describe(i) for i in model.graph.input if i.name not in init],
        "outputs": [describe(o) for o in model.graph.output],
    }

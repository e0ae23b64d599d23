"""ONNX export through tf2onnx, with the Keras input/output names and a symbolic batch dimension."""

from __future__ import annotations

import dataclasses
import logging
import operator
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

MIN_OPSET = 13
"""Lowest opset `to_onnx` writes: native ONNX GRU / LSTM / RNN nodes, per-axis QDQ
quantization and the Split/Squeeze/Reduce* input forms all need opset 13 or later."""

MAX_OPSET = 18
"""Highest opset tf2onnx 1.17 converts to."""

SIMPLIFY_ATOL = 1e-4
"""Default parity bar of a simplified graph against Keras (the fp32 bar)."""

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


def check_opset(opset) -> int:
    """Return `opset` as an int if MIN_OPSET <= opset <= MAX_OPSET, else raise a UserError."""
    try:
        if isinstance(opset, bool):
            raise TypeError
        value = operator.index(opset)
    except TypeError:
        raise UserError(
            f"opset={opset!r} is not an integer; choose one of {MIN_OPSET}..{MAX_OPSET} "
            f"({DEFAULT_OPSET} by default)."
        ) from None
    if not MIN_OPSET <= value <= MAX_OPSET:
        raise UserError(
            f"opset={value} is out of range: dlmodels exports ONNX opsets {MIN_OPSET}..{MAX_OPSET} "
            f"(tf2onnx 1.17 converts up to {MAX_OPSET}; native recurrent nodes and per-channel "
            f"int8 need >= {MIN_OPSET}). Pass opset={DEFAULT_OPSET} (the default) or another in "
            "that range."
        )
    return value


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
    simplify: bool = False,
    samples=None,
    simplify_atol: float = SIMPLIFY_ATOL,
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
        opset: ONNX opset, MIN_OPSET..MAX_OPSET (13..18; 17 by default). Anything else raises
            before any work.
        overwrite: replace an existing file. Without it an existing `path` raises
            FileExistsError before anything is converted.
        native_rnn: export Keras GRU / LSTM / SimpleRNN layers (also in Bidirectional, masked
            or not) as native ONNX GRU / LSTM / RNN nodes built from the same weights instead of
            tf2onnx's `Loop` (opset >= 13, else a warning; `dlmodels.export.onnx_rnn`), in a
            single conversion. Layers the native ops cannot express (e.g. hard_sigmoid, selu,
            layer-norm cells) stay tf2onnx Loops with a logged warning. False keeps tf2onnx's
            graph as it comes. Models without recurrent layers take the plain path either way.
        simplify: after writing, simplify the graph with onnxslim and keep the result only if
            it passes onnx.checker, strict shape inference and parity with Keras on `samples`
            (`simplify_onnx`); otherwise SimplificationError, with the unsimplified file kept.
        samples: parity inputs for `simplify` (one array, a list in input order or a dict by
            input name); None: a few seeded random inputs, for inputs of fixed size only (a
            free dimension, e.g. (None, None, 3), raises ValueError before anything is
            written: no stand-in size suits every model).
        simplify_atol: parity bar of the simplified graph against Keras.

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
    opset = check_opset(opset)
    check_target(path, overwrite=overwrite)
    if simplify:
        _onnxslim()
        # Parity inputs before anything is written: no stand-ins for free-sized inputs.
        samples = _parity_samples(model, samples)
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
    if simplify:
        simplify_onnx(model, path, samples=samples, atol=simplify_atol)
    return path


# -- simplification --------------------------------------------------------------------------


class SimplificationError(RuntimeError):
    """The simplified graph failed a check (checker, shape inference, IO names or parity); the
    unsimplified file is kept."""


@dataclasses.dataclass
class SimplifyReport:
    """What `simplify_onnx` did.

    Attributes:
        path: the ONNX file (now simplified).
        tool: "onnxslim <version>".
        nodes_before / nodes_after: graph node counts (main graph) around the simplification.
        max_abs_error: max |simplified - Keras| on the parity samples.
        max_abs_error_before: max |unsimplified - Keras| on the same samples.
        atol: the parity bar.
        n_samples: parity samples.
    """

    path: Path
    tool: str
    nodes_before: int
    nodes_after: int
    max_abs_error: float
    max_abs_error_before: float
    atol: float
    n_samples: int

    def settings(self) -> dict:
        """The manifest's `simplification` entry."""
        return {
            "tool": self.tool,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "max_abs_error_vs_keras": self.max_abs_error,
            "max_abs_error_vs_keras_before": self.max_abs_error_before,
            "atol": self.atol,
            "n_samples": self.n_samples,
        }


def _onnxslim():
    try:
        import onnxslim
    except ImportError as err:
        raise UserError(
            "simplify=True needs onnxslim, which is not installed: `pip install onnxslim` "
            '(it comes with `pip install "dlmodels[tf]"`).'
        ) from err
    return onnxslim


def _parity_samples(model, samples) -> dict:
    import numpy as np

    if samples is not None:
        from dlmodels.export.repository import sample_dict

        return sample_dict(model, samples)
    free = {t.name: tuple(t.shape) for t in model.inputs if None in tuple(t.shape)[1:]}
    if free:
        raise UserError(
            f"simplify without samples: inputs {free} have free dimensions, and no stand-in "
            "size suits every model (a deep U-Net needs a multiple of 2**depth). Pass "
            "samples=... of the size the model will serve (the parity check runs on them)."
        )
    # Seeded stand-ins: image-like floats, index 0 for integer inputs (valid for any Embedding).
    rng = np.random.default_rng(0)
    feeds = {}
    for t in model.inputs:
        shape = (2, *(int(d) for d in tuple(t.shape)[1:]))
        dtype = np.dtype(str(t.dtype))
        if np.issubdtype(dtype, np.floating):
            feeds[t.name] = rng.uniform(0, 1, shape).astype(dtype)
        else:
            feeds[t.name] = np.zeros(shape, dtype)
    return feeds


def _ort_outputs(model_proto: onnx.ModelProto, feeds: dict) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def simplify_onnx(
    model,
    path: str | os.PathLike,
    *,
    samples=None,
    atol: float = SIMPLIFY_ATOL,
) -> SimplifyReport:
    """Simplify an ONNX file written by `to_onnx` with onnxslim, keeping it only if still exact.

    onnxslim (pure Python) folds constants, removes identity and dead nodes and fuses
    patterns. The simplified graph must keep the graph input/output names, pass
    `onnx.checker` and strict shape inference, and match the Keras model (its float32 clone,
    what the graph was traced from) to `atol` on `samples`, run in onnxruntime; then it
    replaces `path` atomically and records `dlmodels.simplified_by` in the file's metadata.

    Args:
        model: the Keras model the file was exported from.
        path: the ONNX file, replaced in place.
        samples: parity inputs (one array, a list in input order, a dict by input name);
            None: two seeded random inputs.
        atol: parity bar against Keras.

    Returns:
        A SimplifyReport (node counts before/after, parity).

    Raises:
        SimplificationError: a check failed; the message says which, and `path` still holds
            the unsimplified graph.
    """
    import math

    from dlmodels.export.verify import compare_outputs, keras_outputs

    model = as_functional(model)
    path = Path(path)
    slim_mod = _onnxslim()
    feeds = _parity_samples(model, samples)
    proto = onnx.load(str(path))
    before = len(proto.graph.node)
    name = getattr(model, "name", "model")
    kept = f"the unsimplified file {path} is kept"
    try:
        slim = slim_mod.slim(onnx.ModelProto.FromString(proto.SerializeToString()))
    except Exception as err:
        raise SimplificationError(
            f"onnxslim failed on {path} ({type(err).__name__}: {err}); {kept}"
        ) from err
    io_before, io_after = _io_description(proto), _io_description(slim)
    if io_before != io_after:
        raise SimplificationError(
            f"onnxslim changed the graph IO (names, dtypes or shapes) of {path} from "
            f"{io_before} to {io_after}; {kept}"
        )
    try:
        onnx.checker.check_model(slim)
        _check_types(slim, name)
    except (onnx.checker.ValidationError, ValueError) as err:
        raise SimplificationError(
            f"the simplified graph of {path} fails onnx.checker / shape inference ({err}); {kept}"
        ) from err
    try:
        expected = keras_outputs(float32_copy(model), feeds)
        got_before = _ort_outputs(proto, feeds)
    except Exception as err:
        raise SimplificationError(
            f"the parity check of {path} could not run the Keras model or the unsimplified "
            f"graph on its samples ({type(err).__name__}: {err}); {kept}. Pass samples=... the "
            "model accepts."
        ) from err
    err_before = compare_outputs(expected, got_before, where=str(path))[0]
    try:
        got = _ort_outputs(slim, feeds)
    except Exception as err:
        raise SimplificationError(
            f"onnxruntime cannot run the simplified graph of {path} "
            f"({type(err).__name__}: {err}); {kept}"
        ) from err
    err_after = compare_outputs(expected, got, where=f"{path} (simplified)")[0]
    if not math.isfinite(err_after) or err_after > atol:
        raise SimplificationError(
            f"simplifying {path} with onnxslim broke parity with Keras: max |err| "
            f"{err_after:.3e} > atol {atol:g} (unsimplified: {err_before:.3e}); {kept}. "
            "Export with simplify=False."
        )
    tool = f"onnxslim {getattr(slim_mod, '__version__', '?')}"
    meta = {p.key: p.value for p in slim.metadata_props}
    meta.update({"dlmodels.simplified_by": tool, "dlmodels.nodes_before": str(before)})
    onnx.helper.set_model_props(slim, meta)
    with atomic_path(path, overwrite=True) as tmp:
        onnx.save(slim, str(tmp))
    return SimplifyReport(
        path=path,
        tool=tool,
        nodes_before=before,
        nodes_after=len(slim.graph.node),
        max_abs_error=float(err_after),
        max_abs_error_before=float(err_before),
        atol=float(atol),
        n_samples=len(next(iter(feeds.values()))),
    )


def onnx_io(path: str | os.PathLike) -> dict:
    """Names, shapes (None / dim name for symbolic dims) and dtypes of an ONNX file's inputs and
    outputs, read from the graph without loading the weights into a session."""
    return _io_description(onnx.load(str(path), load_external_data=False))


def _io_description(model: onnx.ModelProto) -> dict:
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

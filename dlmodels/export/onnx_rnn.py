"""Native ONNX `GRU` / `LSTM` / `RNN` nodes for Keras recurrent layers, not tf2onnx's `Loop`.

tf2onnx turns every `keras.layers.GRU` into an ONNX `Loop` over a per-step sub-graph: slow at
small batch and invisible to onnxruntime's quantizer. The ONNX operator set has `GRU` and `LSTM`
ops whose equations are the Keras ones, so the recurrent layers can be expressed exactly:

- Keras GRU `kernel` (in, 3u) and `recurrent_kernel` (u, 3u) are gate-ordered z, r, h like ONNX
  W / R (transposed). `reset_after=True` (the Keras default; r multiplies the recurrent
  projection *including* its bias) is ONNX `linear_before_reset=1` with B = [bias[0], bias[1]];
  `reset_after=False` (r multiplies h_{t-1} before the matmul) is `linear_before_reset=0` with
  B = [bias, 0]. Both define h_t = z * h_{t-1} + (1 - z) * h~ (Keras and ONNX agree).
- Keras LSTM gates are ordered i, f, c, o; ONNX wants i, o, f, c. The single Keras bias goes to
  Wb, Rb is zero.
- `go_backwards` and the backward half of `Bidirectional`: the time axis is reversed explicitly
  (as Keras does), and the backward outputs of `Bidirectional` are flipped back before merging
  (concat, sum, ave, mul or None).
- Masks (from `Masking`, `Embedding(mask_zero=True)`, any mask-producing layer), of any pattern:
  Keras skips a masked step (state carried over), so the result equals the RNN run over the
  unmasked steps only, in order. The graph moves the unmasked steps of each sequence to the front
  (a per-row permutation, `ScatterElements`), runs the native op with `sequence_lens` = number of
  unmasked steps, and gathers the sequence output back to the original positions with the Keras
  convention at masked steps (the previous output, or zeros when `zero_output_for_mask`, which
  `Bidirectional` sets). Right-padding, left-padding and holes all come out exact.

How the graph is built: the model is traced twice on CPU with its recurrent layers intercepted.
In the traced function each recurrent layer call returns a new graph input instead of running,
and its input sequence and mask become extra graph outputs; tf2onnx converts that loop-free
graph, and the native sub-graph (Transpose, optional mask compaction, GRU/LSTM, merge) is spliced
between them. This finds the exact boundaries of every recurrent layer also where tf2onnx would
merge nodes of several layers (it shares constants, shape ops and trip counts across layers), for
functional and Sequential models and recurrent layers inside nested models alike.

Also covered: `return_state=True` (final states from ONNX Y_h / Y_c), an `initial_state`
argument (ONNX initial_h / initial_c), `keras.layers.RNN` around Keras' or dlmodels' GRUCell /
LSTMCell (dlmodels' LSTM peepholes become the ONNX P input), `keras.layers.SimpleRNN` (the ONNX
RNN op). Not expressible natively: `stateful=True` and activations the ONNX RNN ops lack (tanh,
sigmoid and relu are supported): `to_onnx_native_rnn` / `convert_native_rnn` refuse those with a
`NativeRNNError` naming the layer; `dlmodels.export.to_onnx` (native_rnn=True, the default used by
write_repository and the CLI) leaves such a layer a tf2onnx Loop with a logged warning and makes
the others native (stateful layers it refuses: tf2onnx would freeze their state). Always left to
tf2onnx (a Loop, with a warning): layer-normalized LSTM cells, other cells and subclasses of the
Keras layers.

Keras internals relied on (Keras 3.x, setup.cfg bounds keras < 4): Layer.__call__ dispatching to
an instance-level `call` (`_intercept`); tests/export/test_onnx_rnn.py::
test_layer_call_interception_still_works fails with that reason if a release changes it.

    path = to_onnx_native_rnn(model, "model.onnx")
    assert_ops(path, must=("GRU",), must_not=("Loop", "Scan"))
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dlmodels.errors import UserError

logger = logging.getLogger(__name__)

RECURRENT_OPS = ("GRU", "LSTM", "RNN")
"""ONNX ops the rewrite emits: GRU, LSTM, and RNN for keras.layers.SimpleRNN."""
LOOP_OPS = ("Loop", "Scan")
_PREFIX = "dlmodels_rnn"
_MIN_OPSET = 13  # Squeeze/Unsqueeze/ReduceSum with axes as inputs; CumSum; ScatterElements
MIN_OPSET = _MIN_OPSET
"""Lowest opset the native recurrent nodes are built for."""

# Keras activation name -> ONNX RNN activation name.
_ACTIVATIONS = {"tanh": "Tanh", "sigmoid": "Sigmoid", "relu": "Relu"}


class OpAssertionError(AssertionError):
    """An ONNX graph holds an op it must not hold, or lacks one it must hold."""


class NativeRNNError(UserError):
    """A recurrent layer cannot be expressed with the native ONNX GRU / LSTM op."""


# -- op assertions -----------------------------------------------------------------------------
def _all_nodes(graph: onnx.GraphProto):
    """Every node of `graph` and of its sub-graphs (Loop bodies, If branches, Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def op_counts(model_proto_or_path) -> collections.Counter:
    """op_type -> number of nodes, over the main graph and every sub-graph."""
    proto = _load(model_proto_or_path)
    return collections.Counter(n.op_type for n in _all_nodes(proto.graph))


def _load(model_proto_or_path) -> onnx.ModelProto:
    if isinstance(model_proto_or_path, onnx.ModelProto):
        return model_proto_or_path
    path = Path(model_proto_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    return onnx.load(str(path), load_external_data=False)


def assert_ops(
    model_proto_or_path, must: Iterable[str] = (), must_not: Iterable[str] = ()
) -> collections.Counter:
    """Check which ONNX ops an exported graph holds (sub-graphs included).

    Args:
        model_proto_or_path: an `onnx.ModelProto` or the path of an .onnx file.
        must: op types that must appear at least once (e.g. ("GRU",)).
        must_not: op types that must not appear anywhere (e.g. ("Loop", "Scan")).

    Returns:
        The op counts (`op_counts`), for further checks.

    Raises:
        OpAssertionError: naming the missing / forbidden ops, how many forbidden nodes there are
            and their names, and the ops the graph does hold.
    """
    proto = _load(model_proto_or_path)
    counts = op_counts(proto)
    what = (
        str(model_proto_or_path)
        if not isinstance(model_proto_or_path, onnx.ModelProto)
        else f"graph {proto.graph.name!r}"
    )
    problems = []
    missing = [op for op in must if counts[op] == 0]
    if missing:
        problems.append(f"lacks required op(s) {missing}")
    forbidden = [op for op in must_not if counts[op] > 0]
    if forbidden:
        names = [n.name for n in _all_nodes(proto.graph) if n.op_type in forbidden][:5]
        details = ", ".join(f"{op} x{counts[op]}" for op in forbidden)
        problems.append(f"holds forbidden op(s) {details} (nodes {names})")
    if problems:
        held = ", ".join(f"{op} x{n}" for op, n in sorted(counts.items()))
        hint = ""
        if "Loop" in forbidden or "Scan" in forbidden:
            hint = (
                " A Loop usually comes from a Keras GRU/SimpleRNN converted by tf2onnx: export"
                " with dlmodels.export.onnx_rnn.to_onnx_native_rnn (or replace_rnn_loops) to get"
                " native GRU/LSTM nodes."
            )
        raise OpAssertionError(f"ONNX {what} {'; '.join(problems)}. It holds: {held}.{hint}")
    return counts


# -- which layers ------------------------------------------------------------------------------
def _kind(layer) -> str | None:
    """The ONNX op ("GRU" / "LSTM" / "RNN") expressing `layer`, else None: `keras.layers.GRU` /
    `LSTM` / `SimpleRNN` (exact classes: a subclass may change `call`), and `keras.layers.RNN`
    around Keras' GRUCell / LSTMCell / SimpleRNNCell or dlmodels' GRUCell / LSTMCell (peepholes
    included; layer normalization has no ONNX LSTM equivalent and stays with tf2onnx)."""
    import keras

    from dlmodels.layers.recurrent import GRUCell, LSTMCell

    kind = type(layer)
    if kind is keras.layers.GRU:
        return "GRU"
    if kind is keras.layers.LSTM:
        return "LSTM"
    if kind is keras.layers.SimpleRNN:
        return "RNN"
    if kind is keras.layers.RNN:
        cell = type(layer.cell)
        if cell in (keras.layers.GRUCell, GRUCell):
            return "GRU"
        if cell is keras.layers.LSTMCell or (cell is LSTMCell and not layer.cell.layer_norm):
            return "LSTM"
        if cell is keras.layers.SimpleRNNCell:
            return "RNN"
    return None


def _is_bidirectional(layer) -> bool:
    import keras

    return isinstance(layer, keras.layers.Bidirectional)


def is_recurrent(layer) -> bool:
    """`keras.layers.RNN` (GRU, LSTM, SimpleRNN, subclasses) or a `Bidirectional` wrapper."""
    import keras

    return isinstance(layer, keras.layers.RNN) or _is_bidirectional(layer)


def all_layers(model) -> list:
    """Every layer inside `model`, depth first, each once, through public attributes only:
    `.layers` of (nested) models and other containers, `Bidirectional.forward_layer` /
    `backward_layer`, and `RNN.cell` (and the cells of stacked cells)."""
    import keras

    seen: set[int] = set()
    out: list = []

    def visit(layer):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        out.append(layer)
        children = list(getattr(layer, "layers", None) or [])
        if _is_bidirectional(layer):
            children += [layer.forward_layer, layer.backward_layer]
        if isinstance(layer, keras.layers.RNN):
            children.append(layer.cell)
        children += list(getattr(layer, "cells", None) or [])  # StackedRNNCells
        for child in children:
            if isinstance(child, keras.layers.Layer):
                visit(child)

    seen.add(id(model))
    for layer in getattr(model, "layers", None) or []:
        visit(layer)
    return out


def recurrent_layers(model, types: Sequence[str] = RECURRENT_OPS) -> list:
    """The layers `replace_rnn_loops` rewrites: those `_kind` maps to an ONNX op in `types`
    (GRU, LSTM, SimpleRNN, RNN around supported cells) and `Bidirectional` wrappers of them,
    anywhere in `model` (nested models included)."""
    found, inside_bidir = [], set()
    layers = all_layers(model)
    for layer in layers:
        if _is_bidirectional(layer) and _kind(layer.forward_layer) in types:
            found.append(layer)
            inside_bidir.update({id(layer.forward_layer), id(layer.backward_layer)})
    for layer in layers:
        if _kind(layer) in types and id(layer) not in inside_bidir:
            found.append(layer)
    return found


def unconverted_recurrent_layers(model, types: Sequence[str] = RECURRENT_OPS) -> list:
    """Recurrent layers (`keras.layers.RNN` and subclasses, Bidirectional wrappers of them) that
    `recurrent_layers` does not rewrite (layer-normalized LSTM cells, other cells, subclasses):
    tf2onnx converts those as a Loop."""
    import keras

    converted = recurrent_layers(model, types)
    done = {id(layer) for layer in converted}
    for layer in converted:
        if _is_bidirectional(layer):
            done |= {id(layer.forward_layer), id(layer.backward_layer)}
    left = []
    for layer in all_layers(model):
        if id(layer) in done:
            continue
        if isinstance(layer, keras.layers.RNN) or (
            _is_bidirectional(layer) and id(layer.forward_layer) not in done
        ):
            left.append(layer)
            if _is_bidirectional(layer):
                done |= {id(layer.forward_layer), id(layer.backward_layer)}
    return left


def _activation_name(fn, layer, which) -> str:
    import keras

    name = getattr(fn, "__name__", None) or keras.activations.serialize(fn)
    name = str(name).lower()
    if name not in _ACTIVATIONS:
        raise NativeRNNError(
            f"layer {layer.name!r}: `{which}`={name!r} has no ONNX RNN activation. Supported: "
            f"{sorted(_ACTIVATIONS)}. Use one of those, or export with "
            "dlmodels.export.to_onnx(..., native_rnn=False) (tf2onnx Loop); to_onnx with "
            "native_rnn=True also leaves such a layer a Loop, with a warning."
        )
    return _ACTIVATIONS[name]


def _check_layer(layer) -> None:
    rnns = [layer.forward_layer, layer.backward_layer] if _is_bidirectional(layer) else [layer]
    for rnn in rnns:
        if getattr(rnn, "stateful", False):
            raise NativeRNNError(
                f"layer {layer.name!r}: stateful=True carries state between calls, which an "
                "exported inference graph cannot. Rebuild the model with stateful=False and "
                "copy the weights (set_weights)."
            )
        _activation_name(rnn.cell.activation, layer, "activation")
        if hasattr(rnn.cell, "recurrent_activation"):
            _activation_name(rnn.cell.recurrent_activation, layer, "recurrent_activation")
    if _is_bidirectional(layer) and type(layer.forward_layer) is not type(layer.backward_layer):
        raise NativeRNNError(
            f"layer {layer.name!r}: forward and backward layers of different types "
            f"({type(layer.forward_layer).__name__} / {type(layer.backward_layer).__name__})."
        )


# -- tracing with the recurrent layers intercepted ---------------------------------------------
@dataclass
class _Site:
    """One call of a recurrent layer in the traced model."""

    index: int
    layer: object
    time_steps: int | None
    has_mask: bool
    out_shapes: list = field(default_factory=list)  # static shapes, batch None
    n_initial: int = 0  # initial-state tensors passed to the call

    def initial_name(self, j: int) -> str:
        return f"{_PREFIX}{self.index}_init{j}"

    @property
    def in_name(self) -> str:
        return f"{_PREFIX}{self.index}_in"

    @property
    def mask_name(self) -> str:
        return f"{_PREFIX}{self.index}_mask"

    def out_name(self, k: int) -> str:
        return f"{_PREFIX}{self.index}_out{k}"


def _split_call_args(layer, args, kwargs):
    """(sequences, initial states as a list (empty: zeros), mask) of an RNN / Bidirectional
    call."""
    seq = args[0] if args else kwargs.get("sequences", kwargs.get("inputs"))
    initial_state = args[1] if len(args) > 1 else kwargs.get("initial_state")
    if initial_state is None:
        initial_state = []
    elif not isinstance(initial_state, list | tuple):
        initial_state = [initial_state]
    mask = kwargs.get("mask")
    if isinstance(mask, list | tuple):
        mask = mask[0] if mask else None
    return seq, list(initial_state), mask


@contextlib.contextmanager
def _intercept(layers, make_call):
    """Replace `layer.call` on each instance by `make_call(layer, original_call)` for the
    duration; Layer.__call__ binds arguments with the signature it cached at construction, so
    masks and training flags still arrive as keyword arguments."""
    saved = []
    try:
        for layer in layers:
            saved.append((layer, layer.__dict__.get("call")))
            object.__setattr__(layer, "call", make_call(layer, layer.call))
        yield
    finally:
        for layer, previous in saved:
            if previous is None:
                layer.__dict__.pop("call", None)
            else:
                object.__setattr__(layer, "call", previous)


def _discover(model, layers) -> list[_Site]:
    """Trace once with the real recurrent layers, recording each call's shapes and mask."""
    import tensorflow as tf

    from dlmodels.export._signature import input_signature, pack_inputs

    sites: list[_Site] = []

    def make_call(layer, original):
        def call(*args, **kwargs):
            seq, initial, mask = _split_call_args(layer, args, kwargs)
            out = original(*args, **kwargs)
            flat = out if isinstance(out, list | tuple) else [out]
            sites.append(
                _Site(
                    index=len(sites),
                    layer=layer,
                    time_steps=seq.shape[1],
                    has_mask=mask is not None,
                    out_shapes=[(None, *tuple(o.shape[1:])) for o in flat],
                    n_initial=len(initial),
                )
            )
            if seq.shape.rank != 3:
                raise NativeRNNError(
                    f"layer {layer.name!r} got an input of rank {seq.shape.rank}; recurrent "
                    "layers take [batch, time, features]."
                )
            return out

        return call

    def trace(*inputs):
        return model(pack_inputs(model, list(inputs)), training=False)

    with _intercept(layers, make_call), tf.device("/cpu:0"):
        fn = tf.function(trace, input_signature=input_signature(model), autograph=False)
        fn.get_concrete_function()
    return sites


def _cut_function(model, layers, sites: list[_Site]):
    """A tf.function computing the model with each recurrent call replaced by a graph input.

    Inputs: the model's inputs, then `dlmodels_rnn{i}_out{k}` per site. Outputs: the model's
    outputs by name, plus `dlmodels_rnn{i}_in` (the sequence fed to the layer) and
    `dlmodels_rnn{i}_mask` (its boolean mask, when it has one).
    """
    import keras
    import tensorflow as tf

    from dlmodels.export._signature import input_signature, output_names, pack_inputs

    specs = list(input_signature(model))
    n_model_inputs = len(specs)
    for site in sites:
        for k, shape in enumerate(site.out_shapes):
            specs.append(tf.TensorSpec(shape, tf.float32, name=site.out_name(k)))
    names = output_names(model)

    def serve(*args):
        model_inputs, placeholders = list(args[:n_model_inputs]), list(args[n_model_inputs:])
        recorded = []
        by_site, pos = [], 0
        for site in sites:
            by_site.append(placeholders[pos : pos + len(site.out_shapes)])
            pos += len(site.out_shapes)
        counter = iter(range(len(sites)))

        def make_call(layer, original):
            def call(*a, **kw):
                i = next(counter)
                if sites[i].layer is not layer:
                    raise RuntimeError(
                        f"recurrent layers were called in a different order on the second trace "
                        f"({layer.name!r} where {sites[i].layer.name!r} was expected)"
                    )
                seq, initial, mask = _split_call_args(layer, a, kw)
                recorded.append((seq, initial, mask))
                outs = by_site[i]
                return outs[0] if len(outs) == 1 else list(outs)

            return call

        with _intercept(layers, make_call):
            outputs = model(pack_inputs(model, model_inputs), training=False)
        flat = keras.tree.flatten(outputs)
        result = dict(zip(names, flat, strict=True))
        for site, (seq, initial, mask) in zip(sites, recorded, strict=True):
            result[site.in_name] = tf.cast(seq, tf.float32)
            if site.has_mask:
                result[site.mask_name] = tf.cast(mask, tf.bool)
            for j, state in enumerate(initial):
                result[site.initial_name(j)] = tf.cast(state, tf.float32)
        return result

    return tf.function(serve, input_signature=specs, autograph=False)


# -- the native sub-graph ----------------------------------------------------------------------
class _GraphBuilder:
    """Collects nodes and initializers with unique names under one prefix."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}/{hint}_{self._n}"

    def const(self, value, hint="const", dtype=None) -> str:
        name = self.name(hint)
        arr = np.asarray(value, dtype=dtype)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type, inputs, hint=None, n_out=1, output=None, **attrs) -> str | list[str]:
        base = self.name(hint or op_type)
        outs = [output] if output else [f"{base}:{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=base, **attrs))
        return outs[0] if n_out == 1 else outs


def _bias_or_none(cell):
    bias = getattr(cell, "bias", None)
    return None if bias is None else np.asarray(bias.numpy(), np.float32)


def _gru_weights(cell):
    """ONNX (W, R, B, linear_before_reset) for one direction of a GRU cell (Keras or dlmodels)."""
    u = cell.units
    kernel = np.asarray(cell.kernel.numpy(), np.float32)  # (in, 3u), gates z, r, h
    recurrent = np.asarray(cell.recurrent_kernel.numpy(), np.float32)  # (u, 3u)
    bias = _bias_or_none(cell)
    if bias is None:
        b = np.zeros(6 * u, np.float32)
    elif cell.reset_after:  # (2, 3u): input bias, recurrent bias
        b = np.concatenate([bias[0], bias[1]])
    else:  # (3u,): input bias only
        b = np.concatenate([bias, np.zeros(3 * u, np.float32)])
    return kernel.T, recurrent.T, b, int(bool(cell.reset_after))


def _lstm_weights(cell):
    """ONNX (W, R, B, P or None) for one direction of an LSTM cell: gates i, f, c, o -> i, o, f,
    c; dlmodels' peepholes (p_i, p_f, p_o) -> P = [p_i, p_o, p_f]."""
    u = cell.units
    order = np.concatenate([np.arange(0, u), np.arange(3 * u, 4 * u), np.arange(u, 3 * u)])
    kernel = np.asarray(cell.kernel.numpy(), np.float32)[:, order]
    recurrent = np.asarray(cell.recurrent_kernel.numpy(), np.float32)[:, order]
    bias = _bias_or_none(cell)
    if bias is None:
        b = np.zeros(8 * u, np.float32)
    else:
        b = np.concatenate([bias[order], np.zeros(4 * u, np.float32)])
    p = None
    if getattr(cell, "peepholes", False):
        p = np.concatenate(
            [
                np.asarray(cell.input_peephole.numpy(), np.float32),
                np.asarray(cell.output_peephole.numpy(), np.float32),
                np.asarray(cell.forget_peephole.numpy(), np.float32),
            ]
        )
    return kernel.T, recurrent.T, b, p


def _simple_weights(cell):
    """ONNX (W, R, B) for a Keras SimpleRNNCell: h_t = act(x W + h U + b)."""
    kernel = np.asarray(cell.kernel.numpy(), np.float32)
    recurrent = np.asarray(cell.recurrent_kernel.numpy(), np.float32)
    bias = _bias_or_none(cell)
    b = np.zeros(cell.units, np.float32) if bias is None else bias
    return kernel.T, recurrent.T, np.concatenate([b, np.zeros(cell.units, np.float32)])


def _rnn_node(g: _GraphBuilder, rnn, kind, x_tbf, seq_lens, initial):
    """One forward ONNX GRU/LSTM node over time-major `x_tbf`.

    `initial`: [batch, units] state tensors ([h] or [h, c]) or empty for zeros.
    Returns (Y [T, 1, B, U], [Y_h [1, B, U], (Y_c)]).
    """
    cell = rnn.cell
    p = None
    if kind == "GRU":
        w, r, b, lbr = _gru_weights(cell)
    elif kind == "LSTM":
        w, r, b, p = _lstm_weights(cell)
    else:
        w, r, b = _simple_weights(cell)
    if kind == "RNN":
        acts = [_ACTIVATIONS[_name(cell.activation)]]
    else:
        acts = [
            _ACTIVATIONS[_name(cell.recurrent_activation)],
            _ACTIVATIONS[_name(cell.activation)],
        ]
    if kind == "LSTM":
        acts.append(acts[1])
    attrs = {"hidden_size": int(cell.units), "direction": "forward", "activations": acts}
    if kind == "GRU":
        attrs["linear_before_reset"] = lbr
    axes0 = g.const([0], "axis0", np.int64)
    states_in = [g.op("Unsqueeze", [s, axes0], "initial_state") for s in initial]
    inputs = [x_tbf, g.const(w[None], "W"), g.const(r[None], "R"), g.const(b[None], "B")]
    inputs.append(seq_lens or "")
    n_states = 2 if kind == "LSTM" else 1
    inputs.extend(states_in if states_in else [""] * n_states)
    if p is not None:
        inputs.append(g.const(p[None], "P"))
    while inputs and inputs[-1] == "":
        inputs.pop()
    outs = g.op(kind, inputs, kind, n_out=1 + n_states, **attrs)
    return outs[0], outs[1:]


def _name(fn) -> str:
    import keras

    return str(getattr(fn, "__name__", None) or keras.activations.serialize(fn)).lower()


def _reverse_time(g, x_btf):
    """x[:, ::-1] for a [batch, time, ...] tensor of any length."""
    return g.op(
        "Slice",
        [
            x_btf,
            g.const([-1], "rev_start", np.int64),
            g.const([np.iinfo(np.int64).min], "rev_end", np.int64),
            g.const([1], "rev_axis", np.int64),
            g.const([-1], "rev_step", np.int64),
        ],
        "reverse_time",
    )


def _one_direction(g, rnn, kind, x_btf, mask_bt, initial):
    """Keras semantics of one (possibly go_backwards) RNN layer as ONNX nodes.

    Returns (output, final states): output is the [batch, time, units] sequence (in the layer's
    processing order, as Keras returns it) when `rnn.return_sequences`, else the [batch, units]
    last output; final states are [h] (GRU) or [h, c] (LSTM), each [batch, units].
    """
    if rnn.go_backwards:
        x_btf = _reverse_time(g, x_btf)
        if mask_bt is not None:
            mask_bt = _reverse_time(g, mask_bt)
    axes0 = g.const([0], "axis0", np.int64)
    axes1 = g.const([1], "axis1", np.int64)
    axes2 = g.const([2], "axis2", np.int64)
    zero, one = g.const(0, "zero", np.int64), g.const(1, "one", np.int64)
    if mask_bt is None:
        x_tbf = g.op("Transpose", [x_btf], "to_time_major", perm=[1, 0, 2])
        y, states = _rnn_node(g, rnn, kind, x_tbf, None, initial)
        states = [g.op("Squeeze", [s, axes0], "final_state") for s in states]
        if not rnn.return_sequences:
            return states[0], states
        y = g.op("Squeeze", [y, axes1], "squeeze_dir")
        return g.op("Transpose", [y], "to_batch_major", perm=[1, 0, 2]), states
    # Masked: move the unmasked steps of every row to the front, in order.
    m = g.op("Cast", [mask_bt], "mask_int", to=TensorProto.INT64)  # [B, T]
    c = g.op("CumSum", [m, g.const(1, "t_axis", np.int64)], "valid_count")  # inclusive
    lens = g.op("ReduceSum", [m, axes1], "lens", keepdims=0)  # [B]
    t_len = g.op("Gather", [g.op("Shape", [m], "mask_shape"), one], "T", axis=0)
    steps = g.op("Range", [zero, t_len, one], "steps")
    pos_valid = g.op("Sub", [c, one], "pos_valid")
    lens_col = g.op("Unsqueeze", [lens, axes1], "lens_col")
    pos_masked = g.op("Sub", [g.op("Add", [lens_col, steps], "lens_plus_t"), c], "pos_masked")
    mask_bool = g.op("Cast", [m], "mask_bool", to=TensorProto.BOOL)
    pos = g.op("Where", [mask_bool, pos_valid, pos_masked], "pos")
    x_shape = g.op("Shape", [x_btf], "x_shape")
    pos_x = g.op("Expand", [g.op("Unsqueeze", [pos, axes2], "pos_col"), x_shape], "pos_x")
    compact = g.op("ScatterElements", [x_btf, pos_x, x_btf], "compact", axis=1)
    x_tbf = g.op("Transpose", [compact], "to_time_major", perm=[1, 0, 2])
    seq_lens = g.op("Cast", [lens], "seq_lens", to=TensorProto.INT32)
    y, states = _rnn_node(g, rnn, kind, x_tbf, seq_lens, initial)
    states = [g.op("Squeeze", [s, axes0], "final_state") for s in states]
    if initial:
        # A row with every step masked keeps its initial state (Keras never updates it).
        empty = g.op("Unsqueeze", [g.op("Equal", [lens, zero], "empty_row"), axes1], "empty")
        states = [
            g.op("Where", [empty, s0, s], "keep_initial")
            for s0, s in zip(initial, states, strict=True)
        ]
    y = g.op("Squeeze", [y, axes1], "squeeze_dir")
    y = g.op("Transpose", [y], "to_batch_major", perm=[1, 0, 2])
    # Output at step t: the output after the last unmasked step <= t (Keras carries it over),
    # or zeros before any unmasked step / at every masked step with zero_output_for_mask.
    seen = g.op("Greater", [c, zero], "seen_valid")
    if not rnn.return_sequences:
        # Keras returns the last *stacked* output: the output after the last unmasked step
        # (zeros if there is none), or, with zero_output_for_mask, zeros whenever the last step
        # (in processing order, i.e. after a go_backwards reversal) is masked.
        if rnn.zero_output_for_mask:
            last_t = g.const([-1], "last_t", np.int64)
            keep_last = g.op("Gather", [mask_bool, last_t], "last_step_valid", axis=1)  # [B, 1]
        else:
            keep_last = g.op("Unsqueeze", [g.op("Greater", [lens, zero], "any_valid"), axes1], "av")
        zeros = g.op("Mul", [states[0], g.const(np.float32(0.0), "f_zero")], "zeros_like")
        return g.op("Where", [keep_last, states[0], zeros], "last"), states
    idx = g.op("Max", [pos_valid, zero], "gather_idx")
    y_shape = g.op("Shape", [y], "y_shape")
    idx = g.op("Expand", [g.op("Unsqueeze", [idx, axes2], "idx_col"), y_shape], "idx_y")
    gathered = g.op("GatherElements", [y, idx], "scatter_back", axis=1)
    keep = m if rnn.zero_output_for_mask else seen
    keep = g.op("Cast", [keep], "keep_f", to=TensorProto.FLOAT)
    keep = g.op("Unsqueeze", [keep, axes2], "keep_col")
    return g.op("Mul", [gathered, keep], "masked_out"), states


def _merge(g, mode, y_fwd, y_bwd):
    """Bidirectional's merge of the two outputs; a list of one or two tensors."""
    if mode is None:
        return [y_fwd, y_bwd]
    if mode == "concat":
        return [g.op("Concat", [y_fwd, y_bwd], "concat", axis=-1)]
    if mode == "sum":
        return [g.op("Add", [y_fwd, y_bwd], "sum")]
    if mode == "mul":
        return [g.op("Mul", [y_fwd, y_bwd], "mul")]
    if mode == "ave":
        s = g.op("Add", [y_fwd, y_bwd], "sum")
        return [g.op("Mul", [s, g.const(np.float32(0.5), "half")], "ave")]
    raise NativeRNNError(f"Bidirectional merge_mode {mode!r} is not supported")


def _site_graph(site: _Site) -> _GraphBuilder:
    """The nodes computing a site's outputs from its input, mask and initial-state tensors."""
    layer = site.layer
    g = _GraphBuilder(f"{layer.name}/native{site.index}")
    x = site.in_name
    mask = site.mask_name if site.has_mask else None
    initial = [site.initial_name(j) for j in range(site.n_initial)]
    if not _is_bidirectional(layer):
        y, states = _one_direction(g, layer, _kind(layer), x, mask, initial)
        outputs = [y, *states] if layer.return_state else [y]
    else:
        fwd, bwd = layer.forward_layer, layer.backward_layer
        half = len(initial) // 2
        y_fwd, s_fwd = _one_direction(g, fwd, _kind(fwd), x, mask, initial[:half])
        y_bwd, s_bwd = _one_direction(g, bwd, _kind(bwd), x, mask, initial[half:])
        if layer.return_sequences and fwd.go_backwards != bwd.go_backwards:
            y_bwd = _reverse_time(g, y_bwd)  # Bidirectional flips the backward outputs back
        outputs = _merge(g, layer.merge_mode, y_fwd, y_bwd)
        if layer.return_state:
            outputs += [*s_fwd, *s_bwd]
    if len(outputs) != len(site.out_shapes):
        raise RuntimeError(
            f"layer {layer.name!r}: built {len(outputs)} outputs, Keras returned "
            f"{len(site.out_shapes)}"
        )
    for k, t in enumerate(outputs):
        g.op("Identity", [t], "out", output=site.out_name(k))
    return g


# -- splicing ----------------------------------------------------------------------------------
def _subgraph_free_names(graph: onnx.GraphProto) -> set[str]:
    """Names a sub-graph reads from the enclosing scope (Loop / If bodies use outer tensors)."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    used: set[str] = set()
    for node in graph.node:
        used.update(node.input)
        used.update(_node_free_names(node))
        defined.update(node.output)
    used.update(o.name for o in graph.output)
    return used - defined


def _node_free_names(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            names |= _subgraph_free_names(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for g in attr.graphs:
                names |= _subgraph_free_names(g)
    return names


def _node_needs(node: onnx.NodeProto) -> set[str]:
    return set(node.input) | _node_free_names(node)


def _toposort(graph: onnx.GraphProto) -> None:
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        progressed, rest = False, []
        for node in pending:
            if all(i in available for i in _node_needs(node)):
                ordered.append(node)
                available.update(node.output)
                progressed = True
            else:
                rest.append(node)
        if not progressed:
            missing = sorted({i for n in rest for i in _node_needs(n) if i not in available})
            missing = missing[:5]
            raise RuntimeError(f"spliced ONNX graph is not a DAG or lacks tensors {missing}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers nothing needs."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(_node_needs(node))
    del graph.node[:]
    graph.node.extend(reversed(keep))
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _splice(model_proto: onnx.ModelProto, sites: list[_Site]) -> None:
    graph = model_proto.graph
    placeholders = {site.out_name(k) for site in sites for k in range(len(site.out_shapes))}
    extras = {site.in_name for site in sites} | {site.mask_name for site in sites}
    extras |= {site.initial_name(j) for site in sites for j in range(site.n_initial)}
    kept_in = [i for i in graph.input if i.name not in placeholders]
    kept_out = [o for o in graph.output if o.name not in extras]
    del graph.input[:]
    graph.input.extend(kept_in)
    del graph.output[:]
    graph.output.extend(kept_out)
    value_info = [v for v in graph.value_info if v.name not in placeholders | extras]
    del graph.value_info[:]
    graph.value_info.extend(value_info)
    for site in sites:
        g = _site_graph(site)
        graph.node.extend(g.nodes)
        graph.initializer.extend(g.initializers)
    _toposort(graph)
    _prune(graph)


# -- public entry points -----------------------------------------------------------------------
def _opset_of(model_proto: onnx.ModelProto) -> int:
    for imp in model_proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ValueError("the ONNX model declares no default-domain opset")


def stateful_layers(model) -> list:
    """Layers of `model` (nested included) with `stateful=True`."""
    return [layer for layer in all_layers(model) if getattr(layer, "stateful", False)]


def _refusal(layer) -> NativeRNNError | None:
    try:
        _check_layer(layer)
    except NativeRNNError as err:
        return err
    return None


def build_native_rnn(
    model,
    *,
    opset: int = 17,
    types: Sequence[str] = RECURRENT_OPS,
    strict: bool = True,
) -> onnx.ModelProto:
    """One tf2onnx conversion of `model` with its recurrent layers spliced in as native ONNX
    GRU / LSTM / RNN nodes; the graph is named but not yet checked (`convert_native_rnn` and
    `dlmodels.export.to_onnx` check it).

    `strict=True` raises `NativeRNNError` for a layer the native ops cannot express
    (`stateful=True`, an activation outside tanh/sigmoid/relu); `strict=False` leaves such layers
    to tf2onnx (a Loop) with a logged warning, like the layers `_kind` does not map (layer-norm
    LSTM cells, other cells, subclasses).
    """
    import tensorflow as tf

    from dlmodels.export._signature import float32_copy, input_names, output_names
    from dlmodels.export.onnx import _check_ops, _convert, _fix_names

    opset = int(opset)
    if not _MIN_OPSET <= opset <= 18:
        raise ValueError(f"opset must be between {_MIN_OPSET} and 18 for native RNNs, got {opset}")
    bad_types = [t for t in types if t not in RECURRENT_OPS]
    if bad_types:
        raise ValueError(f"`types`={tuple(types)}: allowed are {RECURRENT_OPS}")
    source = _functional(float32_copy(model))
    name = getattr(model, "name", "model")
    layers, refused = [], []
    for layer in recurrent_layers(source, types):
        err = _refusal(layer)
        if err is None:
            layers.append(layer)
        elif strict:
            raise err
        else:
            refused.append((layer, err))
    left = [layer.name for layer in unconverted_recurrent_layers(source, types)]
    left += [layer.name for layer, _ in refused]
    if left:
        reasons = "".join(f" {layer.name}: {err}" for layer, err in refused)
        logger.warning(
            "%s: recurrent layers %s have no native ONNX op here and stay tf2onnx Loops.%s",
            name,
            left,
            reasons,
        )
    want_in, want_out = input_names(source), output_names(source)
    with tf.device("/cpu:0"):
        sites = _discover(source, layers) if layers else []
        fn = _cut_function(source, layers, sites)
        proto = _convert(fn, opset)
    _check_ops(proto, name, opset)
    cut_in = want_in + [s.out_name(k) for s in sites for k in range(len(s.out_shapes))]
    cut_out = list(want_out)
    for s in sites:
        cut_out.append(s.in_name)
        if s.has_mask:
            cut_out.append(s.mask_name)
        cut_out.extend(s.initial_name(j) for j in range(s.n_initial))
    _fix_names(proto, cut_in, cut_out)
    _splice(proto, sites)
    proto.producer_name = "dlmodels (tf2onnx + native RNN)"
    return proto


def convert_native_rnn(model, *, opset: int = 17, types: Sequence[str] = RECURRENT_OPS):
    """Convert `model` to an ONNX ModelProto with native GRU/LSTM nodes for its recurrent layers.

    Graph inputs and outputs are named as `dlmodels.export.to_onnx` names them (Keras input
    names, `model.output_names`, symbolic batch dimension "batch").

    Args:
        model: a functional (or Sequential) Keras model, float32 or mixed precision (exported as
            a float32 copy, as `to_onnx` does).
        opset: ONNX opset, 13..18.
        types: which layer types to make native ("GRU", "LSTM"). Others are left to tf2onnx.

    Returns:
        The checked `onnx.ModelProto`.

    Raises:
        NativeRNNError: a recurrent layer uses an option the native ops cannot express (use
            `dlmodels.export.to_onnx`, which leaves such layers tf2onnx Loops with a warning, or
            `to_onnx(..., native_rnn=False)`).
    """
    from dlmodels.export.onnx import _check_types

    proto = build_native_rnn(model, opset=opset, types=types, strict=True)
    onnx.checker.check_model(proto)
    _check_types(proto, getattr(model, "name", "model"))
    return proto


def _functional(model):
    from dlmodels.export._signature import as_functional

    return as_functional(model)


def replace_rnn_loops(
    model_proto: onnx.ModelProto, keras_model, *, types: Sequence[str] = RECURRENT_OPS
) -> onnx.ModelProto:
    """The post-conversion step: `model_proto` (tf2onnx's export of `keras_model`) with every
    Keras GRU / LSTM (also inside Bidirectional, masked or not) as a native ONNX op.

    tf2onnx shares nodes between layers (constants, shapes, even loop trip counts), so the
    recurrent layers' boundaries cannot be cut out of its graph reliably. This function rebuilds
    the graph instead (`convert_native_rnn`): the same tf2onnx conversion of everything that is
    not recurrent, spliced with native nodes. From `model_proto` it keeps the opset, the graph
    input/output names (matched by position) and the producer and metadata. A model without
    such layers gets `model_proto` back unchanged.

    Args:
        model_proto: the ONNX export of `keras_model` (e.g. from `to_onnx`'s conversion step).
        keras_model: the Keras model it came from (the float32 source).
        types: which layer types to make native.

    Returns:
        A new ModelProto.
    """
    if not recurrent_layers(keras_model, types):
        return model_proto
    new = convert_native_rnn(keras_model, opset=_opset_of(model_proto), types=types)
    graph, old = new.graph, model_proto.graph
    if len(graph.input) != len(old.input) or len(graph.output) != len(old.output):
        raise ValueError(
            f"model_proto has {len(old.input)} inputs / {len(old.output)} outputs, the Keras "
            f"model {len(graph.input)} / {len(graph.output)}: it is not this model's export"
        )
    from dlmodels.export.onnx import _rename_tensor

    for got, want in zip(list(graph.input), list(old.input), strict=True):
        if got.name != want.name:
            _rename_tensor(graph, got.name, want.name)
    for got, want in zip(list(graph.output), list(old.output), strict=True):
        if got.name != want.name:
            _rename_tensor(graph, got.name, want.name)
    if model_proto.producer_name:
        new.producer_name = model_proto.producer_name
    del new.metadata_props[:]
    new.metadata_props.extend(model_proto.metadata_props)
    return new


def _assert_sites_native(proto: onnx.ModelProto, layers) -> None:
    """Every recurrent layer in `layers` became a native GRU / LSTM / RNN node (named after the
    layer by `_site_graph`). Only the recurrent sites are checked: a Loop that some other layer
    (a tf.while_loop in a custom layer) brings is not this exporter's business."""
    made = {n.name.split("/native")[0] for n in proto.graph.node if n.op_type in RECURRENT_OPS}
    missing = [layer.name for layer in layers if layer.name not in made]
    if missing:
        raise OpAssertionError(
            f"recurrent layers {missing} did not become native ONNX {RECURRENT_OPS} nodes; "
            f"the graph holds {dict(op_counts(proto))}"
        )


def to_onnx_native_rnn(
    model,
    path: str | os.PathLike,
    *,
    opset: int = 17,
    overwrite: bool = False,
    types: Sequence[str] = RECURRENT_OPS,
) -> Path:
    """`dlmodels.export.to_onnx` with native ONNX GRU / LSTM nodes for the recurrent layers.

    Writes atomically like `to_onnx`, after asserting that every recurrent layer of `types` became
    a native node (Loops other layers bring, e.g. a tf.while_loop in a custom layer, are allowed).
    Unlike `to_onnx`, refuses (`NativeRNNError`) layers the native ops cannot express.

    Args:
        model: the Keras model.
        path: destination .onnx file.
        opset: ONNX opset (13..18).
        overwrite: replace an existing file.
        types: which recurrent layer types to make native.

    Returns:
        The path written.
    """
    from dlmodels.export._atomic import atomic_path, check_target

    path = Path(path)
    check_target(path, overwrite=overwrite)
    proto = convert_native_rnn(model, opset=opset, types=types)  # warns about layers left
    _assert_sites_native(proto, recurrent_layers(_functional(model), types))
    with atomic_path(path, overwrite=overwrite) as tmp:
        onnx.save(proto, str(tmp))
    return path

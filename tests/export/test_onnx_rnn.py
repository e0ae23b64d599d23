"""Native ONNX GRU / LSTM export: exact against Keras, no Loop, clear refusals."""

import keras
import numpy as np
import onnx
import pytest

from dlmodels import export
from dlmodels.export.onnx_rnn import (
    NativeRNNError,
    OpAssertionError,
    assert_ops,
    convert_native_rnn,
    op_counts,
    replace_rnn_loops,
    to_onnx_native_rnn,
)

T, F = 6, 3


def _randomize(model, seed=0, scale=0.6):
    """Weights far from the initializers (non-zero biases, both bias rows of reset_after)."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        w.assign(rng.normal(0.0, scale, tuple(w.shape)).astype("float32"))


def _masked_batch(seed=1):
    """Rows: full, right-padded, left-padded, holes, all masked, every other step masked."""
    x = np.random.default_rng(seed).normal(size=(6, T, F)).astype("float32")
    x[1, 4:] = 0.0
    x[2, :3] = 0.0
    x[3, 1:3] = 0.0
    x[4] = 0.0
    x[5, ::2] = 0.0
    return x


def _export_and_verify(model, x, tmp_path, must=("GRU",)):
    path = to_onnx_native_rnn(model, tmp_path / "model.onnx")
    counts = assert_ops(path, must=must, must_not=("Loop", "Scan"))
    report = export.verify(model, path, x, atol=1e-4)
    assert report.passed, report
    return counts, report


def test_gru_reset_after_both_ways_sequences_and_last(tmp_path):
    inp = keras.Input((T, F), name="series")
    seq = keras.layers.GRU(4, return_sequences=True, name="gru_after")(inp)
    last = keras.layers.GRU(5, reset_after=False, name="gru_before")(seq)
    no_bias = keras.layers.GRU(3, use_bias=False, name="gru_nobias")(inp)
    model = keras.Model(inp, [seq, last, no_bias])
    _randomize(model)
    counts, report = _export_and_verify(model, _masked_batch(), tmp_path)
    assert counts["GRU"] == 3
    node_attrs = {
        n.name.split("/")[0]: {a.name: a for a in n.attribute}
        for n in onnx.load(str(tmp_path / "model.onnx")).graph.node
        if n.op_type == "GRU"
    }
    assert node_attrs["gru_after"]["linear_before_reset"].i == 1
    assert node_attrs["gru_before"]["linear_before_reset"].i == 0
    assert report.max_abs_error <= 1e-5


def test_lstm_is_native_too(tmp_path):
    inp = keras.Input((T, F), name="series")
    seq = keras.layers.LSTM(4, return_sequences=True, name="lstm1")(inp)
    last = keras.layers.LSTM(3, go_backwards=True, name="lstm2")(seq)
    model = keras.Model(inp, [seq, last])
    _randomize(model)
    counts, _ = _export_and_verify(model, _masked_batch(), tmp_path, must=("LSTM",))
    assert counts["LSTM"] == 2


@pytest.mark.parametrize("merge_mode", ["concat", "sum", "ave", "mul"])
def test_bidirectional_masked_any_pattern(tmp_path, merge_mode):
    inp = keras.Input((T, F), name="series")
    x = keras.layers.Masking(name="masking")(inp)
    seq = keras.layers.Bidirectional(
        keras.layers.GRU(4, return_sequences=True), merge_mode=merge_mode, name="bi_seq"
    )(x)
    last = keras.layers.Bidirectional(keras.layers.GRU(3), merge_mode=merge_mode, name="bi_last")(
        seq
    )
    model = keras.Model(inp, [seq, last])
    _randomize(model, seed=2)
    counts, _ = _export_and_verify(model, _masked_batch(), tmp_path)
    assert counts["GRU"] == 4


def test_bidirectional_merge_mode_none_keeps_both_directions_in_order(tmp_path):
    inp = keras.Input((T, F), name="series")
    x = keras.layers.Masking(name="masking")(inp)
    fwd, bwd = keras.layers.Bidirectional(
        keras.layers.GRU(3, return_sequences=True), merge_mode=None, name="bi"
    )(x)
    model = keras.Model(inp, _named([fwd, bwd], "out"))
    _randomize(model, seed=10)
    _export_and_verify(model, _masked_batch(), tmp_path)


def test_masked_stacked_gru_carries_outputs_over_masked_steps(tmp_path):
    """Keras' GRU (zero_output_for_mask=False) repeats the last output at masked steps and the
    next layer sees the same mask; go_backwards reverses time first."""
    inp = keras.Input((T, F), name="series")
    x = keras.layers.Masking(name="masking")(inp)
    seq = keras.layers.GRU(4, return_sequences=True, name="g1")(x)
    back = keras.layers.GRU(4, return_sequences=True, go_backwards=True, name="g2")(seq)
    last = keras.layers.GRU(2, name="g3")(back)
    bi_lstm = keras.layers.Bidirectional(keras.layers.LSTM(2), name="bi_lstm")(x)
    model = keras.Model(inp, [seq, back, last, bi_lstm])
    _randomize(model, seed=3)
    counts, _ = _export_and_verify(model, _masked_batch(), tmp_path, must=("GRU", "LSTM"))
    assert counts["GRU"] == 3 and counts["LSTM"] == 2


def test_sequential_with_embedding_mask(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((T,), dtype="int32", name="tokens"),
            keras.layers.Embedding(10, 4, mask_zero=True),
            keras.layers.GRU(5),
            keras.layers.Dense(2, name="logits"),
        ],
        name="seq_model",
    )
    _randomize(model, seed=4)
    tokens = np.random.default_rng(0).integers(1, 10, (5, T)).astype("int32")
    tokens[1, 3:] = 0
    tokens[2, :2] = 0
    tokens[3] = 0
    path = to_onnx_native_rnn(model, tmp_path / "model.onnx")
    assert_ops(path, must=("GRU",), must_not=("Loop",))
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["logits"]
    (got,) = export.onnx_predict(path, tokens, fresh_process=True)
    np.testing.assert_allclose(got, model.predict(tokens, verbose=0), atol=1e-5)


def test_tf2onnx_gru_is_a_loop_and_replace_rnn_loops_fixes_it(tmp_path):
    inp = keras.Input((T, F), name="series")
    out = keras.layers.Dense(2, name="logits")(keras.layers.GRU(4)(inp))
    model = keras.Model(inp, out)
    _randomize(model, seed=5)
    plain = export.to_onnx(model, tmp_path / "plain.onnx", native_rnn=False)
    with pytest.raises(OpAssertionError, match=r"forbidden op\(s\) Loop x1.*to_onnx_native_rnn"):
        assert_ops(plain, must_not=("Loop",))
    with pytest.raises(OpAssertionError, match=r"lacks required op\(s\) \['GRU'\]"):
        assert_ops(plain, must=("GRU",))
    proto = replace_rnn_loops(onnx.load(str(plain)), model)
    assert op_counts(proto)["GRU"] == 1 and op_counts(proto)["Loop"] == 0
    assert [i.name for i in proto.graph.input] == ["series"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    onnx.save(proto, str(tmp_path / "native.onnx"))
    x = _masked_batch()
    assert export.verify(model, tmp_path / "native.onnx", x, atol=1e-5).passed


def test_model_without_rnn_is_returned_unchanged():
    inp = keras.Input((F,), name="x")
    model = keras.Model(inp, keras.layers.Dense(2)(inp))
    proto = onnx.ModelProto()
    assert replace_rnn_loops(proto, model) is proto


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (lambda: keras.layers.GRU(3, activation="selu"), "selu"),
        (lambda: keras.layers.LSTM(3, recurrent_activation="hard_sigmoid"), "hard_sigmoid"),
    ],
)
def test_unsupported_options_are_refused(layer, match):
    inp = keras.Input((T, F), name="series")
    out = layer()(inp)
    model = keras.Model(inp, out)
    with pytest.raises(NativeRNNError, match=match):
        convert_native_rnn(model)


def _named(tensors, prefix):
    return [keras.layers.Identity(name=f"{prefix}{i}")(t) for i, t in enumerate(tensors)]


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_return_state_and_initial_state_encoder_decoder(tmp_path, kind):
    """An encoder's final states (masked input, Bidirectional too) start a decoder."""
    cls = getattr(keras.layers, kind)
    enc_in = keras.Input((T, F), name="encoder_in")
    dec_in = keras.Input((T - 2, F), name="decoder_in")
    x = keras.layers.Masking(name="masking")(enc_in)
    enc_out, *states = cls(4, return_state=True, name="encoder")(x)
    _, *bi_states = keras.layers.Bidirectional(
        cls(4, return_state=True, return_sequences=True), name="bi_encoder"
    )(x)
    dec = cls(4, return_sequences=True, name="decoder")(dec_in, initial_state=states)
    backward_states = bi_states[len(bi_states) // 2 :]
    dec_bi = cls(4, go_backwards=True, name="decoder_bi")(dec_in, initial_state=backward_states)
    masked_dec, *masked_states = cls(4, return_state=True, name="masked_decoder")(
        keras.layers.Masking(name="dec_masking")(dec_in), initial_state=states
    )
    outs = [enc_out, *states, *bi_states, dec, dec_bi, masked_dec, *masked_states]
    outs = _named(outs, "out")
    model = keras.Model([enc_in, dec_in], outs)
    _randomize(model, seed=6)
    x_enc = _masked_batch()
    x_dec = np.random.default_rng(7).normal(size=(6, T - 2, F)).astype("float32")
    x_dec[0, 2:] = 0.0
    x_dec[1] = 0.0  # all masked: the decoder keeps the encoder's state, outputs zeros
    counts, _ = _export_and_verify(model, [x_enc, x_dec], tmp_path, must=(kind,))
    assert counts[kind] == 6


def test_cells_in_keras_rnn_are_native(tmp_path):
    from dlmodels.layers import GRUCell, LSTMCell

    inp = keras.Input((T, F), name="series")
    x = keras.layers.Masking(name="masking")(inp)
    a = keras.layers.RNN(GRUCell(4, reset_after=False), return_sequences=True, name="gru_cell")(x)
    b = keras.layers.RNN(LSTMCell(3, peepholes=True), name="peephole_lstm")(a)
    c = keras.layers.Bidirectional(keras.layers.RNN(keras.layers.GRUCell(2)), name="bi_cell")(x)
    model = keras.Model(inp, _named([a, b, c], "out"))
    _randomize(model, seed=8)
    counts, _ = _export_and_verify(model, _masked_batch(), tmp_path, must=("GRU", "LSTM"))
    assert counts["GRU"] == 3 and counts["LSTM"] == 1


def test_layer_norm_lstm_stays_a_loop_with_a_warning(tmp_path, caplog):
    from dlmodels.layers import LSTMCell

    inp = keras.Input((T, F), name="series")
    a = keras.layers.GRU(3, return_sequences=True, name="gru")(inp)
    b = keras.layers.RNN(LSTMCell(3, layer_norm=True), name="ln_lstm")(a)
    model = keras.Model(inp, b)
    _randomize(model, seed=9)
    with caplog.at_level("WARNING"):
        path = to_onnx_native_rnn(model, tmp_path / "m.onnx")
    assert "ln_lstm" in caplog.text and "stay tf2onnx Loops" in caplog.text
    counts = op_counts(path)
    assert counts["GRU"] == 1 and counts["Loop"] == 1
    assert export.verify(model, path, _masked_batch(), atol=1e-4).passed


def test_stateful_is_refused():
    inp = keras.Input(batch_shape=(2, T, F), name="series")
    model = keras.Model(inp, keras.layers.GRU(3, stateful=True, name="g")(inp))
    with pytest.raises(NativeRNNError, match="'g': stateful=True"):
        convert_native_rnn(model)


def test_low_opset_is_refused():
    inp = keras.Input((T, F), name="series")
    model = keras.Model(inp, keras.layers.GRU(3)(inp))
    with pytest.raises(ValueError, match="opset"):
        convert_native_rnn(model, opset=11)


def test_assert_ops_looks_inside_subgraphs():
    from onnx import TensorProto, helper

    vi = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("Sigmoid", ["x_in"], ["y"])],
        "body",
        [vi("i", TensorProto.INT64, []), vi("c", TensorProto.BOOL, []), vi("x_in", 1, [1])],
        [vi("c", TensorProto.BOOL, []), vi("y", 1, [1])],
    )
    loop = helper.make_node("Loop", ["n", "cond", "x"], ["out"], body=body)
    graph = helper.make_graph([loop], "g", [vi("x", 1, [1])], [vi("out", 1, [1])])
    proto = helper.make_model(graph)
    assert op_counts(proto) == {"Loop": 1, "Sigmoid": 1}
    assert_ops(proto, must=("Sigmoid",))
    with pytest.raises(OpAssertionError, match=r"forbidden op\(s\) Sigmoid x1"):
        assert_ops(proto, must_not=("Sigmoid",))


def test_nested_model_and_mixed_precision(tmp_path):
    """A GRU inside a nested functional model, built under mixed_float16: exported as the
    float32 copy, native and exact."""
    keras.config.set_dtype_policy("mixed_float16")
    try:
        inner_in = keras.Input((T, F), name="inner_in")
        inner = keras.Model(
            inner_in, keras.layers.GRU(4, return_sequences=True, name="g")(inner_in), name="inner"
        )
        inp = keras.Input((T, F), name="series")  # (Keras drops masks at nested models)
        out = keras.layers.Dense(2, dtype="float32", name="logits")(
            keras.layers.GRU(3, name="outer")(inner(inp))
        )
        model = keras.Model(inp, out)
    finally:
        keras.config.set_dtype_policy("float32")
    _randomize(model, seed=11, scale=0.3)
    path = to_onnx_native_rnn(model, tmp_path / "model.onnx")
    assert assert_ops(path, must=("GRU",), must_not=("Loop",))["GRU"] == 2
    report = export.verify(model, path, _masked_batch(), atol=1e-2)  # Keras computes in fp16
    assert report.passed, report


def test_simple_rnn_is_the_native_rnn_op(tmp_path):
    inp = keras.Input((T, F), name="series")
    x = keras.layers.Masking(name="masking")(inp)
    seq = keras.layers.SimpleRNN(4, return_sequences=True, name="s1")(x)
    last, state = keras.layers.SimpleRNN(3, activation="relu", return_state=True, name="s2")(seq)
    bi = keras.layers.Bidirectional(keras.layers.SimpleRNN(2), name="bi")(inp)
    model = keras.Model(inp, _named([seq, last, state, bi], "out"))
    _randomize(model, seed=12, scale=0.4)
    counts, _ = _export_and_verify(model, _masked_batch(), tmp_path, must=("RNN",))
    assert counts["RNN"] == 4


def test_to_onnx_makes_gru_native_by_default(tmp_path):
    """`dlmodels.export.to_onnx` (and so write_repository and the CLI) emits the native GRU."""
    inp = keras.Input((T, F), name="series")
    out = keras.layers.Dense(2, name="logits")(keras.layers.GRU(4)(inp))
    model = keras.Model(inp, out)
    _randomize(model, seed=6)
    path = export.to_onnx(model, tmp_path / "default.onnx")
    assert_ops(path, must=("GRU",), must_not=("Loop",))
    assert export.verify(model, path, _masked_batch(), atol=1e-5).passed


@pytest.mark.parametrize("kind", ["GRU", "LSTM", "SimpleRNN"])
@pytest.mark.parametrize("go_backwards", [False, True])
def test_zero_output_for_mask_last_output_is_zero_when_last_step_masked(
    tmp_path, kind, go_backwards
):
    """Keras returns the last *stacked* output, which with zero_output_for_mask is zeros when the
    last processed step is masked (right padding forwards, left padding backwards)."""
    cls = getattr(keras.layers, kind)
    inp = keras.Input((T, F), name="series")
    x = keras.layers.Masking(name="masking")(inp)
    out = cls(4, zero_output_for_mask=True, go_backwards=go_backwards, name="rnn")(x)
    model = keras.Model(inp, out)
    _randomize(model, seed=13, scale=0.5)
    x = _masked_batch()  # row 1 right-padded, row 2 left-padded, holes, all masked
    want = model.predict(x, verbose=0)
    padded_row = 2 if go_backwards else 1
    assert np.all(want[padded_row] == 0.0) and np.abs(want[0]).max() > 0.01
    must = ("RNN",) if kind == "SimpleRNN" else (kind,)
    _, report = _export_and_verify(model, x, tmp_path, must=must)
    assert report.max_abs_error <= 1e-5


def _count_conversions(monkeypatch):
    import dlmodels.export.onnx as onnx_mod

    calls = []
    real = onnx_mod._convert

    def counting(fn, opset):
        calls.append(opset)
        return real(fn, opset)

    monkeypatch.setattr(onnx_mod, "_convert", counting)
    return calls


def test_to_onnx_converts_a_recurrent_model_once(tmp_path, monkeypatch):
    """to_onnx goes straight to the native build: one tf2onnx conversion, not tf2onnx's Loop
    graph followed by a second conversion; a model without recurrent layers: one, plain."""
    calls = _count_conversions(monkeypatch)
    inp = keras.Input((T, F), name="series")
    model = keras.Model(inp, keras.layers.Dense(2, name="logits")(keras.layers.GRU(4)(inp)))
    _randomize(model, seed=14)
    path = export.to_onnx(model, tmp_path / "gru.onnx")
    assert len(calls) == 1
    assert_ops(path, must=("GRU",), must_not=("Loop",))
    assert export.verify(model, path, _masked_batch(), atol=1e-5).passed

    import dlmodels.export.onnx_rnn as onnx_rnn

    def no_native(*a, **k):
        raise AssertionError("the native build ran for a model without recurrent layers")

    monkeypatch.setattr(onnx_rnn, "build_native_rnn", no_native)
    dense_in = keras.Input((F,), name="x")
    dense = keras.Model(dense_in, keras.layers.Dense(2, name="logits")(dense_in))
    export.to_onnx(dense, tmp_path / "dense.onnx")
    assert len(calls) == 2


@pytest.mark.parametrize(
    "make",
    [
        lambda: keras.layers.GRU(4, recurrent_activation="hard_sigmoid", name="odd"),
        lambda: keras.layers.LSTM(4, activation="selu", name="odd"),
        lambda: keras.layers.SimpleRNN(4, activation=None, name="odd"),
    ],
)
def test_to_onnx_leaves_inexpressible_layers_a_loop_with_a_warning(tmp_path, caplog, make):
    """Options the native ops lack do not break to_onnx (write_repository, the CLI): that layer
    stays tf2onnx's Loop, the others are native, and the graph equals Keras."""
    inp = keras.Input((T, F), name="series")
    x = keras.layers.Masking(name="masking")(inp)
    odd = make()(keras.layers.GRU(3, return_sequences=True, name="plain")(x))
    model = keras.Model(inp, keras.layers.Dense(2, name="logits")(odd))
    _randomize(model, seed=15, scale=0.4)
    with caplog.at_level("WARNING"):
        path = export.to_onnx(model, tmp_path / "m.onnx")
    assert "'odd'" in caplog.text and "stay tf2onnx Loops" in caplog.text
    counts = op_counts(path)
    assert counts["GRU"] == 1 and counts["Loop"] == 1
    assert export.verify(model, path, _masked_batch(), atol=1e-4).passed
    with pytest.raises(NativeRNNError, match=r"odd.*native_rnn=False"):
        to_onnx_native_rnn(model, tmp_path / "strict.onnx")


def test_to_onnx_refuses_stateful_with_a_clear_error(tmp_path):
    """tf2onnx freezes a stateful layer's current state into a constant and drops its update:
    the graph would silently not carry state. to_onnx says so; native_rnn=False is unchanged."""
    inp = keras.Input(batch_shape=(2, T, F), name="series")
    model = keras.Model(inp, keras.layers.GRU(3, stateful=True, name="g")(inp))
    with pytest.raises(NativeRNNError, match=r"\['g'\] are stateful=True.*stateful=False"):
        export.to_onnx(model, tmp_path / "s.onnx")
    assert not (tmp_path / "s.onnx").exists()
    assert op_counts(export.to_onnx(model, tmp_path / "loop.onnx", native_rnn=False))["Loop"] == 1


def test_to_onnx_below_opset_13_is_refused_before_any_file(tmp_path):
    """Below 13 there are no native recurrent nodes (nor per-channel int8): `to_onnx` refuses
    the opset with the reason instead of writing a Loop-based graph."""
    inp = keras.Input((T, F), name="series")
    model = keras.Model(inp, keras.layers.GRU(3, name="g")(inp))
    with pytest.raises(ValueError, match=r"opset=12 is out of range.*native recurrent nodes"):
        export.to_onnx(model, tmp_path / "m.onnx", opset=12)
    assert not (tmp_path / "m.onnx").exists()


def test_layer_call_interception_still_works():
    """The native export swaps `layer.call` on the instance while tracing (onnx_rnn._intercept);
    Keras' Layer.__call__ must still dispatch to an instance attribute `call`. If a Keras
    release (supported: 3.x < 4) changes that, this fails with the reason."""
    from dlmodels.export.onnx_rnn import _intercept

    layer = keras.layers.GRU(2)
    x = np.ones((1, T, F), "float32")
    layer(x)

    def make_call(lyr, original):
        def call(*args, **kwargs):
            return keras.ops.full((1, 2), 7.0)

        return call

    with _intercept([layer], make_call):
        got = np.asarray(layer(x))
    assert np.all(got == 7.0), (
        f"Keras {keras.__version__}: Layer.__call__ no longer calls an instance-level `call`, so "
        "dlmodels.export.onnx_rnn cannot cut recurrent layers out of the traced graph"
    )
    assert "call" not in vars(layer) and not np.all(np.asarray(layer(x)) == 7.0)


def test_layer_discovery_uses_public_attributes_only(monkeypatch):
    """recurrent_layers walks `.layers`, Bidirectional's forward/backward layers and RNN.cell,
    not Keras' private `_flatten_layers`."""
    from dlmodels.export.onnx_rnn import all_layers, recurrent_layers, unconverted_recurrent_layers
    from dlmodels.layers import LSTMCell

    inner_in = keras.Input((T, F), name="inner_in")
    inner = keras.Model(
        inner_in, keras.layers.GRU(4, return_sequences=True, name="g_inner")(inner_in), name="in"
    )
    model = keras.Sequential(
        [
            keras.Input((T, F)),
            inner,
            keras.layers.Bidirectional(keras.layers.LSTM(2, return_sequences=True), name="bi"),
            keras.layers.RNN(LSTMCell(2, layer_norm=True), name="ln"),
        ]
    )

    def private(*a, **k):
        raise AssertionError("Keras' private _flatten_layers was used")

    monkeypatch.setattr(keras.layers.Layer, "_flatten_layers", private)
    names = [layer.name for layer in all_layers(model)]
    assert {"in", "g_inner", "bi", "ln"} <= set(names)
    bi = model.get_layer("bi")
    assert {id(bi.forward_layer), id(bi.backward_layer), id(bi.forward_layer.cell)} <= {
        id(layer) for layer in all_layers(model)
    }
    assert [layer.name for layer in recurrent_layers(model)] == ["bi", "g_inner"]
    assert [layer.name for layer in unconverted_recurrent_layers(model)] == ["ln"]


class _CumulativeMax(keras.layers.Layer):
    """A running max over time written as a tf.while_loop: tf2onnx makes it an ONNX Loop that
    has nothing to do with recurrent layers."""

    def call(self, x):
        import tensorflow as tf

        steps = tf.shape(x)[1]

        def body(t, acc, out):
            acc = tf.maximum(acc, x[:, t])
            return t + 1, acc, out.write(t, acc)

        out = tf.TensorArray(x.dtype, size=steps)
        _, _, out = tf.while_loop(
            lambda t, *_: t < steps, body, (0, tf.fill(tf.shape(x[:, 0]), -1e9), out)
        )
        return tf.transpose(out.stack(), [1, 0, 2])


def test_native_export_checks_recurrent_sites_not_every_loop(tmp_path):
    """A Loop from a non-recurrent layer does not fail to_onnx_native_rnn; every GRU is native."""
    inp = keras.Input((T, F), name="series")
    x = _CumulativeMax(name="cummax")(inp)
    out = keras.layers.GRU(3, name="g")(x)
    model = keras.Model(inp, out)
    _randomize(model, seed=16)
    path = to_onnx_native_rnn(model, tmp_path / "m.onnx")
    counts = op_counts(path)
    assert counts["GRU"] == 1 and counts["Loop"] >= 1
    assert export.verify(model, path, _masked_batch(), atol=1e-5).passed

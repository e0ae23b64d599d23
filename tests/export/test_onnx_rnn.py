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

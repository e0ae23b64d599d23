"""LSTMCell / GRUCell: equal to the Keras layers with the same weights, forward and gradients."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dlmodels.layers import GRUCell, LSTMCell, SequenceCheck
from tests.helpers import run_layer_test

B, T, F, U = 3, 5, 4, 6


def _x(seed=0):
    return np.random.default_rng(seed).normal(size=(B, T, F)).astype("float32")


def _random_weights(layer, seed=0):
    rng = np.random.default_rng(seed)
    for w in layer.weights:
        w.assign(rng.normal(0.0, 0.5, tuple(w.shape)).astype("float32"))


def _outputs_and_grads(layer, x):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * tf.cos(tf.range(tf.size(y), dtype=y.dtype)[: y.shape[-1]]))
    grads = tape.gradient(loss, [x, *layer.trainable_weights])
    return y.numpy(), [g.numpy() for g in grads]


def _assert_same(ours, theirs, x):
    y1, g1 = _outputs_and_grads(ours, x)
    y2, g2 = _outputs_and_grads(theirs, x)
    np.testing.assert_allclose(y1, y2, atol=1e-5)
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("return_sequences", [True, False])
def test_lstm_cell_equals_keras_lstm(return_sequences):
    x = _x()
    theirs = keras.layers.LSTM(U, return_sequences=return_sequences)
    theirs(x)
    _random_weights(theirs)
    ours = keras.layers.RNN(LSTMCell(U), return_sequences=return_sequences)
    ours(x)
    assert [w.shape for w in ours.weights] == [w.shape for w in theirs.weights]
    ours.set_weights(theirs.get_weights())
    _assert_same(ours, theirs, x)


@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_cell_equals_keras_gru(reset_after):
    x = _x(1)
    theirs = keras.layers.GRU(U, reset_after=reset_after, return_sequences=True)
    theirs(x)
    _random_weights(theirs, 1)
    ours = keras.layers.RNN(GRUCell(U, reset_after=reset_after), return_sequences=True)
    ours(x)
    assert [w.shape for w in ours.weights] == [w.shape for w in theirs.weights]
    ours.set_weights(theirs.get_weights())
    _assert_same(ours, theirs, x)


def test_forget_bias_initialised_to_one():
    cell = LSTMCell(U)
    keras.layers.RNN(cell)(_x())
    bias = cell.bias.numpy()
    np.testing.assert_array_equal(bias[U : 2 * U], 1.0)
    np.testing.assert_array_equal(np.delete(bias, np.s_[U : 2 * U]), 0.0)


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _ln(v, gamma, beta, eps):
    return (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + eps) * gamma + beta


def _numpy_lstm(cell, x):
    """Reference: Gers et al. 2000 peepholes and Ba et al. 2016 layer norm, step by step."""
    w = {v.name: v.numpy().astype("float64") for v in cell.weights}
    h = np.zeros((x.shape[0], cell.units))
    c = np.zeros_like(h)
    eps = cell.layer_norm_epsilon
    for t in range(x.shape[1]):
        xp, hp = x[:, t] @ w["kernel"], h @ w["recurrent_kernel"]
        if cell.layer_norm:
            z = _ln(xp, w["input_gamma"], w["input_beta"], eps)
            z = z + _ln(hp, w["recurrent_gamma"], w["recurrent_beta"], eps)
        else:
            z = xp + hp + w["bias"]
        zi, zf, zc, zo = np.split(z, 4, axis=-1)
        if cell.peepholes:
            zi, zf = zi + w["input_peephole"] * c, zf + w["forget_peephole"] * c
        c = _sigmoid(zf) * c + _sigmoid(zi) * np.tanh(zc)
        if cell.peepholes:
            zo = zo + w["output_peephole"] * c
        c_out = _ln(c, w["cell_gamma"], w["cell_beta"], eps) if cell.layer_norm else c
        h = _sigmoid(zo) * np.tanh(c_out)
    return h


@pytest.mark.parametrize(("peepholes", "layer_norm"), [(True, False), (False, True), (True, True)])
def test_lstm_variants_match_the_paper_equations(peepholes, layer_norm):
    x = _x(2)
    cell = LSTMCell(U, peepholes=peepholes, layer_norm=layer_norm)
    rnn = keras.layers.RNN(cell)
    rnn(x)
    _random_weights(rnn, 2)
    np.testing.assert_allclose(rnn(x).numpy(), _numpy_lstm(cell, x.astype("float64")), atol=1e-5)
    names = {w.name for w in cell.weights}
    assert ("input_peephole" in names) == peepholes
    assert ("cell_gamma" in names) == layer_norm
    assert ("bias" in names) == (not layer_norm)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (LSTMCell, {"units": U}),
        (LSTMCell, {"units": U, "peepholes": True, "layer_norm": True, "dropout": 0.1}),
        (GRUCell, {"units": U}),
        (GRUCell, {"units": U, "reset_after": False, "recurrent_dropout": 0.1}),
    ],
)
def test_cells_in_rnn_pass_the_shared_layer_checks(cls, kwargs):
    def rnn(**kw):
        return keras.layers.RNN(cls(**kw), return_sequences=True)

    run_layer_test(rnn, kwargs, (B, T, F), (B, T, U))


def test_dropout_is_training_only():
    x = _x(3)
    rnn = keras.layers.RNN(GRUCell(U, dropout=0.5, seed=1), return_sequences=True)
    np.testing.assert_array_equal(rnn(x).numpy(), rnn(x).numpy())
    assert not np.allclose(rnn(x, training=True).numpy(), rnn(x).numpy())


@pytest.mark.parametrize("cls", [LSTMCell, GRUCell])
@pytest.mark.parametrize("units", [0, -3, 2.5, True])
def test_bad_units(cls, units):
    with pytest.raises(ValueError, match="`units` must be a positive integer"):
        cls(units)


@pytest.mark.parametrize("cls", [LSTMCell, GRUCell])
def test_cell_called_on_a_sequence_says_wrap_it(cls):
    with pytest.raises(ValueError, match=r"Wrap the cell in keras.layers.RNN"):
        cls(U).build((B, T, F))


@pytest.mark.parametrize("cls", [LSTMCell, GRUCell])
def test_bad_dropout(cls):
    with pytest.raises(ValueError, match="`dropout` must be a float in"):
        cls(U, dropout=1.5)


def test_sequence_check_passes_the_shared_layer_checks():
    run_layer_test(SequenceCheck, {"rank": 3}, (B, T, F), (B, T, F), train_step=False)


def test_sequence_check_refuses_wrong_rank_and_empty_sequences():
    with pytest.raises(ValueError, match=r"expected \[batch, time, features\].*rank 2"):
        SequenceCheck()(np.zeros((B, F), "float32"))
    with pytest.raises(ValueError, match="sequences of length 0"):
        SequenceCheck()(np.zeros((B, 0, F), "float32"))
    with pytest.raises(ValueError, match=r"\[batch, time\] token ids"):
        SequenceCheck(rank=2)(np.zeros((B, T, F), "int32"))


def test_private_keras_dropout_mixin_is_still_there():
    """dlmodels' cells inherit Keras' private DropoutRNNCell so that keras.layers.RNN resets
    their dropout masks once per call. A Keras release that moves or drops it must fail here,
    loudly, not silently reuse one dropout mask across batches."""
    import importlib

    try:
        module = importlib.import_module("keras.src.layers.rnn.dropout_rnn_cell")
        mixin = module.DropoutRNNCell
    except (ImportError, AttributeError) as err:
        pytest.fail(
            f"Keras {keras.__version__} no longer has keras.src.layers.rnn.dropout_rnn_cell."
            f"DropoutRNNCell ({err}); dlmodels.layers.recurrent relies on it (supported: Keras "
            "3.x < 4). Port the cells' dropout to the new Keras API."
        )
    for cls in (GRUCell, LSTMCell):
        assert issubclass(cls, mixin), f"{cls.__name__} must inherit Keras' DropoutRNNCell"
    for name in ("get_dropout_mask", "get_recurrent_dropout_mask", "reset_dropout_mask"):
        assert hasattr(mixin, name), f"Keras' DropoutRNNCell lost `{name}`, which the cells use"
    # keras.layers.RNN must still reset the masks per call: two training calls on the same input
    # then draw different masks.
    for cell in (GRUCell(8, dropout=0.5, recurrent_dropout=0.5, seed=1), LSTMCell(8, dropout=0.5)):
        rnn = keras.layers.RNN(cell)
        x = np.ones((4, 5, 3), "float32")
        a, b = rnn(x, training=True), rnn(x, training=True)
        assert not np.allclose(a, b), (
            f"keras.layers.RNN no longer resets {type(cell).__name__}'s dropout masks per call "
            f"(Keras {keras.__version__}): the DropoutRNNCell contract changed"
        )

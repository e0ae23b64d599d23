"""Sequence classifier and forecaster: shared model checks, native ONNX export, bad input."""

import keras
import numpy as np
import pytest

import dlmodels
from dlmodels import export
from dlmodels.export.onnx_rnn import assert_ops, to_onnx_native_rnn
from dlmodels.layers import LSTMCell, SequenceCheck
from dlmodels.models import (
    Seq2SeqForecaster,
    SequenceClassifier,
    SequenceForecaster,
    output_kind,
    seq2seq_inference_model,
    teacher_forcing_inputs,
)
from tests.helpers import run_model_test

T, F = 5, 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cell": "gru", "units": (6, 4)},
        {"cell": "lstm", "units": 4, "bidirectional": True, "masking": True},
        {"cell": "lstm", "units": 4, "peepholes": True, "layer_norm": True},
    ],
)
def test_classifier_harness(kwargs):
    run_model_test(
        lambda: SequenceClassifier((T, F), 3, dropout=0.1, recurrent_dropout=0.1, **kwargs),
        (2, T, F),
        (2, 3),
    )


@pytest.mark.parametrize(
    "kwargs, out_shape",
    [
        ({"mode": "many_to_one", "horizon": 4, "output_features": 1, "units": 5}, (2, 4, 1)),
        ({"mode": "many_to_many", "cell": "lstm", "units": (4, 4)}, (2, T, F)),
    ],
)
def test_forecaster_harness(kwargs, out_shape):
    run_model_test(lambda: SequenceForecaster((T, F), dropout=0.1, **kwargs), (2, T, F), out_shape)


def test_registered_and_return_logits_or_raw_values():
    assert {"sequence_classifier", "sequence_forecaster"} <= set(dlmodels.models.list())
    clf = dlmodels.models.get("sequence_classifier", input_shape=(None, F), num_classes=4)
    assert clf.output_names == ["logits"] and output_kind(clf) == "logits"
    fc = dlmodels.models.get("sequence_forecaster", input_shape=(T, F), horizon=2)
    assert fc.output_names == ["forecast"] and tuple(fc.output.shape) == (None, 2, F)
    assert dlmodels.models.entry("sequence_forecaster").task == "forecasting"


def test_builtin_layers_by_default_cells_only_when_needed():
    model = SequenceClassifier((T, F), 2, cell="lstm", units=(4, 4), bidirectional=True)
    inner = [layer.forward_layer for layer in model.layers if hasattr(layer, "forward_layer")]
    assert len(inner) == 2 and all(type(layer) is keras.layers.LSTM for layer in inner)
    model = SequenceClassifier((T, F), 2, cell="lstm", units=4, peepholes=True)
    rnn = model.get_layer("lstm1")
    assert type(rnn) is keras.layers.RNN and isinstance(rnn.cell, LSTMCell)
    assert type(SequenceForecaster((T, F)).get_layer("gru1")) is keras.layers.GRU


def test_masked_padding_does_not_change_the_prediction():
    model = SequenceClassifier((None, F), 2, units=4, masking=True, bidirectional=True)
    x = np.random.default_rng(0).normal(size=(1, T, F)).astype("float32")
    padded = np.concatenate([x, np.zeros((1, 3, F), "float32")], axis=1)
    np.testing.assert_allclose(model(padded).numpy(), model(x).numpy(), atol=1e-6)


def test_token_classifier_with_embedding_mask():
    model = SequenceClassifier((None,), 2, vocab_size=12, units=4, masking=True)
    tokens = np.array([[3, 4, 5, 0, 0]], "int32")
    np.testing.assert_allclose(model(tokens).numpy(), model(tokens[:, :3]).numpy(), atol=1e-6)


@pytest.mark.parametrize(
    "build",
    [
        lambda: SequenceClassifier((None, F), 3, units=(5, 4), bidirectional=True, masking=True),
        lambda: SequenceForecaster((T, F), 2, units=(5, 4), cell="gru", reset_after=False),
        lambda: SequenceForecaster((T, F), mode="many_to_many", cell="lstm", masking=True),
    ],
)
def test_native_onnx_export_of_the_models(tmp_path, build):
    model = build()
    rng = np.random.default_rng(0)
    for w in model.weights:
        w.assign(rng.normal(0, 0.4, tuple(w.shape)).astype("float32"))
    x = rng.normal(size=(4, T, F)).astype("float32")
    x[1, 3:] = 0.0
    x[2, :2] = 0.0
    path = to_onnx_native_rnn(model, tmp_path / "m.onnx")
    kind = "LSTM" if any("lstm" in layer.name for layer in model.layers) else "GRU"
    assert_ops(path, must=(kind,), must_not=("Loop", "Scan"))
    assert export.verify(model, path, x, atol=1e-4).passed


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: SequenceClassifier((T, F), 2, units=0), "`units` must be a positive integer"),
        (lambda: SequenceClassifier((T, F), 2, units=(4, -1)), "`units` must be a positive"),
        (lambda: SequenceClassifier((T, F, 2), 2), r"must be \(time, features\)"),
        (lambda: SequenceClassifier((F,), 2), r"must be \(time, features\)"),
        (lambda: SequenceForecaster((0, F)), "has 0 time steps"),
        (lambda: SequenceClassifier((T, F), 2, cell="rnn"), "`cell`='rnn' is not supported"),
        (lambda: SequenceClassifier((T, F), 2, peepholes=True), "LSTM options"),
        (lambda: SequenceForecaster((T, F), mode="many_to_many", bidirectional=True), "causal"),
        (lambda: SequenceForecaster((T, F), 3, mode="many_to_many"), "one step ahead"),
        (lambda: SequenceClassifier((T, F), 2, dropout=1.0), "`dropout` must be a float"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_wrong_rank_and_zero_length_at_call_time_are_clear_errors():
    model = SequenceClassifier((T, F), 2, units=4)
    with pytest.raises(ValueError, match=r"expected (ndim|shape)|incompatible"):
        model(np.zeros((2, T), "float32"))
    model = SequenceForecaster((None, F), units=4)
    with pytest.raises(ValueError, match="sequences of length 0"):
        model(np.zeros((2, 0, F), "float32"))
    with pytest.raises(ValueError, match="sequences of length 0"):
        model.predict(np.zeros((2, 0, F), "float32"), verbose=0)
    check = SequenceCheck()
    with pytest.raises(ValueError, match=r"expected \[batch, time, features\].*rank 2"):
        check(np.zeros((2, T), "float32"))


H = 3


def test_seq2seq_training_model_harness():
    run_model_test(
        lambda: Seq2SeqForecaster((T, F), H, output_features=2, units=4),
        [((None, H, 2), "float32"), ((None, T, F), "float32")],  # model.inputs order
        (2, H, 2),
    )


def test_seq2seq_inference_is_autoregressive_over_the_same_weights():
    model = Seq2SeqForecaster((T, F), H, output_features=1, cell="lstm", units=4)
    infer = seq2seq_inference_model(model)
    assert {w.path for w in infer.weights} == {w.path for w in model.weights}
    x = np.random.default_rng(0).normal(size=(2, T, F)).astype("float32")
    auto = infer(x).numpy()
    # Teacher forcing with the model's own predictions reproduces the autoregressive forecast.
    dec = np.concatenate([x[:, -1:, :1], auto[:, :-1]], axis=1)
    forced = model({"series": x, "decoder_inputs": dec}).numpy()
    np.testing.assert_allclose(forced, auto, atol=1e-5)
    dec_in = teacher_forcing_inputs(x, auto).numpy()
    np.testing.assert_allclose(dec_in, dec)


def test_seq2seq_inference_exports_native_and_exact(tmp_path):
    model = Seq2SeqForecaster((T, F), H, output_features=2, units=4)
    rng = np.random.default_rng(1)
    for w in model.weights:
        w.assign(rng.normal(0, 0.4, tuple(w.shape)).astype("float32"))
    infer = seq2seq_inference_model(model)
    path = to_onnx_native_rnn(infer, tmp_path / "s2s.onnx")
    counts = assert_ops(path, must=("GRU",), must_not=("Loop", "Scan"))
    assert counts["GRU"] == 1 + H
    x = rng.normal(size=(4, T, F)).astype("float32")
    assert export.verify(infer, path, x, atol=1e-4).passed


def test_seq2seq_task_trains_with_the_trainer():
    import tensorflow as tf

    from dlmodels.training import Trainer, resolve_strategy
    from dlmodels.training.seq2seq import Seq2SeqTask

    rng = np.random.default_rng(2)
    t = np.arange(T + H)[None, :, None] + rng.uniform(0, 6, (64, 1, 1))
    series = np.sin(t).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((series[:, :T], series[:, T:])).batch(16)
    strategy = resolve_strategy("default")
    with strategy.scope():
        model = Seq2SeqForecaster((T, 1), H, units=8)
        task = Seq2SeqTask(model, optimizer=keras.optimizers.Adam(0.02))
    trainer = Trainer(task, strategy=strategy, progress=False)
    before = trainer.evaluate(ds)
    trainer.fit(ds, epochs=8)
    after = trainer.evaluate(ds)
    assert after["mae"] < 0.7 * before["mae"], (before, after)
    with pytest.raises(ValueError, match="`loss`='huber' is not supported"):
        Seq2SeqTask(model, loss="huber")


def test_seq2seq_bad_arguments():
    with pytest.raises(ValueError, match="exceeds the 3 input features"):
        Seq2SeqForecaster((T, F), H, output_features=4)
    with pytest.raises(ValueError, match="`horizon` must be a positive integer"):
        Seq2SeqForecaster((T, F), 0)
    with pytest.raises(ValueError, match="not a Seq2SeqForecaster"):
        seq2seq_inference_model(SequenceForecaster((T, F)))

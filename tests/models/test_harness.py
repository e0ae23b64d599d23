"""The shared helper (tests/helpers.py) checks what it claims: each check goes red on a layer or
model broken in the way it guards against, and input specs cover several and integer inputs."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tests.helpers as helpers
from dlmodels.layers import BottleneckBlock, ConvNormAct
from tests.helpers import (
    _wrap,
    assert_clone_computes_the_same,
    assert_config_roundtrip,
    assert_keras_roundtrip,
    assert_mixed_precision,
    assert_saved_model_parity,
    assert_train_step,
    make_inputs,
    normalize_specs,
    run_model_test,
)

SPEC = [((None, 8, 8, 3), "float32", None)]


def _x(seed=0):
    return make_inputs(SPEC, seed=seed)[0]


def _tiny_model(layer, *, float32_head=True):
    inp = keras.Input((8, 8, 3), name="image")
    x = layer(inp)
    x = keras.layers.Conv2D(2, 1, name="head_conv")(x)
    out = keras.layers.Activation(
        "linear", dtype="float32" if float32_head else None, name="logits"
    )
    return keras.Model(inp, out(x))


# -- broken layers -----------------------------------------------------------------------------
class _WritesOutChannels(BottleneckBlock):
    """Writes its output width (4 x filters) as `filters`: the clone is 4x wider."""

    def get_config(self):
        config = super().get_config()
        config["filters"] = self.out_channels
        return config


class _DropsDilation(ConvNormAct):
    """Forgets a constructor argument in its config (and so does its clone)."""

    def get_config(self):
        config = super().get_config()
        del config["dilation_rate"]
        return config


class _CastsToFloat32(ConvNormAct):
    """Computes in float16 but hands float32 on (doubles the activation memory downstream)."""

    def call(self, inputs, training=None):
        return keras.ops.cast(super().call(inputs, training=training), "float32")


class _Float32Conv(ConvNormAct):
    """Its conv ignores the layer's policy (a hard-coded dtype) and computes in float32."""

    def __init__(self, filters, **kwargs):
        super().__init__(filters, **kwargs)
        self.conv = keras.layers.Conv2D(
            filters, 3, padding="same", use_bias=False, name="conv", dtype="float32"
        )


class _NormOnlyEager(ConvNormAct):
    """Drops its norm in traced graphs (SavedModel, ONNX, predict): a broken export path."""

    def call(self, inputs, training=None):
        if tf.executing_eagerly():
            return super().call(inputs, training=training)
        return self.act(self.conv(inputs))


class _StopsGradient(ConvNormAct):
    """Blocks the gradient of its conv kernel."""

    def call(self, inputs, training=None):
        x = keras.ops.stop_gradient(self.conv(inputs))
        return self.act(self.norm_layer(x, training=training))


class _DeadWeight(keras.layers.Layer):
    """A trainable weight that gets a gradient (zero) but never changes the output."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(), initializer="ones", name="w")

    def call(self, inputs):
        return inputs + 0.0 * self.w


class _InfiniteGradient(keras.layers.Layer):
    """sqrt(w - 1) at w = 1: a finite output with an infinite gradient."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(), initializer="ones", name="w")

    def call(self, inputs):
        return inputs + keras.ops.sqrt(self.w - 1.0)


# -- config ------------------------------------------------------------------------------------
def test_config_equality_catches_an_argument_that_does_not_round_trip():
    x = _x()
    layer = _WritesOutChannels(2)
    layer(x)
    with pytest.raises(AssertionError, match=r"changed the config at keys \['filters'\]"):
        assert_config_roundtrip(layer)
    clone = _WritesOutChannels.from_config(layer.get_config())
    clone(x)
    assert len(clone.weights) == len(layer.weights)  # the old check (weight count) passed


def test_clone_outputs_catch_a_dropped_argument():
    x = _x()
    layer = _DropsDilation(4, dilation_rate=2)
    layer(x)
    clone = assert_config_roundtrip(layer)  # clone drops it too: the configs agree
    clone(x)
    assert len(clone.weights) == len(layer.weights)  # the old check passed
    with pytest.raises(AssertionError, match=r"config clone with copied weights"):
        assert_clone_computes_the_same(layer, clone, x)


# -- mixed precision ---------------------------------------------------------------------------
def test_mixed_precision_catches_a_float32_output():
    x = _x()
    with pytest.raises(AssertionError, match=r"output of .* is float32, expected float16"):
        assert_mixed_precision(lambda: _wrap(_CastsToFloat32(4), SPEC), x)
    assert_mixed_precision(lambda: _wrap(ConvNormAct(4), SPEC), x)  # the unbroken layer passes


def test_mixed_precision_catches_a_float32_sublayer():
    with pytest.raises(AssertionError, match=r"/conv computes in float32"):
        assert_mixed_precision(lambda: _wrap(_Float32Conv(4), SPEC), _x())


def test_mixed_precision_catches_a_float16_head():
    x = _x()
    with pytest.raises(AssertionError, match=r"model output 0 is float16, expected float32"):
        assert_mixed_precision(
            lambda: _tiny_model(ConvNormAct(4), float32_head=False), x, float32_outputs=True
        )
    assert_mixed_precision(lambda: _tiny_model(ConvNormAct(4)), x, float32_outputs=True)


# -- norm statistics ---------------------------------------------------------------------------
def test_random_norm_statistics_expose_an_export_that_drops_a_norm(monkeypatch):
    x = _x()
    keras.utils.set_random_seed(0)
    model = _tiny_model(_NormOnlyEager(4, name="body"))
    with monkeypatch.context() as m:  # fresh statistics: the norm is an identity
        m.setattr(helpers, "randomize_norm_statistics", lambda *a, **k: 0)
        assert_saved_model_parity(model, x)
    with pytest.raises(AssertionError, match=r"SavedModel vs eager Keras"):
        assert_saved_model_parity(model, x)


def test_random_norm_statistics_expose_a_reload_that_loses_them(monkeypatch):
    real_load = keras.saving.load_model

    def lossy_load(*args, **kwargs):  # a format that does not keep BatchNorm statistics
        loaded = real_load(*args, **kwargs)
        for v in loaded.non_trainable_weights:
            v.assign(np.full(v.shape, 1.0 if "variance" in v.path else 0.0, "float32"))
        return loaded

    monkeypatch.setattr(keras.saving, "load_model", lossy_load)
    x = _x()
    keras.utils.set_random_seed(0)
    with monkeypatch.context() as m:
        m.setattr(helpers, "randomize_norm_statistics", lambda *a, **k: 0)
        assert_keras_roundtrip(_tiny_model(ConvNormAct(4)), x)
    with pytest.raises(AssertionError, match=r"\.keras reload"):
        assert_keras_roundtrip(_tiny_model(ConvNormAct(4)), x)


# -- one training step -------------------------------------------------------------------------
def test_train_step_catches_a_missing_gradient():
    x = _x()
    with pytest.raises(AssertionError, match=r"no gradient for trainable weights \[.*conv/kernel"):
        assert_train_step(_wrap(_StopsGradient(4), SPEC), x)
    assert_train_step(_wrap(ConvNormAct(4), SPEC), x)


def test_train_step_catches_a_non_finite_gradient():
    with pytest.raises(AssertionError, match=r"non-finite gradient"):
        assert_train_step(_wrap(_InfiniteGradient(), SPEC), _x())


def test_train_step_catches_a_step_that_changes_nothing():
    with pytest.raises(AssertionError, match=r"did not change the output"):
        assert_train_step(_wrap(_DeadWeight(), SPEC), _x())


# -- input specs -------------------------------------------------------------------------------
def test_input_specs():
    specs, single = normalize_specs((2, 4, 4, 3))
    assert single and specs == [((2, 4, 4, 3), "float32", None)]
    specs, single = normalize_specs([((None, 4, 4, 3), "float32"), ((None,), "int32", 5)])
    assert not single and specs[1] == ((None,), "int32", 5)
    image, label = make_inputs(specs)
    assert image.shape == (2, 4, 4, 3) and image.dtype == np.float32
    assert label.shape == (2,) and label.dtype == np.int32 and label.max() < 5
    with pytest.raises(ValueError, match="only the batch dimension"):
        make_inputs(normalize_specs([((None, None, 3), "float32")])[0])


def _conditioned_segmenter(num_labels=5):
    """image + an integer class label (embedded, broadcast over the map) -> per-pixel logits."""
    image = keras.Input((16, 16, 3), name="image")
    label = keras.Input((), dtype="int32", name="label")
    x = ConvNormAct(4, name="stem")(image)
    e = keras.layers.Embedding(num_labels, 4, name="embed")(label)
    e = keras.layers.Reshape((1, 1, 4), name="embed_map")(e)
    x = keras.layers.Add(name="condition")([x, e])
    x = ConvNormAct(4, name="body")(x)
    x = keras.layers.Conv2D(3, 1, name="head_conv")(x)
    logits = keras.layers.Activation("linear", dtype="float32", name="logits")(x)
    return keras.Model([image, label], logits, name="conditioned")


def test_run_model_test_with_a_float_and_an_integer_input():
    run_model_test(
        _conditioned_segmenter,
        [((None, 16, 16, 3), "float32"), ((None,), "int32", 5)],
        (None, 16, 16, 3),
    )

import keras
import numpy as np
import pytest

from dlmodels.layers import ConvNormAct
from tests.helpers import run_layer_test


@pytest.mark.parametrize(
    "kwargs",
    [
        {"filters": 8},
        {"filters": 8, "norm": "group", "norm_groups": 4, "activation": "swish"},
        {"filters": 8, "norm": "instance", "activation": "leaky_relu"},
        {"filters": 8, "norm": "layer", "activation": "gelu"},
        {"filters": 8, "norm": None, "activation": None},
        {"filters": 8, "norm": "sync_batch"},
        {"filters": 8, "preact": True},
    ],
)
def test_conv_norm_act_harness(kwargs):
    run_layer_test(ConvNormAct, kwargs, (2, 12, 12, 4), (2, 12, 12, 8))


def test_strides_and_dilation_shapes():
    x = np.zeros((1, 16, 16, 3), "float32")
    assert ConvNormAct(4, strides=2)(x).shape == (1, 8, 8, 4)
    assert ConvNormAct(4, dilation_rate=4)(x).shape == (1, 16, 16, 4)
    assert ConvNormAct(4, padding="valid")(x).shape == (1, 14, 14, 4)


def test_matches_keras_reference_in_inference():
    """conv -> BN (inference) -> relu equals the same computation with keras built-ins."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 9, 3)).astype("float32")
    layer = ConvNormAct(5, kernel_size=3, norm="batch", activation="relu")
    layer(x)
    kernel = rng.standard_normal((3, 3, 3, 5)).astype("float32")
    gamma, beta = rng.random(5) + 0.5, rng.standard_normal(5)
    mean, var = rng.standard_normal(5), rng.random(5) + 0.5
    layer.conv.kernel.assign(kernel)
    layer.norm_layer.set_weights([gamma, beta, mean, var])
    conv = keras.ops.convert_to_numpy(keras.ops.conv(x, kernel, padding="same"))
    expected = np.maximum((conv - mean) / np.sqrt(var + 1e-5) * gamma + beta, 0)
    np.testing.assert_allclose(layer(x, training=False), expected, atol=1e-4)


def test_preact_order_and_leaky_slope():
    x = -np.ones((1, 4, 4, 2), "float32")
    layer = ConvNormAct(
        2, kernel_size=1, norm=None, activation="leaky_relu", preact=True, kernel_initializer="ones"
    )
    # preact: leaky(-1) = -0.01 per channel, then the 1x1 conv of ones sums 2 channels (+ bias 0)
    np.testing.assert_allclose(layer(x), np.full((1, 4, 4, 2), -0.02), atol=1e-6)
    post = ConvNormAct(
        2, kernel_size=1, norm=None, activation="leaky_relu_0.2", kernel_initializer="ones"
    )
    np.testing.assert_allclose(post(x), np.full((1, 4, 4, 2), -0.4), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"filters": 8, "norm": "batchnorm"}, r"`norm`='batchnorm'.*'batch'"),
        ({"filters": 8, "activation": "relux"}, r"`activation`='relux'"),
        ({"filters": 0}, r"`filters`.*positive.*0"),
        ({"filters": -3}, r"`filters`"),
        ({"filters": 8, "norm": "group", "norm_groups": 3}, r"norm_groups"),
        ({"filters": 8, "strides": 2, "dilation_rate": 2}, r"strides"),
        ({"filters": 8, "padding": "full"}, r"`padding`"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConvNormAct(**kwargs)

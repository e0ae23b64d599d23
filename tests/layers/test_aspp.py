"""ASPP (DeepLabv3): harness, parameter count by hand, the forward pass against a reference built
from Keras convolution ops, the atrous rates per output stride, argument errors."""

import keras
import numpy as np
import pytest

from dlmodels.layers.aspp import ASPP, rates_for_output_stride
from tests.helpers import run_layer_test


@pytest.mark.parametrize(
    "kwargs",
    [
        {"filters": 4, "rates": (1, 2, 3)},
        {"filters": 4, "rates": (1, 2), "separable": True, "dropout": 0.0},
        {"filters": 8, "rates": (2,), "norm": "group", "norm_groups": 4, "activation": "swish"},
    ],
)
def test_aspp_harness(kwargs):
    """Shape, config round trip, .keras, mixed float16 everywhere, one training step."""
    run_layer_test(ASPP, kwargs, (2, 8, 8, 8), (2, 8, 8, kwargs["filters"]))


def test_parameter_count_by_hand():
    """C_in = 8, filters = 4, BatchNorm (4 variables per channel), convs without bias:
    1x1 branch 8*4 + 16; three 3x3 atrous branches 3 * (9*8*4 + 16); image pooling 8*4 + 16;
    projection of the 5*4 concatenated channels 20*4 + 16  ->  48 + 912 + 48 + 96 = 1104.
    Separable: each atrous branch is depthwise 9*8 + BN(8) 32, pointwise 8*4 + 16 = 152,
    so 48 + 3*152 + 48 + 96 = 648."""
    x = np.zeros((1, 8, 8, 8), "float32")
    layer = ASPP(4, (6, 12, 18))
    layer(x)
    assert layer.count_params() == 1104
    separable = ASPP(4, (6, 12, 18), separable=True)
    separable(x)
    assert separable.count_params() == 648
    # Trainable: BN moving statistics (2 per channel) are not.
    trainable = sum(int(np.prod(w.shape)) for w in layer.trainable_weights)
    assert trainable == 1104 - 2 * 4 * 6


def test_forward_equals_reference_from_keras_conv_ops():
    """norm=None, dropout 0: project(concat(conv1x1(x), atrous_r(x) for r in rates,
    broadcast(conv1x1(mean(x))))) recomputed with keras.ops.conv from the layer's own weights.
    A wrong dilation rate, a dropped branch, a mis-ordered concat or an image-level branch that
    is not the spatial mean fails."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 11, 3)).astype("float32")
    rates = (1, 2, 4)
    layer = ASPP(5, rates, norm=None, activation="relu", dropout=0.0)
    y = keras.ops.convert_to_numpy(layer(x))
    relu = lambda t: np.maximum(keras.ops.convert_to_numpy(t), 0.0)  # noqa: E731

    def conv(inputs, unit, rate=1):
        kernel, bias = unit.conv.get_weights()
        out = keras.ops.conv(inputs, kernel, padding="same", dilation_rate=rate)
        return relu(out + bias)

    branches = [conv(x, layer.conv1x1)]
    branches += [conv(x, unit, r) for unit, r in zip(layer.atrous, rates, strict=True)]
    pooled = conv(x.mean(axis=(1, 2), keepdims=True), layer.pool_conv)
    branches.append(np.broadcast_to(pooled, (2, 9, 11, 5)))
    expected = conv(np.concatenate(branches, axis=-1), layer.project)
    np.testing.assert_allclose(y, expected, atol=1e-5)
    # The rates matter on this 9x11 map: rate 1 everywhere gives another result.
    plain = np.concatenate(
        [branches[0]] + [conv(x, unit, 1) for unit in layer.atrous] + [branches[-1]], axis=-1
    )
    assert np.max(np.abs(conv(plain, layer.project) - expected)) > 1e-2


def np_depthwise_same(x, kernel, bias, rate):
    """3x3 depthwise convolution, dilation `rate`, zero 'same' padding, in float64 loops over
    the nine taps: out[h, w, c] = sum_ij x[h + (i-1) r, w + (j-1) r, c] k[i, j, c] + b[c]."""
    n, h, w, c = x.shape
    padded = np.pad(x.astype("float64"), ((0, 0), (rate, rate), (rate, rate), (0, 0)))
    out = np.zeros((n, h, w, c))
    for i in range(3):
        for j in range(3):
            out += padded[:, i * rate : i * rate + h, j * rate : j * rate + w] * kernel[i, j, :, 0]
    return out + bias


def test_separable_forward_equals_numpy_reference():
    """DeepLabv3+'s atrous separable branches with norm=None: depthwise 3x3 atrous conv (+bias)
    -> ReLU -> pointwise 1x1 conv (+bias) -> ReLU, against numpy. Swapping the depthwise rate,
    skipping its activation or the pointwise conv fails."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 9, 11, 3)).astype("float32")
    rates = (1, 3)
    layer = ASPP(4, rates, norm=None, activation="relu", dropout=0.0, separable=True)
    layer(x)  # build
    for dw in layer.depthwise:  # non-zero depthwise biases in the check
        dw.bias.assign(rng.standard_normal(dw.bias.shape).astype("float32"))
    y = keras.ops.convert_to_numpy(layer(x))
    relu = lambda t: np.maximum(t, 0.0)  # noqa: E731

    def pointwise(inputs, unit):
        kernel, bias = unit.conv.get_weights()
        return relu(inputs @ kernel[0, 0].astype("float64") + bias)

    branches = [pointwise(x, layer.conv1x1)]
    for dw, unit, r in zip(layer.depthwise, layer.atrous, rates, strict=True):
        assert dw.dilation_rate == (r, r) and dw.kernel.shape == (3, 3, 3, 1)
        kernel, bias = (w.astype("float64") for w in dw.get_weights())
        branches.append(pointwise(relu(np_depthwise_same(x, kernel, bias, r)), unit))
    pooled = pointwise(x.mean(axis=(1, 2), keepdims=True), layer.pool_conv)
    branches.append(np.broadcast_to(pooled, (2, 9, 11, 4)))
    expected = pointwise(np.concatenate(branches, axis=-1), layer.project)
    np.testing.assert_allclose(y, expected, atol=1e-5)


def test_dynamic_spatial_size():
    """The image-level branch resizes to the runtime size: one model, several sizes."""
    inputs = keras.Input((None, None, 6))
    model = keras.Model(inputs, ASPP(4, (1, 2))(inputs))
    for h, w in [(3, 5), (8, 8), (13, 7)]:
        assert model(np.ones((1, h, w, 6), "float32")).shape == (1, h, w, 4)


def test_rates_for_output_stride():
    assert rates_for_output_stride(16) == (6, 12, 18)
    assert rates_for_output_stride(8) == (12, 24, 36)
    assert rates_for_output_stride(32) == (3, 6, 9)
    assert ASPP.rates_for_output_stride(8) == (12, 24, 36)
    with pytest.raises(ValueError, match=r"`output_stride`=4 is not supported.*8, 16, 32"):
        rates_for_output_stride(4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"filters": 0}, r"ASPP: `filters` must be a positive integer"),
        ({"rates": ()}, r"ASPP: `rates` must be a non-empty sequence.*\(6, 12, 18\)"),
        ({"rates": 6}, r"ASPP: `rates` must be a non-empty sequence"),
        ({"rates": (6, 0)}, r"ASPP: `rates` must be a positive integer.*got 0"),
        ({"dropout": 1.0}, r"ASPP: `dropout` must be a number in \[0, 1\), got 1.0"),
        ({"norm": "batchnorm"}, r"ASPP: `norm`='batchnorm' is not supported"),
        ({"activation": "nope"}, r"ASPP: `activation`='nope' is not a Keras activation"),
        ({"separable": "no"}, r"ASPP: `separable` must be True .* or False .*got 'no'"),
        ({"separable": None}, r"ASPP: `separable` must be True .*got None"),
    ],
)
def test_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ASPP(**kwargs)

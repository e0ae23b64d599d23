"""ResidualBlock / BottleneckBlock against the papers' equations computed in numpy.

The numpy convolution pads every side by dilation * (k - 1) // 2 and then convolves "valid" with
the given stride and dilation: "same" for stride 1, and for strided 3x3 convs the symmetric
padding of the Caffe/Torch models (TF "same" would pad bottom/right only on the even sizes used
here, so these tests also pin the sampling grid).
"""

import keras
import numpy as np
import pytest

from dlmodels.layers import BottleneckBlock, ResidualBlock
from tests.helpers import run_layer_test

EPS = 1e-5


def np_conv(x, conv, stride=1, dilation=1):
    w = keras.ops.convert_to_numpy(conv.kernel)
    k = w.shape[0]
    p = dilation * (k - 1) // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    oh = (xp.shape[1] - dilation * (k - 1) - 1) // stride + 1
    ow = (xp.shape[2] - dilation * (k - 1) - 1) // stride + 1
    y = np.zeros((x.shape[0], oh, ow, w.shape[-1]))
    for i in range(k):
        for j in range(k):
            r, c = i * dilation, j * dilation
            patch = xp[
                :, r : r + stride * (oh - 1) + 1 : stride, c : c + stride * (ow - 1) + 1 : stride
            ]
            y += patch @ w[i, j]
    if conv.use_bias:
        y += keras.ops.convert_to_numpy(conv.bias)
    return y


def np_bn(x, norm):
    gamma, beta, mean, var = (keras.ops.convert_to_numpy(w) for w in norm.weights)
    return (x - mean) / np.sqrt(var + EPS) * gamma + beta


def relu(x):
    return np.maximum(x, 0)


def np_se(h, layer):
    s = h.mean(axis=(1, 2), keepdims=True)
    s = relu(np_conv(s, layer.se_reduce))
    return h * (1 / (1 + np.exp(-np_conv(s, layer.se_expand))))


def randomize(layer, rng):
    """Fixed random weights everywhere; BN statistics with positive variances."""
    for v in layer.weights:
        shape = tuple(v.shape)
        if "moving_variance" in v.path or "gamma" in v.path:
            v.assign(rng.uniform(0.5, 1.5, shape).astype("float32"))
        else:
            v.assign((0.3 * rng.standard_normal(shape)).astype("float32"))


def reference(layer, x, *, kind, preact, stride, dilation, stride_in_1x1=False):
    """He et al. 2015 (post) / 2016 (full pre-activation) equations, in numpy."""
    proj = layer.shortcut_conv is not None
    if kind == "basic":
        convs = [(layer.conv1, stride, dilation), (layer.conv2, 1, dilation)]
        norms = [layer.norm1, layer.norm2]
    else:
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        convs = [(layer.conv1, s1, 1), (layer.conv2, s3, dilation), (layer.conv3, 1, 1)]
        norms = [layer.norm1, layer.norm2, layer.norm3]
    if not preact:
        h = x
        for i, (conv, s, d) in enumerate(convs):
            h = np_bn(np_conv(h, conv, s, d), norms[i])
            if i < len(convs) - 1:
                h = relu(h)
        if layer.se_reduce is not None:
            h = np_se(h, layer)
        sc = np_bn(np_conv(x, layer.shortcut_conv, stride), layer.shortcut_norm) if proj else x
        return relu(h + sc)
    p = relu(np_bn(x, layer.preact_norm))
    h = p
    for i, (conv, s, d) in enumerate(convs):
        if i > 0:
            h = relu(np_bn(h, norms[i - 1]))
        h = np_conv(h, conv, s, d)
    if layer.se_reduce is not None:
        h = np_se(h, layer)
    sc = np_conv(p, layer.shortcut_conv, stride) if proj else x
    return h + sc


CASES = [
    # (kind, preact, in_channels, filters, stride, dilation, extra kwargs)
    ("basic", False, 4, 4, 1, 1, {}),
    ("basic", False, 4, 6, 2, 1, {}),
    ("basic", True, 4, 4, 1, 2, {}),
    ("basic", True, 4, 6, 2, 1, {}),
    ("basic", False, 4, 4, 1, 1, {"se_ratio": 0.5}),
    ("bottleneck", False, 8, 2, 1, 1, {}),
    ("bottleneck", False, 4, 2, 2, 1, {"stride_in_1x1": True}),
    ("bottleneck", False, 4, 2, 2, 1, {"stride_in_1x1": False}),
    ("bottleneck", True, 8, 2, 1, 4, {}),
    ("bottleneck", True, 4, 2, 2, 1, {"stride_in_1x1": False}),
    ("bottleneck", True, 4, 2, 2, 1, {"stride_in_1x1": True, "se_ratio": 0.25}),
    ("bottleneck", False, 8, 2, 1, 2, {"use_bias": True}),
]


@pytest.mark.parametrize("kind, preact, cin, filters, stride, dilation, extra", CASES)
def test_matches_paper_equations_in_numpy(kind, preact, cin, filters, stride, dilation, extra):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, cin)).astype("float32")
    cls = ResidualBlock if kind == "basic" else BottleneckBlock
    layer = cls(filters, strides=stride, dilation_rate=dilation, preact=preact, **extra)
    layer(x)
    randomize(layer, rng)
    got = keras.ops.convert_to_numpy(layer(x, training=False))
    s11 = extra.get("stride_in_1x1", not preact)
    want = reference(
        layer,
        x.astype("float64"),
        kind=kind,
        preact=preact,
        stride=stride,
        dilation=dilation,
        stride_in_1x1=s11,
    )
    assert got.shape == want.shape == (2, 8 // stride, 8 // stride, layer.out_channels)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_default_stride_placement_follows_the_paper_of_each_form():
    assert BottleneckBlock(4).stride_in_1x1 is True  # He et al. 2015 Caffe models
    assert BottleneckBlock(4, preact=True).stride_in_1x1 is False  # fb.resnet.torch / slim


@pytest.mark.parametrize("dilation", [2, 4])
@pytest.mark.parametrize("cls", [ResidualBlock, BottleneckBlock])
def test_dilation_keeps_size(cls, dilation):
    x = np.zeros((1, 16, 16, 8), "float32")
    y = cls(8, dilation_rate=dilation)(x)
    assert y.shape[1:3] == (16, 16)
    y = cls(2, dilation_rate=dilation, preact=True)(x)
    assert y.shape[1:3] == (16, 16)


def test_projection_iff_shape_changes():
    def proj(layer, channels):
        layer(np.zeros((1, 8, 8, channels), "float32"))
        return layer.shortcut_conv is not None

    assert not proj(ResidualBlock(4), 4)
    assert proj(ResidualBlock(4), 8)
    assert proj(ResidualBlock(4, strides=2), 4)
    assert proj(ResidualBlock(4, use_projection=True), 4)
    assert not proj(BottleneckBlock(2), 8)
    assert proj(BottleneckBlock(2), 4)
    assert proj(BottleneckBlock(2, strides=2), 8)
    # identity with a stride subsamples the input
    layer = ResidualBlock(4, strides=2, use_projection=False, norm=None)
    assert not proj(layer, 4)
    with pytest.raises(ValueError, match=r"use_projection`=False.*8 channels"):
        ResidualBlock(4, use_projection=False)(np.zeros((1, 8, 8, 8), "float32"))


@pytest.mark.parametrize("preact", [False, True])
def test_stochastic_depth_inference_is_the_plain_block(preact):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 8, 8, 8)).astype("float32")
    plain = BottleneckBlock(2, preact=preact)
    dropped = BottleneckBlock(2, preact=preact, stochastic_depth_rate=0.7)
    plain(x)
    dropped(x)
    randomize(plain, rng)
    dropped.set_weights(plain.get_weights())
    np.testing.assert_allclose(dropped(x, training=False), plain(x, training=False), atol=1e-6)
    np.testing.assert_allclose(dropped(x), plain(x), atol=1e-6)  # training=None -> inference


def test_stochastic_depth_training_drops_whole_branches_per_sample():
    """Per sample: either the shortcut alone, or shortcut + branch / (1 - p) (inverted scaling)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, 6, 6, 4)).astype("float32")
    # norm=None: the branch is the same function in training and inference
    kw = {"preact": True, "norm": None}
    plain = ResidualBlock(4, **kw)
    plain(x)
    rate = 0.5
    sd = ResidualBlock(4, stochastic_depth_rate=rate, seed=3, **kw)
    sd(x)
    sd.set_weights(plain.get_weights())
    branch = keras.ops.convert_to_numpy(plain(x)) - x
    y = keras.ops.convert_to_numpy(sd(x, training=True))
    dropped = np.all(np.abs(y - x) < 1e-6, axis=(1, 2, 3))
    kept = np.all(np.abs(y - (x + branch / (1 - rate))) < 1e-4, axis=(1, 2, 3))
    assert np.all(dropped ^ kept)
    assert 4 <= dropped.sum() <= 28
    # rate close to 1: (almost) every sample returns its shortcut
    near_one = ResidualBlock(4, stochastic_depth_rate=0.999, seed=3, **kw)
    near_one(x)
    near_one.set_weights(plain.get_weights())
    y = keras.ops.convert_to_numpy(near_one(x, training=True))
    dropped = np.all(np.abs(y - x) < 1e-6, axis=(1, 2, 3))
    assert dropped.sum() >= 30


LAYER_VARIANTS = [
    (ResidualBlock, {"filters": 8}, 8, 1),
    (ResidualBlock, {"filters": 8, "strides": 2}, 4, 2),
    (ResidualBlock, {"filters": 8, "preact": True, "strides": 2}, 4, 2),
    (ResidualBlock, {"filters": 8, "preact": True, "dilation_rate": 2}, 8, 1),
    (BottleneckBlock, {"filters": 2}, 8, 1),
    (BottleneckBlock, {"filters": 2, "strides": 2, "stride_in_1x1": False}, 4, 2),
    (BottleneckBlock, {"filters": 2, "preact": True, "strides": 2}, 4, 2),
    (
        BottleneckBlock,
        {
            "filters": 8,
            "se_ratio": 0.25,
            "stochastic_depth_rate": 0.2,
            "norm": "group",
            "norm_groups": 4,
            "activation": "swish",
            "use_bias": None,
        },
        32,
        1,
    ),
]


@pytest.mark.parametrize("cls, kwargs, cin, stride", LAYER_VARIANTS)
def test_residual_harness(cls, kwargs, cin, stride):
    out = kwargs["filters"] * cls.expansion
    run_layer_test(cls, kwargs, (2, 8, 8, cin), (2, 8 // stride, 8 // stride, out))


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (ResidualBlock, {"filters": 0}, r"`filters`.*positive.*0"),
        (ResidualBlock, {"filters": 4, "norm": "bn"}, r"`norm`='bn'.*'batch'"),
        (ResidualBlock, {"filters": 4, "activation": "relux"}, r"`activation`='relux'"),
        (
            BottleneckBlock,
            {"filters": 4, "strides": 2, "dilation_rate": 2},
            r"`strides`=\(2, 2\) and `dilation_rate`=\(2, 2\).*Allowed",
        ),
        (ResidualBlock, {"filters": 4, "se_ratio": 0.0}, r"`se_ratio`.*\(0, 1\].*0\.0"),
        (ResidualBlock, {"filters": 4, "se_ratio": 1.5}, r"`se_ratio`.*1\.5"),
        (
            BottleneckBlock,
            {"filters": 4, "stochastic_depth_rate": 1.0},
            r"`stochastic_depth_rate`.*\[0, 1\).*1\.0",
        ),
        (BottleneckBlock, {"filters": 4, "stochastic_depth_rate": -0.1}, r"stochastic_depth"),
        (ResidualBlock, {"filters": 4, "use_projection": "yes"}, r"`use_projection`='yes'"),
        (ResidualBlock, {"filters": 4, "use_bias": "auto"}, r"`use_bias`='auto'"),
    ],
)
def test_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from dlmodels.bench.flops import axis_valid_pairs, count_macs, graph_macs, same_pad_before


def test_count_macs_equals_hand_count_per_op_type():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(5, 3, padding="same")(inputs)
    x = keras.layers.Conv2D(6, 3, padding="same", dilation_rate=2, groups=1)(x)
    x = keras.layers.Conv2DTranspose(4, 2, strides=2)(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(7)(x)
    model = keras.Model(inputs, outputs)
    expected = (
        8 * 8 * 5 * (3 * 3 * 3)  # conv: output elements x kernel taps x input channels
        + 8 * 8 * 6 * (3 * 3 * 5)  # dilation does not change the count
        + 8 * 8 * 6 * (2 * 2 * 4)  # transposed conv: input elements x taps x output channels
        + 16 * 16 * 4 * (3 * 3)  # depthwise
        + 4 * 7  # dense
    )
    assert count_macs(model) == expected
    assert count_macs(model, batch=3) == 3 * expected
    # Effective: per axis, 8 outputs x 3 taps less those reading padding. 3x3 SAME: the first
    # output's left tap and the last one's right tap (24 - 2 = 22); rate 2: taps at -2 / +2
    # miss for 2 outputs each (24 - 4 = 20); the depthwise on 16: 48 - 2 = 46. The transposed
    # conv and the dense layer count as before.
    effective = 22 * 22 * 5 * 3 + 20 * 20 * 6 * 5 + 8 * 8 * 6 * (2 * 2 * 4) + 46 * 46 * 4 + 4 * 7
    assert count_macs(model, effective=True) == effective
    assert count_macs(model, batch=2, effective=True) == 2 * effective


def test_rate_18_on_16x16_reads_only_the_centre_tap():
    """ASPP's rate-18 branch at output stride 16 of a 256x256 input: taps at -18 / +18 are
    outside a 16-wide map for every output, so 1/9 of the taps read data. The nominal count is
    that of the dilated conv (16 x 16 outputs), not of TensorFlow's SpaceToBatchND lowering
    (which pads 16 + 2 x 18 = 52 up to 54 and computes 18 x 18 outputs before cropping)."""
    inputs = keras.Input((16, 16, 8))
    model = keras.Model(inputs, keras.layers.Conv2D(4, 3, padding="same", dilation_rate=18)(inputs))
    nominal = 16 * 16 * 4 * (3 * 3 * 8)
    assert count_macs(model) == nominal
    assert count_macs(model, effective=True) == 16 * 16 * 4 * 8 == nominal // 9


def _brute_force(size, kernel, stride, dilation, pads):
    """(output, tap) pairs of a 2-D convolution reading inside the input, by looping over
    every output position and tap of both axes; pads: (top, bottom, left, right); stride and
    dilation: an int or (H, W)."""
    (h, w), (top, bottom, left, right) = size, pads
    (sh, sw), (dh, dw) = np.broadcast_to(stride, 2), np.broadcast_to(dilation, 2)
    out_h = (h + top + bottom - (kernel - 1) * dh - 1) // sh + 1
    out_w = (w + left + right - (kernel - 1) * dw - 1) // sw + 1
    count = 0
    for oh, ow, th, tw in itertools.product(
        range(out_h), range(out_w), range(kernel), range(kernel)
    ):
        y = oh * sh - top + th * dh
        x = ow * sw - left + tw * dw
        count += 0 <= y < h and 0 <= x < w
    return int(count), int(out_h), int(out_w)


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "dilation", "pads"),
    [
        ((7, 8), 3, 1, 1, (1, 1, 1, 1)),
        ((7, 8), 3, 2, 1, (1, 1, 0, 1)),  # TF SAME at stride 2: more padding after
        ((7, 8), 3, 1, 2, (2, 2, 2, 2)),
        ((7, 8), 3, 1, 6, (6, 6, 6, 6)),
        ((7, 8), 3, 2, 1, (0, 0, 0, 0)),  # VALID
        ((9, 6), 4, 2, 1, (1, 2, 0, 3)),  # even kernel, asymmetric explicit padding
        ((5, 5), 3, 3, 2, (4, 0, 0, 4)),
        ((16, 16), 3, 1, 18, (18, 18, 18, 18)),
    ],
)
def test_axis_counts_factorise_to_the_brute_force_count(size, kernel, stride, dilation, pads):
    want, out_h, out_w = _brute_force(size, kernel, stride, dilation, pads)
    got = axis_valid_pairs(
        size[0], kernel, out_h, stride=stride, dilation=dilation, pad_before=pads[0]
    ) * axis_valid_pairs(
        size[1], kernel, out_w, stride=stride, dilation=dilation, pad_before=pads[2]
    )
    assert got == want


def _valid_taps_by_tf(size, kernel, stride, dilation, padding):
    """What TensorFlow computes: a convolution of ones with ones gives, at each output, the
    number of taps that read the input (padding reads 0); their sum counts the pairs."""
    x = tf.ones((1, *size, 1))
    w = tf.ones((kernel, kernel, 1, 1))
    y = tf.nn.convolution(x, w, strides=stride, padding=padding, dilations=dilation)
    return int(tf.reduce_sum(y)), y.shape[1], y.shape[2]


@pytest.mark.parametrize("layer", ["conv", "depthwise"])
@pytest.mark.parametrize(
    ("kernel", "stride", "dilation", "padding"),
    [
        (3, 1, 1, "SAME"),
        (3, 2, 1, "SAME"),
        (4, 2, 1, "SAME"),
        (3, 2, 1, "VALID"),
        (3, 1, 2, "SAME"),
        (3, 1, 2, "VALID"),
        (3, 1, 6, "SAME"),
    ],
)
def test_effective_macs_equal_tensorflows_own_tap_count(layer, kernel, stride, dilation, padding):
    """Odd by even input (7 x 8), 3 input channels: the effective count equals the valid pairs
    TensorFlow's own convolution (of ones) sees, times the channels; the nominal count all
    output positions x taps."""
    size, cin, cout = (7, 8), 3, 2
    valid, out_h, out_w = _valid_taps_by_tf(size, kernel, stride, dilation, padding)
    inputs = keras.Input((*size, cin))
    kwargs = {"strides": stride, "dilation_rate": dilation, "padding": padding.lower()}
    if layer == "conv":
        y = keras.layers.Conv2D(cout, kernel, **kwargs)(inputs)
        per_pair, out_channels = cin, cout
    else:
        y = keras.layers.DepthwiseConv2D(kernel, depth_multiplier=2, **kwargs)(inputs)
        per_pair, out_channels = 1, 2 * cin
    model = keras.Model(inputs, y)
    assert count_macs(model) == out_h * out_w * kernel * kernel * per_pair * out_channels
    assert count_macs(model, effective=True) == valid * per_pair * out_channels


def test_explicit_padding_nchw_and_zero_pad_ops():
    """A raw Conv2D op in NCHW with EXPLICIT padding, stride 2 on H and dilation 2 on W; and a
    ZeroPadding2D feeding a VALID conv, which reads the zeros the way SAME padding does."""

    def conv(x):
        w = tf.ones((3, 3, 2, 5))
        pads = [[0, 0], [0, 0], [0, 3], [0, 3]]
        strides, dilations = [1, 1, 2, 1], [1, 1, 1, 2]
        return tf.nn.conv2d(x, w, strides, pads, data_format="NCHW", dilations=dilations)

    graph = tf.function(conv).get_concrete_function(tf.TensorSpec((1, 2, 7, 8))).graph
    valid, out_h, out_w = _brute_force((7, 8), 3, (2, 1), (1, 2), (0, 3, 0, 3))
    assert (out_h, out_w) == (4, 7)
    assert graph_macs(graph) == 4 * 7 * 9 * 2 * 5
    # By hand: H outputs see 3, 3, 3, 1 taps (2o + t < 7; padding read as "before" would
    # give 0, 2, 3, 3); W: 7 + 6 + 4 = 17 (o + 2t < 8).
    assert graph_macs(graph, effective=True) == valid * 2 * 5 == 10 * 17 * 2 * 5

    inputs = keras.Input((7, 8, 3))
    padded = keras.layers.ZeroPadding2D(1)(inputs)
    explicit = keras.Model(inputs, keras.layers.Conv2D(2, 3, padding="valid")(padded))
    same = keras.Model(inputs, keras.layers.Conv2D(2, 3, padding="same")(inputs))
    assert count_macs(explicit) == count_macs(same) == 7 * 8 * 9 * 3 * 2
    assert count_macs(explicit, effective=True) == count_macs(same, effective=True)
    assert count_macs(same, effective=True) == (7 * 3 - 2) * (8 * 3 - 2) * 3 * 2


def test_same_padding_rule():
    # TensorFlow: total = max((ceil(n / s) - 1) s + (k - 1) d + 1 - n, 0), before = total // 2.
    assert same_pad_before(8, 3, 2, 1) == 0  # total 1: all after
    assert same_pad_before(7, 3, 2, 1) == 1
    assert same_pad_before(16, 3, 1, 18) == 18
    assert same_pad_before(8, 4, 1, 1) == 1  # total 3


@pytest.mark.parametrize(("stride_in_1x1", "gmacs"), [(True, 3.86), (False, 4.09)])
def test_resnet50_matches_published_counts(stride_in_1x1, gmacs):
    """He et al. 2015 table 1: ResNet-50 3.8e9 (the Caffe model strides the first 1x1 conv);
    torchvision's "v1.5" (stride in the 3x3 conv) lists 4.09 GFLOPS (= GMACs) at 224x224."""
    from dlmodels.models import ResNet50

    model = ResNet50(input_shape=(224, 224, 3), stride_in_1x1=stride_in_1x1)
    assert count_macs(model) / 1e9 == pytest.approx(gmacs, abs=0.01)


def test_count_macs_needs_a_static_size():
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1)(inputs))
    with pytest.raises(ValueError, match="unknown sizes"):
        count_macs(model)
    assert count_macs(model, (4, 4, 3)) == 4 * 4 * 2 * 3
    assert count_macs(model, (4, 4, 3), effective=True) == 4 * 4 * 2 * 3  # 1x1: no padding


def test_brute_force_reference_is_itself_right():
    """3x3, stride 1, pads 1 on a 3x3 input: corners see 4 taps, edges 6, the centre 9."""
    assert _brute_force((3, 3), 3, 1, 1, (1, 1, 1, 1)) == (4 * 4 + 4 * 6 + 9, 3, 3)
    assert np.isclose(_valid_taps_by_tf((3, 3), 3, 1, 1, "SAME")[0], 49)


def test_zoo_deeplabv3plus_counts_quoted_in_the_readme():
    """The README's segmentation table quotes these counts for the zoo's DeepLabV3+ (64x64,
    ResNet-18, output stride 16, rates 1/2/3, 128-wide ASPP and decoder)."""
    from dlmodels.bench.segmentation import ZOO
    from dlmodels.models import registry

    model = registry.get(
        "deeplabv3plus", input_shape=(64, 64, 3), num_classes=4, **ZOO["deeplabv3plus"]
    )
    assert count_macs(model) == 370_016_256
    assert count_macs(model, effective=True) == 231_029_504

"""Attention U-Net (Oktay et al. 2018) and ResUNet (Zhang, Liu & Wang 2018): harness, parameter
counts worked out by hand from the papers' structures, wiring, equations and bad arguments."""

import itertools

import keras
import numpy as np
import pytest

import dlmodels
from dlmodels.layers.attention import AttentionGate
from dlmodels.layers.residual import ResidualBlock
from dlmodels.models.unet import AttentionUNet, ResUNet, UNet
from tests.helpers import randomize_norm_statistics, run_model_test


def conv(k, cin, cout, bias=True):
    return k * k * cin * cout + (cout if bias else 0)


def bn(c):
    return 4 * c  # gamma, beta, moving mean, moving variance


# -- Attention U-Net ---------------------------------------------------------------------------
def test_attention_unet_harness():
    run_model_test(
        lambda: AttentionUNet((32, 32, 3), 2, depth=2, base_filters=4),
        (2, 32, 32, 3),
        (2, 32, 32, 2),
        onnx_atol=1e-4,
    )


def _gate_params(cx, cg, f):
    """W_x 2x2 (C_x -> F, no bias), W_g 1x1 (C_g -> F, bias), psi 1x1 (F -> 1, bias)."""
    return conv(2, cx, f, bias=False) + conv(1, cg, f) + conv(1, f, 1)


def test_attention_unet_parameter_count_is_unet_plus_gates():
    """The authors' model (Attention-Gated-Networks, unet_CT_single_att_dsv_3D): gates on
    levels 2..depth only, F_int = C_x (`inter_size=filters[l]`), and a 1x1 conv on the
    bottleneck as the deepest gating signal (`UnetGridGatingSignal3`). With C_x = base *
    2**(l-1), C_g = base * 2**l (the deeper decoder feature)."""
    kwargs = {"depth": 3, "base_filters": 8, "norm": None}
    plain = UNet((None, None, 1), 2, **kwargs)
    gated = AttentionUNet((None, None, 1), 2, **kwargs)
    # level 2: C_x 16, C_g 32, F 16; level 3: C_x 32, C_g 64, F 32; gating conv 64 -> 64
    gates = _gate_params(16, 32, 16) + _gate_params(32, 64, 32) + conv(1, 64, 64)
    assert gates == (1024 + 528 + 17) + (4096 + 2080 + 33) + (4096 + 64)
    assert gated.count_params() == plain.count_params() + gates
    # the previous behaviour stays available: every level gated, F = C_x // 2, no gating conv
    old = AttentionUNet(
        (None, None, 1),
        2,
        attention_levels="all",
        attention_reduction=2,
        gating_conv=False,
        **kwargs,
    )
    gates = _gate_params(8, 16, 4) + _gate_params(16, 32, 8) + _gate_params(32, 64, 16)
    assert gates == (128 + 68 + 5) + (512 + 264 + 9) + (2048 + 1040 + 17)
    assert old.count_params() == plain.count_params() + gates


def test_attention_unet_gates_skip_with_deeper_decoder_feature():
    """As the authors' forward(): g_conv4 = att4(conv4, gating(center)), g_conv3 = att3(conv3,
    up4), g_conv2 = att2(conv2, up3), up1 = up_concat1(conv1, up2): no gate on level 1."""
    model = AttentionUNet((32, 32, 3), 2, depth=3, base_filters=4)
    gates = [layer for layer in model.layers if isinstance(layer, AttentionGate)]
    assert sorted(g.name for g in gates) == ["dec2_attention", "dec3_attention"]
    gating = model.get_layer("gating_conv")
    assert gating.input is model.get_layer("bottleneck_conv2").output
    assert gating.conv.kernel.shape == (1, 1, 32, 32)  # 1x1, bottleneck channels kept
    for level in (2, 3):
        x, g = model.get_layer(f"dec{level}_attention").input
        assert x is model.get_layer(f"enc{level}_conv2").output
        deeper = gating.output if level == 3 else model.get_layer(f"dec{level + 1}_conv2").output
        assert g is deeper
        skip, _ = model.get_layer(f"dec{level}_concat").input
        assert skip is model.get_layer(f"dec{level}_attention").output
        # F_int = C_x = 4 * 2**(level - 1), written out, not read from the layer's default
        assert model.get_layer(f"dec{level}_attention").theta.filters == {2: 8, 3: 16}[level]
    skip, _ = model.get_layer("dec1_concat").input
    assert skip is model.get_layer("enc1_conv2").output  # the full-resolution skip is not gated
    # the gating conv feeds the gate only: the decoder upsamples the bottleneck itself
    assert model.get_layer("dec3_up").input is model.get_layer("bottleneck_conv2").output


def test_attention_unet_with_open_gates_is_the_unet():
    """With psi = 0 and b_psi = 40 every alpha is sigmoid(40) = 1 in float32, so the Attention
    U-Net computes exactly the U-Net with the same weights: the gates touch only the skips."""
    kwargs = {"depth": 2, "base_filters": 4}
    plain = UNet((16, 16, 3), 3, **kwargs)
    gated = AttentionUNet((16, 16, 3), 3, **kwargs)
    randomize_norm_statistics(plain)
    for layer in plain.layers:
        if layer.weights:
            gated.get_layer(layer.name).set_weights(layer.get_weights())
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype("float32")
    psi = gated.get_layer("dec2_attention").psi  # depth 2: only level 2 is gated
    psi.kernel.assign(np.zeros(psi.kernel.shape, "float32"))
    psi.bias.assign(np.full((1,), 40.0, "float32"))
    expected = keras.ops.convert_to_numpy(plain(x))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(gated(x)), expected, atol=1e-5)
    psi.bias.assign(np.full((1,), 0.0, "float32"))  # alpha = 1/2 on level 2's skip
    assert np.abs(keras.ops.convert_to_numpy(gated(x)) - expected).max() > 1e-3


def test_attention_unet_registry_and_backbone():
    entry = dlmodels.models.registry.entry("attention_unet")
    assert entry.task == "segmentation" and "Oktay" in entry.paper
    model = dlmodels.models.get(
        "attention_unet",
        input_shape=(64, 64, 3),
        num_classes=2,
        base_filters=4,
        backbone="resnet18",
    )
    assert model.output_shape == (None, 64, 64, 2)
    x, g = model.get_layer("dec4_attention").input
    assert tuple(x.shape) == (None, 4, 4, 256) and tuple(g.shape) == (None, 2, 2, 512)
    assert model.get_layer("dec4_attention").theta.filters == 256  # F_int = C_x
    gated = {layer.name for layer in model.layers if isinstance(layer, AttentionGate)}
    assert gated == {"dec2_attention", "dec3_attention", "dec4_attention"}  # C2..C4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"input_shape": (36, 32, 3), "depth": 3}, r"height 36.*multiple of 2\*\*depth = 8"),
        ({"base_filters": -1}, r"AttentionUNet: `base_filters`"),
        ({"upsampling": "nearest"}, r"`upsampling`='nearest'"),
        ({"backbone": "vgg16"}, r"AttentionUNet: `backbone`='vgg16' is not a known backbone"),
        ({"padding": "valid"}, r"unexpected keyword argument 'padding'"),
        ({"attention_levels": (0, 2)}, r"`attention_levels`=\(0, 2\).*levels in 1..4"),
        ({"attention_levels": "2"}, r"`attention_levels`='2'"),
        ({"attention_reduction": 0}, r"`attention_reduction` must be a positive integer"),
        ({"gating_conv": "yes"}, r"`gating_conv` must be True or False"),
    ],
)
def test_attention_unet_bad_arguments(kwargs, match):
    kwargs = {"input_shape": (32, 32, 3), "num_classes": 2, "base_filters": 4, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        AttentionUNet(**kwargs)


# -- ResUNet -----------------------------------------------------------------------------------
def test_resunet_harness():
    run_model_test(
        lambda: ResUNet((32, 32, 3), 2, depth=2, base_filters=4),
        (2, 32, 32, 3),
        (2, 32, 32, 2),
        onnx_atol=1e-4,
    )


def _resunet_count(cin, num_classes, depth, f):
    """By hand from table 1 / figure 3: unit 1 = conv3x3 (no bias, BN follows) + BN + conv3x3
    (bias) + 1x1 shortcut (bias); every other unit = BN(in) + conv3x3 (no bias) + BN + conv3x3
    (bias) + 1x1 projection (bias); decoder units take the concatenation; 1x1 head."""

    def unit(c_in, c_out):
        return bn(c_in) + conv(3, c_in, c_out, False) + bn(c_out) + conv(3, c_out, c_out)

    def projection(c_in, c_out):
        return conv(1, c_in, c_out)

    widths = [f * 2**i for i in range(depth + 1)]  # unit 1 .. bridge
    total = conv(3, cin, f, False) + bn(f) + conv(3, f, f) + projection(cin, f)
    for c_in, c_out in itertools.pairwise(widths):
        total += unit(c_in, c_out) + projection(c_in, c_out)
    for level in range(depth, 0, -1):
        c_in, c_out = widths[level - 1] + widths[level], widths[level - 1]
        total += unit(c_in, c_out) + projection(c_in, c_out)
    return total + conv(1, f, num_classes)


def test_resunet_tiny_parameter_count_by_hand():
    model = ResUNet((32, 32, 3), 2, depth=2, base_filters=4)
    stem = 108 + 16 + 148 + 16
    enc2 = 16 + 288 + 32 + 584 + 40
    bridge = 32 + 1152 + 64 + 2320 + 144
    dec2 = 96 + 1728 + 32 + 584 + 200
    dec1 = 48 + 432 + 16 + 148 + 52
    assert stem + enc2 + bridge + dec2 + dec1 + 10 == 8306
    assert _resunet_count(3, 2, 2, 4) == 8306
    assert model.count_params() == 8306


def test_resunet_paper_configuration():
    """Table 1 (224x224x3, 64..512 filters, 3 stride-2 units): its fourteen 3x3 convolutions hold
    7,780,032 weights, the paper's "7.8M"; the 1x1 projections, biases and norms bring the model
    to 8,225,985. Downsampling is by strided convolutions only and the upsampling is
    parameter-free."""
    model = ResUNet((224, 224, 3), 1)
    kernels3 = [
        w for w in model.weights if w.path.endswith("kernel") and tuple(w.shape[:2]) == (3, 3)
    ]
    assert len(kernels3) == 14
    assert sum(int(np.prod(w.shape)) for w in kernels3) == 7_780_032
    assert model.count_params() == _resunet_count(3, 1, 3, 64) == 8_225_985
    assert not [x for x in model.layers if isinstance(x, keras.layers.MaxPooling2D)]
    assert not model.get_layer("dec3_up").weights
    sizes = {"enc1_add": 224, "enc2": 112, "enc3": 56, "bridge": 28, "dec3": 56, "dec1": 224}
    for name, size in sizes.items():
        assert model.get_layer(name).output.shape[1] == size
    units = [x for x in model.layers if isinstance(x, ResidualBlock)]
    assert all(u.preact for u in units) and len(units) == 6
    assert [u.strides for u in units[:3]] == [(2, 2)] * 3
    assert model.output_shape == (None, 224, 224, 1)


def np_conv_same(x, kernel, bias=None):
    k = kernel.shape[0]
    p = (k - 1) // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    h, w = x.shape[1:3]
    y = sum(xp[:, i : i + h, j : j + w] @ kernel[i, j] for i in range(k) for j in range(k))
    return y if bias is None else y + bias


def test_resunet_first_unit_equations():
    """Figure 3, unit 1: conv -> BN -> ReLU -> conv, plus the 1x1 projection of the raw input
    (no norm or activation on the image), computed in numpy with the model's weights."""
    model = ResUNet((16, 16, 3), 1, depth=2, base_filters=4)
    randomize_norm_statistics(model)
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype("float32")
    unit1 = keras.Model(model.input, model.get_layer("enc1_add").output)

    def w(name):
        return [
            keras.ops.convert_to_numpy(v).astype("float64") for v in model.get_layer(name).weights
        ]

    (k1,) = w("enc1_conv1")
    gamma, beta, mean, var = w("enc1_norm1")
    k2, b2 = w("enc1_conv2")
    ks, bs = w("enc1_shortcut")
    h = np_conv_same(x.astype("float64"), k1)
    h = np.maximum((h - mean) / np.sqrt(var + 1e-5) * gamma + beta, 0.0)
    ref = np_conv_same(h, k2, b2) + np_conv_same(x.astype("float64"), ks, bs)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(unit1(x)), ref, atol=1e-4)


def test_resunet_registry_and_backbone():
    entry = dlmodels.models.registry.entry("resunet")
    assert entry.task == "segmentation" and "Zhang" in entry.paper
    model = dlmodels.models.get(
        "resunet", input_shape=(64, 64, 3), num_classes=3, base_filters=4, backbone="resnet18"
    )
    assert model.output_shape == (None, 64, 64, 3)
    skip, up = model.get_layer("dec1_concat").input
    assert tuple(skip.shape) == (None, 32, 32, 64) and tuple(up.shape) == (None, 32, 32, 16)
    assert model.get_layer("dec0").filters == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"input_shape": (30, 32, 3), "depth": 2}, r"ResUNet: .*height 30.*2\*\*depth = 4"),
        ({"upsampling": "transpose"}, r"`upsampling`='transpose'.*'nearest', 'bilinear'"),
        ({"depth": 0}, r"ResUNet: `depth` must be a positive integer"),
        ({"norm": "batchnorm"}, r"`norm`='batchnorm'"),
        ({"dropout": -0.1}, r"`dropout` must be a number in \[0, 1\)"),
        ({"backbone": "resnet18", "input_shape": (48, 64, 3)}, r"height 48.*multiple of 32"),
        ({"backbone": "resnet18", "depth": 2}, r"`depth`=2 cannot be used with `backbone`"),
        ({"input_shape": (32, 32)}, r"`input_shape` must be \(height, width, channels\)"),
    ],
)
def test_resunet_bad_arguments(kwargs, match):
    kwargs = {"input_shape": (32, 32, 3), "num_classes": 2, "base_filters": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        ResUNet(**kwargs)


def _softmax_ce(labels, logits):
    z = logits.astype("float64")
    log_p = z - z.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    return -np.take_along_axis(log_p, labels[..., None], -1)[..., 0].mean(axis=(1, 2))


def test_resunet_default_two_classes_train_with_the_default_loss_and_metrics():
    """num_classes defaults to 2 as UNet's: the default softmax cross-entropy is then the real
    loss (over one channel it would be identically 0) and MeanIoU(2) takes label 1."""
    from dlmodels import losses, metrics

    model = ResUNet((16, 16, 3), depth=2, base_filters=2)
    assert model.output_shape == (None, 16, 16, 2)
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype("float32")
    labels = (np.random.default_rng(1).uniform(size=(2, 16, 16)) > 0.5).astype("int32")
    logits = np.asarray(model(x))
    got = losses.SparseCrossEntropy(reduction=None)(labels, logits)
    np.testing.assert_allclose(got, _softmax_ce(labels, logits), rtol=1e-5)
    assert float(np.min(got)) > 0.1
    one = np.asarray(ResUNet((16, 16, 3), 1, depth=2, base_filters=2)(x))
    assert float(np.max(losses.SparseCrossEntropy(reduction=None)(labels * 0, one))) == 0.0
    iou = metrics.MeanIoU(2)
    iou.update_state(labels, logits)
    assert 0.0 <= float(iou.result()) <= 1.0

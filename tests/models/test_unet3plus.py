"""UNet 3+ (Huang et al. 2020): full-scale skips, full-scale deep supervision, the
classification-guided module, backbones."""

import keras
import numpy as np
import pytest

import dlmodels
from dlmodels.layers import FeatureTap
from dlmodels.models import ResNet18, output_kind
from dlmodels.models.unet3plus import ClassGuidedGate, UNet3Plus
from tests.helpers import randomize_norm_statistics, run_model_test

TINY = {"depth": 2, "filters": (4, 8, 16), "cat_channels": 4}


def conv(k, cin, cout, bias):
    return k * k * cin * cout + (cout if bias else 0)


def cna(k, cin, cout):
    """conv (no bias) + batch norm (gamma, beta, moving mean, moving variance)."""
    return conv(k, cin, cout, False) + 4 * cout


def hand_count(filters, cat, channels, classes, *, heads, cgm):
    """Parameters from the paper's section 2.1-2.3: encoder levels of two 3x3 conv-BN-ReLU; each
    decoder node X_De^n reduces every scale m (encoder maps for m <= n, the fused decoder maps of
    L * cat channels for n < m < L, the bottleneck for m = L) by a 3x3 conv-BN-ReLU to `cat`
    channels and fuses the L * cat concatenation with a 3x3 conv-BN-ReLU of L * cat filters;
    3x3 heads (with bias); the CGM's 1x1 conv to 2 channels (with bias)."""
    levels = len(filters)
    total = 0
    cin = channels
    for f in filters:
        total += cna(3, cin, f) + cna(3, f, f)
        cin = f
    for n in range(1, levels):
        for m in range(1, levels + 1):
            if m <= n or m == levels:
                total += cna(3, filters[m - 1], cat)
            else:
                total += cna(3, levels * cat, cat)
        total += cna(3, levels * cat, levels * cat)
    for n in range(1, heads + 1):
        total += conv(3, levels * cat if n < levels else filters[-1], classes, True)
    if cgm:
        total += conv(1, filters[-1], 2, True)
    return total


def _x(shape=(2, 32, 32, 3), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def test_unet3plus_deep_supervision_class_guided_harness():
    seg = (2, 32, 32, 2)
    model = run_model_test(
        lambda: UNet3Plus((32, 32, 3), 2, deep_supervision=True, class_guided=True, **TINY),
        (2, 32, 32, 3),
        [seg, seg, seg, (2, 2)],
    )
    assert model.output_names == ["logits", "logits_2", "logits_3", "cgm"]
    assert output_kind(model) == ["logits", "logits", "logits", "sigmoid"]


def test_parameter_structure_hand_count():
    model = UNet3Plus((32, 32, 3), 2, deep_supervision=True, class_guided=True, **TINY)
    count = hand_count((4, 8, 16), 4, 3, 2, heads=3, cgm=True)
    assert model.count_params() == count == 10_500
    plain = UNet3Plus((32, 32, 3), 2, **TINY)
    assert plain.count_params() == hand_count((4, 8, 16), 4, 3, 2, heads=1, cgm=False)


def test_paper_configuration_has_the_papers_parameter_count():
    """Table 1 of the paper: UNet 3+ has 26.97 M parameters (filters 64..1024, 64 channels per
    scale, one class)."""
    model = UNet3Plus((None, None, 3), 1, filters=(64, 128, 256, 512, 1024))
    count = hand_count((64, 128, 256, 512, 1024), 64, 3, 1, heads=1, cgm=False)
    assert model.count_params() == count == 26_978_305
    # the paper counts trainable parameters (PyTorch's `parameters()`: no BN running
    # statistics); the authors' convs also carry a bias before each BN, ours do not (a bias
    # before batch norm is cancelled by its mean): 2 * sum(filters) encoder + 4 * 9 * 64.
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    biases = 2 * (64 + 128 + 256 + 512 + 1024) + 4 * (5 * 64 + 320)
    assert round(trainable / 1e6, 2) == round((trainable + biases) / 1e6, 2) == 26.97
    assert model.get_layer("de1_fuse").output.shape[-1] == 320


def _source(tensor):
    return tensor._keras_history[0]


def test_full_scale_skip_wiring():
    """Each decoder concat has depth + 1 inputs: finer encoder maps max-pooled by 2**(n-m), the
    same-scale encoder map directly, coarser decoder maps bilinearly upsampled by 2**(m-n)."""
    depth = 3
    model = UNet3Plus(
        (32, 32, 3), 2, depth=depth, filters=(4, 8, 16, 32), cat_channels=4, deep_supervision=True
    )
    levels = depth + 1
    for n in range(1, levels):
        concat = model.get_layer(f"de{n}_concat")
        inputs = concat._inbound_nodes[0].input_tensors
        assert len(inputs) == depth + 1
        assert concat.output.shape[-1] == (depth + 1) * 4
        for m, t in enumerate(inputs, start=1):
            conv_layer = _source(t)
            assert isinstance(conv_layer, dlmodels.layers.ConvNormAct)
            assert (conv_layer.filters, conv_layer.kernel_size) == (4, (3, 3))
            src = _source(conv_layer.input)
            if m < n:
                assert isinstance(src, keras.layers.MaxPooling2D)
                assert src.pool_size == (2 ** (n - m),) * 2
                assert _source(src.input).name == f"en{m}_conv2"
            elif m == n:
                assert src.name == f"en{m}_conv2"
            else:
                assert isinstance(src, keras.layers.UpSampling2D)
                assert src.interpolation == "bilinear" and src.size == (2 ** (m - n),) * 2
                want = f"en{m}_conv2" if m == levels else f"de{m}_fuse"
                assert _source(src.input).name == want
    # heads: a 3x3 conv on X_De^n (n <= depth) and on X_En^{depth+1}, upsampled to the input
    for n in range(1, levels + 1):
        head = model.get_layer(f"head{n}_conv")
        assert head.kernel_size == (3, 3)
        want = f"de{n}_fuse" if n < levels else f"en{n}_conv2"
        assert _source(head.input).name == want
        if n > 1:
            assert model.get_layer(f"head{n}_upsample").size == (2 ** (n - 1),) * 2


def _bilinear_x2(a):
    """Half-pixel bilinear 2x upsampling of (batch, H, W, C), edges clamped: PyTorch's
    `Upsample(mode="bilinear", align_corners=False)`, which the authors' code uses."""

    def axis_weights(size):
        pos = (np.arange(2 * size) + 0.5) / 2 - 0.5
        lo = np.clip(np.floor(pos).astype(int), 0, size - 1)
        hi = np.clip(lo + 1, 0, size - 1)
        w = np.clip(pos - np.floor(pos), 0, 1)
        w[pos < 0] = 0.0
        return lo, hi, w

    lo, hi, w = axis_weights(a.shape[1])
    a = a[:, lo] * (1 - w)[None, :, None, None] + a[:, hi] * w[None, :, None, None]
    lo, hi, w = axis_weights(a.shape[2])
    return a[:, :, lo] * (1 - w)[None, None, :, None] + a[:, :, hi] * w[None, None, :, None]


def test_scale_changes_against_numpy():
    model = UNet3Plus((32, 32, 3), 2, **TINY)
    randomize_norm_statistics(model)
    names = ["en1_conv2", "en3_conv2", "de2_from_en1_pool", "de2_from_en3_up", "de1_from_de2_up"]
    names += ["de2_fuse"]
    probe = keras.Model(model.input, [model.get_layer(n).output for n in names])
    en1, en3, pooled, up, up_de, de2 = (np.asarray(v) for v in probe(_x(), training=False))
    b, h, w, c = en1.shape
    np.testing.assert_array_equal(pooled, en1.reshape(b, h // 2, 2, w // 2, 2, c).max((2, 4)))
    np.testing.assert_allclose(up, _bilinear_x2(en3), atol=1e-5)
    np.testing.assert_allclose(up_de, _bilinear_x2(de2), atol=1e-5)


def test_classification_guided_module():
    model = UNet3Plus((32, 32, 3), 2, deep_supervision=True, class_guided=True, **TINY)
    ungated = UNet3Plus((32, 32, 3), 2, deep_supervision=True, **TINY)
    randomize_norm_statistics(model)
    for layer in ungated.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    x = _x()
    reference = [np.asarray(o) for o in ungated(x, training=False)]
    bottleneck = keras.Model(model.input, model.get_layer("en3_conv2").output)
    en3 = np.asarray(bottleneck(x, training=False))
    cgm_conv = model.get_layer("cgm_conv")
    kernel = np.random.default_rng(3).standard_normal((1, 1, 16, 2)).astype("float32")
    for bias, present in (([4.0, -4.0], False), ([-4.0, 4.0], True)):
        cgm_conv.set_weights([kernel, np.array(bias, "float32")])
        *segs, cgm = (np.asarray(o) for o in model(x, training=False))
        # dropout (inference: identity), 1x1 conv, global max pool, sigmoid
        want = 1 / (1 + np.exp(-((en3 @ kernel[0, 0]) + bias).max(axis=(1, 2))))
        np.testing.assert_allclose(cgm, want, atol=1e-6)
        assert np.all(cgm.argmax(-1) == int(present))
        for seg, ref in zip(segs, reference, strict=True):
            np.testing.assert_allclose(seg, ref if present else np.zeros_like(ref), atol=1e-6)
    # with a sigmoid output an "absent" image gives 0.5 everywhere, as in the authors' code
    sig = UNet3Plus((32, 32, 3), 1, class_guided=True, final_activation="sigmoid", **TINY)
    sig.get_layer("cgm_conv").set_weights(
        [np.zeros((1, 1, 16, 2), "float32"), np.array([1.0, 0.0], "float32")]
    )
    seg, _ = sig(x, training=False)
    np.testing.assert_array_equal(np.asarray(seg), 0.5)
    assert output_kind(sig) == ["sigmoid", "sigmoid"]


def test_gate_layer_per_sample():
    seg = np.arange(2 * 2 * 2 * 1, dtype="float32").reshape(2, 2, 2, 1) + 1
    cls = np.array([[0.9, 0.1], [0.2, 0.7]], "float32")
    out = np.asarray(ClassGuidedGate()([seg, cls]))
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_array_equal(out[1], seg[1])


def test_resnet18_backbone():
    model = UNet3Plus((64, 64, 3), 2, cat_channels=4, backbone="resnet18", deep_supervision=True)
    assert model.output_shape == [(None, 64, 64, 2)] * 5
    taps = {layer.name for layer in model.layers if isinstance(layer, FeatureTap)}
    assert taps == {"C1", "C2", "C3", "C4", "C5"}
    # X_En^1..5 = C1..C5 (strides 2..32); the same-scale input of X_De^n is C_n
    for n in range(1, 5):
        concat = model.get_layer(f"de{n}_concat")
        assert len(concat._inbound_nodes[0].input_tensors) == 5
        same = _source(model.get_layer(f"de{n}_from_en{n}_conv").input)
        assert same.name == f"C{n}"
    # head n sits at stride 2**n: upsampled by 2**n to the input size
    for n in range(1, 6):
        assert model.get_layer(f"head{n}_upsample").size == (2**n, 2**n)
    out = model(_x((1, 64, 64, 3)), training=False)
    assert all(np.all(np.isfinite(o)) for o in out)
    # a backbone model instance is applied as a nested model (shared weights)
    resnet = ResNet18(include_top=False, input_shape=(64, 64, 3))
    nested = UNet3Plus((64, 64, 3), 2, cat_channels=4, backbone=resnet)
    assert nested.output_shape == (None, 64, 64, 2)
    assert any(w is resnet.weights[0] for w in nested.weights)


def test_registry():
    assert "unet3plus" in dlmodels.models.list()
    assert "UNet 3+" in dlmodels.models.entry("unet3plus").paper
    model = dlmodels.models.get("unet3plus", input_shape=(None, None, 1), num_classes=3, **TINY)
    assert model(np.zeros((1, 16, 24, 1), "float32")).shape == (1, 16, 24, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"input_shape": (32, 34, 3)}, r"`input_shape`=\(32, 34, 3\).*width 34.*4.*32 or 36"),
        (
            {"input_shape": (96, 80, 3), "backbone": "resnet18", "filters": None},
            r"`input_shape`=\(96, 80, 3\).*width 80.*multiple of 32.*64 or 96",
        ),
        ({"backbone": "resnet18", "input_shape": (64, 64, 3)}, r"`filters`=\(4, 8, 16\).*backbone"),
        ({"depth": 5, "backbone": "resnet18", "filters": None}, r"`depth`=5.*1\.\.4"),
        ({"cat_channels": 0}, r"`cat_channels`.*positive.*0"),
        ({"cgm_dropout": 1.0}, r"`cgm_dropout` must be a rate in \[0, 1\)"),
        ({"filters": (4, 8)}, r"`filters`=\(4, 8\).*3 for `depth`=2"),
        ({"norm": "bn"}, r"`norm`='bn'"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs = {"input_shape": (32, 32, 3), "num_classes": 2, **TINY, **kwargs}
    with pytest.raises(ValueError, match=match):
        UNet3Plus(**kwargs)


def test_default_two_classes_and_kernel_initializer_of_every_conv():
    """num_classes defaults to 2 (the default softmax loss and metrics work, as with UNet); the
    paper's 1-channel sigmoid model stays available. `kernel_initializer` reaches the heads and
    the CGM conv too."""
    model = UNet3Plus(
        (32, 32, 3), deep_supervision=True, class_guided=True, kernel_initializer="ones", **TINY
    )
    assert [tuple(s) for s in model.output_shape] == [(None, 32, 32, 2)] * 3 + [(None, 2)]
    for name in ("head1_conv", "head2_conv", "head3_conv", "cgm_conv"):
        kernel = np.asarray(model.get_layer(name).kernel)
        np.testing.assert_array_equal(kernel, np.ones(kernel.shape), err_msg=name)
    assert UNet3Plus((32, 32, 3), 1, **TINY).output_shape == (None, 32, 32, 1)

"""DeepLabv3 / DeepLabv3+: harness (save, mixed precision, SavedModel, ONNX parity), the atrous
rates in the built graph, runtime-size resizing in Keras and in ONNX with dynamic height and
width, the half-pixel resize convention, argument errors."""

import os
import re
import tempfile

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest

import dlmodels.models.deeplab  # noqa: F401  (registers "deeplabv3", "deeplabv3plus")
from dlmodels import export
from dlmodels.layers.resize import ResizeLike
from dlmodels.models import registry
from dlmodels.models.deeplab import DeepLabV3, DeepLabV3Plus
from tests.helpers import randomize_norm_statistics, run_model_test

# Small heads: the ResNet-18 backbone dominates the cost anyway.
SMALL = {"backbone": "resnet18", "aspp_filters": 16}
SMALL_PLUS = {**SMALL, "low_level_filters": 8, "decoder_filters": 16}


def test_deeplabv3_harness():
    """Output stride 16 on a 32x32 input (C5 2x2). rates=(1, 1, 2): on a 2x2 map the paper's
    rates (6, 12, 18) would only ever read zero padding, leaving the atrous taps untested by the
    export parity; the paper's rates are checked in the graph by test_dilation_rates_in_graph."""
    run_model_test(
        lambda: DeepLabV3((32, 32, 3), 3, output_stride=16, rates=(1, 1, 2), **SMALL),
        (1, 32, 32, 3),
        (1, 32, 32, 3),
        saved_model=False,  # SavedModel of the same layers: DeepLabV3Plus at output stride 16
    )


@pytest.mark.parametrize("output_stride", [8, 16])
def test_deeplabv3plus_harness(output_stride):
    """Both output strides (C5 4x4 / 2x2 on 32x32), SavedModel and ONNX parity with random
    BatchNorm statistics (the helper randomizes them)."""
    run_model_test(
        lambda: DeepLabV3Plus(
            (32, 32, 3), 3, output_stride=output_stride, rates=(1, 2, 3), **SMALL_PLUS
        ),
        (1, 32, 32, 3),
        (1, 32, 32, 3),
        saved_model=output_stride == 16,  # one SavedModel check is enough for these layers
    )


def _convs(model):
    """{layer path: (dilation rate, kernel size)} of every Conv2D / DepthwiseConv2D, nested
    ones (inside ConvNormAct, residual blocks, ASPP) included."""
    return {
        layer.path: (tuple(layer.dilation_rate), tuple(layer.kernel_size))
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.Conv2D | keras.layers.DepthwiseConv2D)
    }


def _conv_dilations(model):
    return {path: rate for path, (rate, _) in _convs(model).items()}


@pytest.mark.parametrize(
    "output_stride, aspp_rates, stage4_rate, stage5_rates",
    [(16, (6, 12, 18), 1, (2, 4, 8)), (8, (12, 24, 36), 2, (4, 8, 16))],
)
def test_dilation_rates_in_graph(output_stride, aspp_rates, stage4_rate, stage5_rates):
    """ResNet-34 (three blocks in stage 5): ASPP atrous convs carry the paper's rates for the
    output stride; stage 4's 3x3 convs are dilated only at output stride 8 (rate 2); stage 5's
    blocks carry the stage rate (2 / 4) times multigrid (1, 2, 4); every other conv (stem,
    stages 2-3, 1x1 convs, decoder, classifier) has rate 1. Built, never run."""
    model = DeepLabV3(
        (None, None, 3), 3, backbone="resnet34", output_stride=output_stride, aspp_filters=8
    )
    convs = _convs(model)
    expected = {}
    for path, (_, kernel) in convs.items():
        top, sub = [*path.split("/"), ""][:2]
        want = 1
        if top == "aspp" and sub.startswith("atrous"):
            want = aspp_rates[int(sub[len("atrous") :]) - 1]
        elif top.startswith("stage4_") and kernel != (1, 1):
            want = stage4_rate
        elif top.startswith("stage5_block") and kernel != (1, 1):
            want = stage5_rates[int(top[len("stage5_block") :]) - 1]
        expected[path] = (want, want)
    assert {p: r for p, (r, _) in convs.items()} == expected
    # Guard the walk itself: it saw the three atrous branches and six dilated stage 5 convs.
    assert sum(p.startswith("aspp/atrous") for p in convs) == 3
    assert sum(p.startswith("stage5_") and k == (3, 3) for p, (_, k) in convs.items()) == 6


def test_resnet18_multigrid_is_cut_to_its_two_stage5_blocks():
    model = DeepLabV3((None, None, 3), 3, output_stride=16, **SMALL)
    rates = _conv_dilations(model)
    assert rates["stage5_block1/conv1"] == (2, 2) and rates["stage5_block2/conv2"] == (4, 4)
    none = DeepLabV3((None, None, 3), 3, output_stride=16, multigrid=None, **SMALL)
    assert _conv_dilations(none)["stage5_block2/conv2"] == (2, 2)


def test_backbone_model_instance_and_backbone_kwargs():
    """A backbone model (e.g. with loaded weights) is applied as a nested model with its own
    output stride; a mismatching output_stride is refused by build_backbone. backbone_kwargs
    and the decoder's norm reach a ResNet built by name."""
    from dlmodels.models import ResNet18

    resnet = ResNet18(include_top=False, input_shape=(None, None, 3), output_stride=16)
    model = DeepLabV3Plus(
        (None, None, 3), 2, output_stride=16, **{**SMALL_PLUS, "backbone": resnet}
    )
    assert model.get_layer("resnet18_features").count_params() == resnet.count_params()
    assert model(np.zeros((1, 40, 48, 3), "float32")).shape == (1, 40, 48, 2)
    with pytest.raises(ValueError, match=r"has output stride 16 .*`output_stride`=8"):
        DeepLabV3((None, None, 3), 2, output_stride=8, **{**SMALL, "backbone": resnet})
    grouped = DeepLabV3(
        (None, None, 3),
        2,
        norm="group",
        backbone_kwargs={"se_ratio": 0.25},
        **{**SMALL, "aspp_filters": 32},  # group norm: 32 groups
    )
    norms = {type(layer).__name__ for layer in grouped._flatten_layers() if "norm" in layer.name}
    assert "GroupNormalization" in norms and "BatchNormalization" not in norms
    assert any(layer.name == "se_reduce" for layer in grouped._flatten_layers())


def test_output_size_equals_input_size_in_keras_and_dynamic_onnx():
    """One DeepLabv3+ with (None, None, 3) input, exported once to ONNX with dynamic height and
    width: for 64, 72, 100, 248 (and a non-square 40x88) Keras and onnxruntime both return the
    input's size (ResNet sizes round up: 248 -> C2 62 -> C5 16, 16 * 16 = 256 != 248) and agree
    to 1e-4 (relative to max(1, max|logit|)). The Resize nodes use half-pixel coordinates."""
    model = DeepLabV3Plus((None, None, 3), 3, output_stride=16, **SMALL_PLUS)
    randomize_norm_statistics(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "deeplab.onnx")
        export.to_onnx(model, path)
        graph = onnx.load(path).graph
        dims = graph.input[0].type.tensor_type.shape.dim
        assert [d.HasField("dim_value") for d in dims] == [False, False, False, True]
        modes = {
            attr.s.decode()
            for node in graph.node
            if node.op_type == "Resize"
            for attr in node.attribute
            if attr.name == "coordinate_transformation_mode"
        }
        assert modes == {"half_pixel"}
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        for h, w in [(64, 64), (72, 72), (100, 100), (248, 248), (40, 88)]:
            x = rng.standard_normal((1, h, w, 3)).astype("float32")
            expected = keras.ops.convert_to_numpy(model(x, training=False))
            got = session.run(None, {"image": x})[0]
            assert expected.shape == got.shape == (1, h, w, 3)
            scale = max(1.0, float(np.max(np.abs(expected))))
            assert np.max(np.abs(got - expected)) <= 1e-4 * scale, (h, w)


def _bilinear_reference(x, out_h, out_w, *, align_corners=False):
    """Bilinear resize of (H, W) in numpy: half-pixel centers (src = (dst + 0.5) * in / out
    - 0.5, clamped to the border) or align_corners (src = dst * (in - 1) / (out - 1))."""

    def coords(n_in, n_out):
        dst = np.arange(n_out, dtype="float64")
        if align_corners:
            src = dst * (n_in - 1) / max(n_out - 1, 1)
        else:
            src = np.clip((dst + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    (r0, r1, rw), (c0, c1, cw) = coords(x.shape[0], out_h), coords(x.shape[1], out_w)
    rows = x[r0] * (1 - rw)[:, None] + x[r1] * rw[:, None]
    return rows[:, c0] * (1 - cw)[None, :] + rows[:, c1] * cw[None, :]


def test_resize_like_is_half_pixel_bilinear():
    """ResizeLike equals a numpy half-pixel bilinear resize (up 3x5 -> 7x12, down 9x8 -> 4x3)
    and is far from the align_corners convention, so the test tells the two apart."""
    rng = np.random.default_rng(1)
    for (h, w), (oh, ow) in [((3, 5), (7, 12)), ((9, 8), (4, 3))]:
        x = rng.standard_normal((1, h, w, 2)).astype("float32")
        y = keras.ops.convert_to_numpy(ResizeLike()([x, np.zeros((1, oh, ow, 1), "float32")]))
        for c in range(2):
            half = _bilinear_reference(x[0, :, :, c].astype("float64"), oh, ow)
            corners = _bilinear_reference(x[0, :, :, c], oh, ow, align_corners=True)
            np.testing.assert_allclose(y[0, :, :, c], half, atol=1e-5)
            assert np.max(np.abs(y[0, :, :, c] - corners)) > 0.05


def test_resize_like_harness():
    from tests.helpers import run_layer_test

    run_layer_test(
        ResizeLike,
        {},
        [((2, 3, 5, 4), "float32"), ((2, 8, 7, 1), "float32")],
        (2, 8, 7, 4),
        train_step=False,  # no weights
    )


def test_registry_entries():
    for name, builder in [("deeplabv3", DeepLabV3), ("deeplabv3plus", DeepLabV3Plus)]:
        entry = registry.entry(name)
        assert entry.builder is builder and entry.task == "segmentation"
        assert "Chen et al." in entry.paper
    model = registry.get("deeplabv3plus", input_shape=(32, 32, 3), num_classes=2, **SMALL_PLUS)
    assert model.output_shape == (None, 32, 32, 2) and model.name == "deeplabv3plus"


@pytest.mark.parametrize("builder", [DeepLabV3, DeepLabV3Plus])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"output_stride": 4}, r"`output_stride`=4 is not supported. Allowed values: 8, 16, 32"),
        ({"backbone": "vgg16"}, r"`backbone`='vgg16' is not a known backbone.*resnet18, resnet34"),
        (
            {"input_shape": (24, 64, 3)},
            r"`input_shape`=\(24, 64, 3\) has height 24, below the minimum 32 \(2 x "
            r"output_stride 16",
        ),
        (
            {"input_shape": (None, 12, 3), "output_stride": 8},
            r"`input_shape`=\(None, 12, 3\) has width 12, below the minimum 16",
        ),
        ({"input_shape": (32, 32)}, r"`input_shape` must be \(height, width, channels\)"),
        ({"input_shape": (32, 32, None)}, r"channel count of `input_shape`"),
        ({"num_classes": 0}, r"`num_classes` must be a positive integer"),
        ({"final_activation": "soft"}, r"`final_activation`='soft' is not a Keras activation"),
    ],
)
def test_argument_errors(builder, kwargs, message):
    args = {"input_shape": (32, 32, 3), "num_classes": 3, **SMALL, **kwargs}
    with pytest.raises(ValueError, match=message):
        builder(**args)


@pytest.mark.parametrize("builder", [DeepLabV3, DeepLabV3Plus])
def test_multigrid_and_backbone_errors_are_the_builders_user_errors(builder):
    from dlmodels.errors import UserError

    args = {"input_shape": (32, 32, 3), "num_classes": 3, **SMALL}
    owner = builder.__name__
    with pytest.raises(UserError) as info:
        builder(**{**args, "multigrid": (2,)})
    assert str(info.value) == (
        f"{owner}: `multigrid`=(2,) must hold one positive int per stage-5 block of resnet18 "
        "(2; a longer sequence is cut to its first 2), e.g. (1, 2), or be None for no "
        "multi-grid."
    )
    for bad in ("124", (1, 0, 2), 3):
        with pytest.raises(
            UserError, match=rf"^{owner}: `multigrid`={re.escape(repr(bad))} must hold"
        ):
            builder(**{**args, "multigrid": bad})
    with pytest.raises(UserError, match=rf"^{owner}: `backbone`='vgg16' is not a known"):
        builder(**{**args, "backbone": "vgg16"})


def test_deeplabv3plus_separable_decoder():
    """DeepLabv3+ section 4: depthwise-separable convolution "to both ASPP and decoder
    modules". The two 3x3 decoder convs become depthwise 3x3 -> BN -> ReLU -> 1x1 conv-BN-ReLU.
    By hand (BN: 4 per channel, no conv bias), concat of ASPP 16 + low-level 8 = 24 channels:
    plain 9*24*16 + 64 + 9*16*16 + 64 = 5,888; separable (9*24 + 96 + 24*16 + 64) +
    (9*16 + 64 + 16*16 + 64) = 1,288. DeepLabV3 (no decoder) isolates ASPP's own change."""
    args = {"input_shape": (32, 32, 3), "num_classes": 3, "rates": (1, 2, 3), **SMALL}
    plus = {"low_level_filters": 8, "decoder_filters": 16}
    sep = DeepLabV3Plus(**args, **plus, separable=True)
    plain = DeepLabV3Plus(**args, **plus)
    aspp_change = (
        DeepLabV3(**args).count_params() - DeepLabV3(**args, separable=True).count_params()
    )
    assert plain.count_params() - sep.count_params() - aspp_change == 5_888 - 1_288
    names = {layer.name for layer in sep.layers}
    assert "decoder_conv1" not in names and "decoder_conv2" not in names
    for i, cin in ((1, 24), (2, 16)):
        dw = sep.get_layer(f"decoder_conv{i}_depthwise")
        assert isinstance(dw, keras.layers.DepthwiseConv2D)
        assert dw.kernel.shape == (3, 3, cin, 1) and not dw.use_bias
        pw = sep.get_layer(f"decoder_conv{i}_pointwise")
        assert pw.conv.kernel.shape == (1, 1, cin, 16)
        assert pw.input is sep.get_layer(f"decoder_conv{i}_depthwise_act").output
    assert sep.get_layer("decoder_conv1_depthwise").input is sep.get_layer("decoder_concat").output
    assert sep(np.zeros((1, 32, 32, 3), "float32")).shape == (1, 32, 32, 3)

import keras
import numpy as np
import pytest

import dlmodels
from dlmodels.errors import UserError
from dlmodels.models import ResNet18, UNet
from dlmodels.models.unet import (
    AttentionUNet,
    ResUNet,
    predict_tiled,
    unet_valid_input_size,
    unet_valid_output_size,
)
from dlmodels.models.unet_plus_plus import UNetPlusPlus
from tests.helpers import randomize_norm_statistics, run_model_test


@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
def test_unet_harness(upsampling):
    run_model_test(
        lambda: UNet((32, 32, 3), 4, depth=2, base_filters=4, upsampling=upsampling),
        (2, 32, 32, 3),
        (2, 32, 32, 4),
    )


def test_unet_paper_configuration_parameter_count():
    """The paper's U-Net (depth 4, 64 filters, no norm, 1 input channel, 2 classes).

    Counted from the paper's figure 1 (padding does not change the count): 3x3 convs 64..1024 in
    the contracting path, 2x2 up-convs halving channels, 3x3 convs on the concatenations, a 1x1
    conv to 2 classes; every conv with a bias: 31,030,658 parameters.
    """
    model = UNet((None, None, 1), 2, norm=None, dropout=0.5)

    def conv(k, cin, cout):
        return k * k * cin * cout + cout

    total, cin = 0, 1
    for f in (64, 128, 256, 512, 1024):
        total += conv(3, cin, f) + conv(3, f, f)
        cin = f
    for f in (512, 256, 128, 64):
        total += conv(2, cin, f) + conv(3, 2 * f, f) + conv(3, f, f)
        cin = f
    total += conv(1, 64, 2)
    assert total == 31_030_658
    assert model.count_params() == total


def test_unet_layer_names_and_any_size():
    model = UNet((None, None, 3), 3, depth=3, base_filters=4)
    names = {layer.name for layer in model.layers}
    assert {
        "image",
        "enc1_conv1",
        "enc3_pool",
        "bottleneck_conv2",
        "dec1_concat",
        "logits",
    } <= names
    for size in (16, 40):
        out = model(np.zeros((1, size, size, 3), "float32"))
        assert out.shape == (1, size, size, 3)


def test_unet_output_is_float32_under_mixed_precision():
    keras.config.set_dtype_policy("mixed_float16")
    model = UNet((16, 16, 3), 2, depth=2, base_filters=4)
    assert model.get_layer("enc1_conv1").compute_dtype == "float16"
    assert model(np.zeros((1, 16, 16, 3), "float32")).dtype == "float32"


def test_unet_registry():
    assert "unet" in dlmodels.models.list()
    model = dlmodels.models.get(
        "unet", input_shape=(32, 32, 3), num_classes=5, depth=2, base_filters=4
    )
    assert model.output_shape == (None, 32, 32, 5)
    with pytest.raises(ValueError, match=r"`name`='unet9'.*registered"):
        dlmodels.models.get("unet9")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"input_shape": (100, 96, 3), "depth": 4}, r"`input_shape`.*height 100.*`depth`=4.*16"),
        ({"input_shape": (96, 90, 3), "depth": 3}, r"width 90.*multiple of 2\*\*depth = 8"),
        ({"base_filters": 0}, r"`base_filters`.*positive.*0"),
        ({"norm": "bn"}, r"`norm`='bn'"),
        ({"activation": "rellu"}, r"`activation`='rellu'"),
        ({"upsampling": "nearest"}, r"`upsampling`='nearest'.*'transpose', 'bilinear'"),
        ({"depth": 0}, r"`depth`"),
        ({"dropout": 1.5}, r"`dropout`"),
        ({"input_shape": None}, r"UNet: `input_shape` must be \(height, width, channels\).*None"),
        ({"input_shape": (32, 32, None)}, r"known channels, got \(32, 32, None\)"),
        ({"input_shape": (32, 32)}, r"`input_shape` must be.*got \(32, 32\)"),
    ],
)
def test_unet_bad_arguments(kwargs, match):
    error = UserError if "input_shape" in kwargs else ValueError
    kwargs = {"input_shape": (64, 64, 3), "num_classes": 2, **kwargs}
    with pytest.raises(error, match=match):
        UNet(**kwargs)


def _source(model, name, index=None):
    """The layer whose output feeds layer `name` (its `index`-th input)."""
    x = model.get_layer(name).input
    return (x if index is None else x[index])._keras_history[0].name


def test_unet_dropout_at_the_end_of_the_contracting_path():
    """The paper's "drop-out layers at the end of the contracting path", placed as the reference
    Keras port (zhixuhao/unet: drop4 after conv4, before pool4 and the skip; drop5 after
    conv5): the deepest encoder level's output (skip included) and the bottleneck's output."""
    model = UNet((32, 32, 3), 2, depth=2, base_filters=4, dropout=0.5)
    drops = [x.name for x in model.layers if isinstance(x, keras.layers.Dropout)]
    assert sorted(drops) == ["bottleneck_dropout", "enc2_dropout"]
    assert model.get_layer("enc2_dropout").rate == 0.5
    assert _source(model, "enc2_dropout") == "enc2_conv2"
    assert _source(model, "enc2_pool") == "enc2_dropout"
    assert _source(model, "dec2_concat", 0) == "enc2_dropout"  # the level-2 skip is dropped
    assert _source(model, "dec1_concat", 0) == "enc1_conv2"  # shallower skips are not
    assert _source(model, "bottleneck_conv1") == "enc2_pool"  # nothing dropped in between
    assert _source(model, "bottleneck_dropout") == "bottleneck_conv2"
    assert _source(model, "dec2_up") == "bottleneck_dropout"
    # the masks act at training time only: inference is deterministic, training is not
    x = np.random.default_rng(0).standard_normal((1, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(model(x), model(x))
    assert np.abs(np.asarray(model(x, training=True)) - np.asarray(model(x))).max() > 1e-3
    assert not [x for x in UNet((32, 32, 3), 2, depth=2).layers if "dropout" in x.name]


@pytest.mark.parametrize("builder", [UNet, AttentionUNet, ResUNet])
def test_kernel_initializer_reaches_the_head(builder):
    """`kernel_initializer` is documented as every conv's: the 1x1 head included."""
    model = builder((16, 16, 3), 2, depth=2, base_filters=2, kernel_initializer="ones")
    head = model.get_layer("head_conv")
    np.testing.assert_array_equal(np.asarray(head.kernel), np.ones(head.kernel.shape))


# -- padding="valid": the paper's unpadded U-Net ----------------------------------------------
def test_unet_valid_harness():
    run_model_test(
        lambda: UNet((60, 60, 3), 2, depth=2, base_filters=4, padding="valid"),
        (2, 60, 60, 3),
        (2, 20, 20, 2),
        onnx_atol=1e-4,
    )


def test_unet_valid_paper_tile_572_to_388():
    """Figure 1 of the paper: a 572x572 tile gives a 388x388 map; the skips 568, 280, 136, 64 are
    center-cropped to the up-convolutions' 392, 200, 104, 56."""
    model = UNet((572, 572, 1), 2, padding="valid", norm=None, dropout=0.5)
    assert model.output_shape == (None, 388, 388, 2)
    assert tuple(model.compute_output_shape((1, 572, 572, 1))) == (1, 388, 388, 2)
    assert model.count_params() == 31_030_658  # padding does not change the weights
    for level, (skip, up) in {1: (568, 392), 2: (280, 200), 3: (136, 104), 4: (64, 56)}.items():
        crop = model.get_layer(f"dec{level}_crop")
        half = (skip - up) // 2
        assert crop.get_config()["cropping"] == ((half, half), (half, half))
        assert model.get_layer(f"enc{level}_conv2").output.shape[1] == skip
        assert model.get_layer(f"dec{level}_up").output.shape[1] == up
    assert unet_valid_output_size(572, 4) == 388 and unet_valid_input_size(388, 4) == 572
    tiny = UNet((572, 572, 1), 2, padding="valid", base_filters=1, norm=None)
    assert tiny(np.zeros((1, 572, 572, 1), "float32")).shape == (1, 388, 388, 2)


def _paper_output_size(n, depth):
    """The paper's figure, step by step: conv3x3 valid = -2, pool = /2 (even only), up = *2."""
    for _ in range(depth):
        n = n - 2 - 2
        if n <= 0 or n % 2:
            return None
        n //= 2
    n = n - 2 - 2
    if n <= 0:
        return None
    for _ in range(depth):
        n = 2 * n - 2 - 2
        if n <= 0:
            return None
    return n


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_unet_valid_size_functions(depth):
    valid = [n for n in range(1, 400) if _paper_output_size(n, depth)]
    # valid sizes are 2**depth * b + 4 * (2**depth - 1): one every 2**depth pixels
    assert np.all(np.diff(valid) == 2**depth)
    assert valid[0] % 2**depth == (4 * (2**depth - 1)) % 2**depth
    for n in range(1, 400):
        out = _paper_output_size(n, depth)
        if out is None:
            with pytest.raises(ValueError, match=rf"`input_size`={n} is not accepted"):
                unet_valid_output_size(n, depth)
        else:
            assert unet_valid_output_size(n, depth) == out
            assert unet_valid_input_size(out, depth) == n


def test_unet_valid_sizes_agree_with_the_built_model():
    for n in range(40, 70):
        expected = _paper_output_size(n, 2)
        if expected is None:
            with pytest.raises(ValueError, match=rf"height {n}, which an unpadded"):
                UNet((n, 64, 1), 2, depth=2, base_filters=1, padding="valid")
        else:
            model = UNet((n, n, 1), 2, depth=2, base_filters=1, padding="valid")
            assert model.output_shape == (None, expected, expected, 2)


# -- backbone ---------------------------------------------------------------------------------
def test_unet_resnet18_backbone_harness():
    run_model_test(
        lambda: UNet((64, 64, 3), 2, base_filters=4, backbone="resnet18"),
        (2, 64, 64, 3),
        (2, 64, 64, 2),
        onnx_atol=1e-4,
    )


def test_unet_backbone_decoder_reads_c1_to_c5():
    """segmentation_models' Unet decoder: (256, 128, 64, 32, 16) filters for base_filters=16,
    skips C4 (stride 16) ... C1 (stride 2), C5 (stride 32) at the bottom, a last upsampling
    without skip to full resolution. ResNet-18 channels: C1 64, C2 64, C3 128, C4 256, C5 512."""
    model = UNet((64, 64, 3), 3, base_filters=16, backbone="resnet18", upsampling="bilinear")
    assert model.output_shape == (None, 64, 64, 3)
    skips = {1: (32, 64), 2: (16, 64), 3: (8, 128), 4: (4, 256)}
    for level, filters in zip((4, 3, 2, 1, 0), (256, 128, 64, 32, 16), strict=True):
        assert model.get_layer(f"dec{level}_conv2").filters == filters
        if level:
            skip, up = model.get_layer(f"dec{level}_concat").input
            size, channels = skips[level]
            assert tuple(skip.shape) == (None, size, size, channels)
            assert tuple(up.shape) == (None, size, size, filters)
    assert "dec0_concat" not in {layer.name for layer in model.layers}
    assert tuple(model.get_layer("dec4_resize").input.shape) == (None, 2, 2, 512)


def test_unet_backbone_model_instance_shares_weights():
    resnet = ResNet18(include_top=False, input_shape=(None, None, 3))
    model = UNet((None, None, 3), 2, base_filters=4, backbone=resnet)
    decoder = UNet((None, None, 3), 2, base_filters=4, backbone="resnet18")
    assert model.count_params() == decoder.count_params()
    assert model(np.zeros((1, 64, 96, 3), "float32")).shape == (1, 64, 96, 2)
    assert any(w is resnet.weights[0] for w in model.weights)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"backbone": "resnet19"}, r"`backbone`='resnet19' is not a known backbone.*resnet18"),
        (
            {"backbone": "resnet18", "input_shape": (96, 80, 3)},
            r"width 80, which the stride-32 features of `backbone`='resnet18'.*multiple of 32.*"
            r"64 or 96",
        ),
        ({"backbone": "resnet18", "depth": 3}, r"`depth`=3 cannot be used with `backbone`"),
        ({"backbone": 42}, r"`backbone`=42 must be None"),
        ({"backbone_kwargs": {"norm": None}}, r"`backbone_kwargs` needs a `backbone`"),
        (
            {"backbone": "resnet18", "padding": "valid"},
            r"padding='valid'.*cannot be combined with `backbone`='resnet18'",
        ),
        ({"padding": "full"}, r"`padding`='full' is not supported.*'same', 'valid'"),
        (
            {"padding": "valid", "input_shape": (570, 572, 1)},
            r"`input_shape`=\(570, 572, 1\) has height 570.*`depth`=4.*556 and 572",
        ),
        (
            {"padding": "valid", "input_shape": (None, None, 1)},
            r"unknown height; padding='valid' needs static height and width",
        ),
        (
            {"padding": "valid", "input_shape": (60, 60, 1), "depth": 3},
            r"height 60.*`depth`=3.*Nearest valid sizes: 92 \(see",
        ),
    ],
)
def test_unet_bad_padding_and_backbone_arguments(kwargs, match):
    kwargs = {"input_shape": (64, 64, 3), "num_classes": 2, "base_filters": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        UNet(**kwargs)


def test_unet_valid_size_function_errors():
    with pytest.raises(ValueError, match=r"`input_size`=570.*Nearest valid sizes: 556 and 572"):
        unet_valid_output_size(570, 4)
    with pytest.raises(ValueError, match=r"`output_size`=387.*16 \* k - 60.*372 and 388"):
        unet_valid_input_size(387, 4)
    with pytest.raises(ValueError, match=r"`depth` must be a positive integer"):
        unet_valid_output_size(572, 0)


# -- predict_tiled ----------------------------------------------------------------------------
def _receptive_radius(model, size=96):
    """Largest distance (in pixels, Chebyshev) at which a change of the center input pixel
    changes the output: measured, not derived."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, size, size, 3)).astype("float32")
    y = model.predict(x, verbose=0)
    x[0, size // 2, size // 2] += 5.0
    diff = np.abs(model.predict(x, verbose=0) - y).max(axis=(0, 3))
    rows, cols = np.nonzero(diff > 1e-6)
    return max(np.abs(rows - size // 2).max(), np.abs(cols - size // 2).max())


def test_predict_tiled_same_padding_equals_whole_image():
    """Crop-and-stitch is exact when overlap // 2 >= the receptive-field radius and the tile
    starts are multiples of 2**depth (the tiles' pooling grids match the whole image's): then
    every kept output pixel sees exactly the inputs it sees in the whole image, and the only
    difference is float32 summation order in differently sized convolutions (measured ~1e-6;
    asserted at 1e-4 of the output scale). A small overlap breaks it near the seams."""
    model = UNet((None, None, 3), 2, depth=2, base_filters=4)
    randomize_norm_statistics(model)
    radius = _receptive_radius(model)
    assert 12 < radius <= 24, radius
    image = np.random.default_rng(0).standard_normal((112, 96, 3)).astype("float32")
    whole = model.predict(image[None], verbose=0)[0]
    tiled = predict_tiled(model, image, tile_size=64, overlap=48, batch_size=5)
    assert tiled.shape == (112, 96, 2) and tiled.dtype == np.float32
    scale = np.abs(whole).max()
    np.testing.assert_allclose(tiled, whole, atol=1e-4 * scale)
    rough = predict_tiled(model, image, tile_size=64, overlap=8)
    assert np.abs(rough - whole).max() > 1e-2 * scale
    small = np.random.default_rng(1).standard_normal((20, 50, 3)).astype("float32")
    assert predict_tiled(model, small, tile_size=32, overlap=8).shape == (20, 50, 2)


def test_predict_tiled_valid_overlap_tile_is_seamless():
    """The paper's overlap-tile strategy: 60 -> 20 tiles, mirror padding by the 20-pixel context.
    The stitched map equals the unpadded network run once on the whole mirror-padded image (same
    weights), and has the image's size."""
    tile_model = UNet((60, 60, 3), 2, depth=2, base_filters=4, padding="valid")
    randomize_norm_statistics(tile_model)
    image = np.random.default_rng(0).standard_normal((44, 36, 3)).astype("float32")
    tiled = predict_tiled(tile_model, image, batch_size=4)
    assert tiled.shape == (44, 36, 2)
    whole_model = UNet((84, 76, 3), 2, depth=2, base_filters=4, padding="valid")
    whole_model.set_weights(tile_model.get_weights())
    padded = np.pad(image, ((20, 20), (20, 20), (0, 0)), mode="symmetric")
    whole = whole_model.predict(padded[None], verbose=0)[0]
    assert whole.shape == (44, 36, 2)
    np.testing.assert_allclose(tiled, whole, atol=1e-4 * np.abs(whole).max())
    with pytest.raises(ValueError, match=r"`overlap`=8 does not fit.*overlap=40"):
        predict_tiled(tile_model, image, overlap=8)
    with pytest.raises(ValueError, match=r"`tile_size`=64 does not fit.*fixed to \(60, 60\)"):
        predict_tiled(tile_model, image, tile_size=64)


def test_predict_tiled_multi_output_model_uses_the_main_output():
    """Deep supervision gives several outputs: predict_tiled stitches the one named "logits",
    wherever it is in the list (here also put last on purpose), through both the static output
    shape and the run-once fallback: exactly the tiling of a model with that output alone."""
    model = UNetPlusPlus((None, None, 3), 2, depth=2, base_filters=4, deep_supervision=True)
    randomize_norm_statistics(model)
    aux, main = model.get_layer("logits_1").output, model.get_layer("logits").output
    swapped = keras.Model(model.inputs, [aux, main])
    assert swapped.output_names == ["logits_1", "logits"]
    image = np.random.default_rng(0).standard_normal((48, 40, 3)).astype("float32")
    kwargs = {"tile_size": 32, "overlap": 16}
    expected = predict_tiled(keras.Model(model.inputs, main), image, **kwargs)
    wrong = predict_tiled(keras.Model(model.inputs, aux), image, **kwargs)
    assert expected.shape == (48, 40, 2) and np.abs(expected - wrong).max() > 1e-2
    for m in (model, swapped):
        np.testing.assert_allclose(predict_tiled(m, image, **kwargs), expected, atol=1e-6)

    def no_shape(shape):
        raise NotImplementedError("no static shape")

    swapped.compute_output_shape = no_shape  # the fallback runs the model once
    np.testing.assert_allclose(predict_tiled(swapped, image, **kwargs), expected, atol=1e-6)


def test_predict_tiled_bad_arguments():
    model = UNet((None, None, 3), 2, depth=1, base_filters=2)
    image = np.zeros((40, 40, 3), "float32")
    with pytest.raises(ValueError, match=r"`tile_size` is needed"):
        predict_tiled(model, image)
    with pytest.raises(ValueError, match=r"`overlap`=32 must be an integer in \[0, tile_size=32\)"):
        predict_tiled(model, image, tile_size=32, overlap=32)
    with pytest.raises(ValueError, match=r"`image` must be \(height, width, channels\)"):
        predict_tiled(model, image[None], tile_size=32)

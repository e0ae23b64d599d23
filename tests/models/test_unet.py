import keras
import numpy as np
import pytest

import dlmodels
from dlmodels.models import UNet
from tests.helpers import run_model_test


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
    ],
)
def test_unet_bad_arguments(kwargs, match):
    kwargs = {"input_shape": (64, 64, 3), "num_classes": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        UNet(**kwargs)

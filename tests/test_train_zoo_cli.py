"""`dlmodels train --model NAME` trains and saves every registered segmentation model."""

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

import dlmodels.models as registry
from dlmodels.cli import app

SEGMENTERS = [n for n in registry.list() if registry.entry(n).task == "segmentation"]
# Models built on a ResNet: the smallest one, at the smallest size each allows (PSPNet: 6 x its
# output stride of 8, for the 6x6 pyramid bin).
BACKBONE_SIZE = {"deeplabv3": 32, "deeplabv3plus": 32, "fcn": 32, "pspnet": 48}


def test_every_segmenter_is_covered():
    assert {
        "unet", "attention_unet", "resunet", "unet_plus_plus", "unet3plus",
        "deeplabv3", "deeplabv3plus", "fcn", "pspnet",
    } <= set(SEGMENTERS)  # fmt: skip


@pytest.mark.parametrize("name", SEGMENTERS)
def test_train_command_builds_trains_and_saves(name, tmp_path):
    out = tmp_path / f"{name}.keras"
    size = BACKBONE_SIZE.get(name, 32)
    if name in BACKBONE_SIZE:
        args = ["--backbone", "resnet18", "--image-size", f"{size}x{size}"]
    else:
        args = ["--image-size", "32x32", "--depth", "2", "--base-filters", "4"]
    result = CliRunner().invoke(
        app,
        ["train", "--model", name, "--epochs", "1", "--train-samples", "16", "--batch-size", "8",
         "--strategy", "default", "--output", str(out), *args],
    )  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    assert "test mIoU" in result.output
    model = keras.saving.load_model(out)
    y = model.predict(np.zeros((1, size, size, 3), "float32"), verbose=0)
    y = y if not isinstance(y, list) else y[0]
    assert y.shape == (1, size, size, 4)  # the shapes' 4 classes at the input size

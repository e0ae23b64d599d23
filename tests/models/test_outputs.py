"""`output_kind` reads the logits convention off the models: logits by default."""

import keras
import pytest

from dlmodels.models import ResNet18, UNet, output_kind


def test_resnet_returns_logits_by_default():
    model = ResNet18(input_shape=(32, 32, 3), num_classes=3)
    assert model.get_layer("predictions").get_config()["activation"] == "linear"
    assert output_kind(model) == "logits"


@pytest.mark.parametrize(
    "activation, kind",
    [("softmax", "softmax"), ("sigmoid", "sigmoid"), (None, "logits"), ("relu", "unknown")],
)
def test_resnet_classifier_activation(activation, kind):
    model = ResNet18(input_shape=(32, 32, 3), num_classes=3, classifier_activation=activation)
    assert output_kind(model) == kind


def test_resnet_without_top_is_unknown():
    # pooled features / a feature map (through the C5 tap) are not class scores
    assert output_kind(ResNet18(include_top=False, input_shape=(32, 32, 3))) == "unknown"
    pooled = ResNet18(include_top=False, pooling="avg", input_shape=(32, 32, 3))
    assert output_kind(pooled) == "unknown"


@pytest.mark.parametrize(
    "final_activation, kind",
    [(None, "logits"), ("softmax", "softmax"), ("sigmoid", "sigmoid"), ("tanh", "unknown")],
)
def test_unet_final_activation(final_activation, kind):
    model = UNet((16, 16, 3), 2, depth=1, base_filters=2, final_activation=final_activation)
    assert output_kind(model) == kind


def test_multi_output_and_unbuilt():
    inp = keras.Input((4,))
    logits = keras.layers.Dense(3, name="a")(inp)
    probs = keras.layers.Softmax(name="b")(logits)
    assert output_kind(keras.Model(inp, [logits, probs])) == ["logits", "softmax"]
    assert output_kind(keras.Sequential()) == "unknown"

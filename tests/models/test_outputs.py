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


# -- nested models: the output is read inside the sub-model that produced it -----------------
def softmax_inner():
    i = keras.Input((4,))
    return keras.Model(i, keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(5)(i)))


def test_nested_functional_model_is_read_inside():
    """`outer = keras.Model(i, inner(i))`: the kind is the inner output's, not "unknown" (which
    made the Trainer assume logits and apply a second softmax)."""
    j = keras.Input((4,))
    assert output_kind(keras.Model(j, softmax_inner()(j))) == "softmax"
    # twice nested, and through a pass-through layer after the nested model
    k = keras.Input((4,))
    middle = keras.Model(k, softmax_inner()(k))
    outer = keras.Model(j, keras.layers.Reshape((3, 1))(middle(j)))
    assert output_kind(outer) == "softmax"


def test_sequential_head_is_read_inside():
    j = keras.Input((4,))
    head = keras.Sequential([keras.layers.Dense(5), keras.layers.Dense(3, activation="softmax")])
    assert output_kind(keras.Model(j, head(keras.layers.Dense(4)(j)))) == "softmax"
    logits_head = keras.Sequential([keras.layers.Dense(3)])
    assert output_kind(keras.Model(j, logits_head(j))) == "logits"


def test_nested_multi_output_model_follows_the_tensor_index():
    i = keras.Input((4,))
    logits = keras.layers.Dense(3)(i)
    inner = keras.Model(i, [logits, keras.layers.Softmax()(logits)])
    j = keras.Input((4,))
    first, second = inner(j)
    assert output_kind(keras.Model(j, [first, second])) == ["logits", "softmax"]
    assert output_kind(keras.Model(j, second)) == "softmax"
    assert output_kind(keras.Model(j, first)) == "logits"


def test_wrapped_dlmodels_models_keep_their_kind():
    """UNet / ResNet (whose outputs pass FeatureTap / resize layers) read the same wrapped."""
    j = keras.Input((16, 16, 3))
    unet = UNet((16, 16, 3), 2, depth=1, base_filters=2)
    assert output_kind(keras.Model(j, unet(j))) == "logits"
    unet_softmax = UNet((16, 16, 3), 2, depth=1, base_filters=2, final_activation="softmax")
    assert output_kind(keras.Model(j, unet_softmax(j))) == "softmax"
    k = keras.Input((32, 32, 3))
    resnet = ResNet18(input_shape=(32, 32, 3), num_classes=3, classifier_activation="softmax")
    assert output_kind(keras.Model(k, resnet(k))) == "softmax"
    features = ResNet18(include_top=False, input_shape=(32, 32, 3))
    assert output_kind(keras.Model(k, features(k))) == "unknown"


def test_shared_pass_through_layer_is_read_at_the_call_that_produced_the_tensor():
    """One Reshape applied to logits and then to probabilities: each output is read through the
    node it came from (its Keras history), not the layer's first call."""
    j = keras.Input((4,))
    reshape = keras.layers.Reshape((2, 2))
    logits = reshape(keras.layers.Dense(4)(j))
    probs = reshape(keras.layers.Dense(4, activation="softmax")(j))
    assert output_kind(keras.Model(j, probs)) == "softmax"
    assert output_kind(keras.Model(j, [logits, probs])) == ["logits", "softmax"]
    # and the other way round (a sigmoid first, logits second)
    resize = keras.layers.Resizing(4, 4)
    x = keras.Input((2, 2, 3))
    gates = resize(keras.layers.Conv2D(3, 1, activation="sigmoid")(x))
    scores = resize(keras.layers.Conv2D(3, 1)(x))
    assert output_kind(keras.Model(x, [gates, scores])) == ["sigmoid", "logits"]


@pytest.mark.parametrize(
    "layer",
    [keras.layers.Dropout(0.5), keras.layers.Flatten(), keras.layers.ActivityRegularization()],
    ids=["dropout", "flatten", "activity_regularization"],
)
def test_value_preserving_layers_are_looked_through(layer):
    inp = keras.Input((4,))
    assert output_kind(keras.Model(inp, layer(keras.layers.Dense(3)(inp)))) == "logits"

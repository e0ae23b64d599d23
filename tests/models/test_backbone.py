"""The backbone contract: FeatureTap layers declare C1..C5; backbone_features / feature_model /
feature_strides read them without parsing layer names."""

import keras
import numpy as np
import pytest

from dlmodels.layers import FeatureTap
from dlmodels.models import (
    ResNet18,
    ResNet50V2,
    backbone_features,
    feature_model,
    feature_strides,
    resnet_features,
)
from tests.helpers import run_model_test

SIZE = 64
CHANNELS = {"C1": 64, "C2": 64, "C3": 128, "C4": 256, "C5": 512}


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_resnet_declares_c1_to_c5_with_their_strides(output_stride):
    model = ResNet18(include_top=False, input_shape=(SIZE, SIZE, 3), output_stride=output_stride)
    strides = feature_strides(model)
    assert strides == {
        "C1": 2,
        "C2": 4,
        "C3": 8,
        "C4": min(16, output_stride),
        "C5": min(32, output_stride),
    }
    assert strides == feature_strides(output_stride, include_c1=True)
    x = np.random.default_rng(0).standard_normal((1, SIZE, SIZE, 3)).astype("float32")
    out = feature_model(model)(x)
    assert list(out) == ["C1", "C2", "C3", "C4", "C5"]
    for key, tensor in out.items():
        s = strides[key]
        assert tuple(tensor.shape) == (1, SIZE // s, SIZE // s, CHANNELS[key]), key
    # C1 is the stem conv output, before the max pool
    stem = keras.Model(model.input, model.get_layer("stem_conv").output)(x)
    np.testing.assert_array_equal(out["C1"], stem)
    # the backbone's own output (include_top=False, no pooling) is C5
    assert backbone_features(model)["C5"] is model.output


def test_v2_c5_is_after_post_norm_and_post_act():
    model = ResNet50V2(include_top=False, input_shape=(32, 32, 3), output_stride=16)
    features = backbone_features(model, ["C4", "C5"])
    assert list(features) == ["C4", "C5"]
    tap = features["C5"]._keras_history[0]
    assert isinstance(tap, FeatureTap) and tap.stride == 16
    producer = tap._inbound_nodes[0].input_tensors[0]._keras_history[0]
    assert producer.name == "post_act"
    assert tuple(features["C5"].shape) == (None, 2, 2, 2048)


def test_taps_have_no_weights_and_leave_parameter_counts_alone():
    model = ResNet18(input_shape=(32, 32, 3), num_classes=10)
    taps = [layer for layer in model.layers if isinstance(layer, FeatureTap)]
    assert [t.name for t in taps] == ["C1", "C2", "C3", "C4", "C5"]
    assert all(not t.weights for t in taps)
    # torchvision ResNet-18 body (11,689,512 - 513,000 for the 1000-class head) + a 10-class head
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == 11_176_512 + 5_130


def test_taps_survive_keras_save_and_load(tmp_path):
    model = ResNet18(include_top=False, input_shape=(32, 32, 3), output_stride=16)
    path = tmp_path / "r18.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert feature_strides(loaded) == feature_strides(model)
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype("float32")
    want = feature_model(model)(x)
    got = feature_model(loaded)(x)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-6)


def test_resnet_features_keeps_c2_to_c5_and_optionally_c1():
    model = ResNet18(include_top=False, input_shape=(32, 32, 3))
    assert list(resnet_features(model).output) == ["C2", "C3", "C4", "C5"]
    assert list(resnet_features(model, include_c1=True).output) == ["C1", "C2", "C3", "C4", "C5"]
    assert feature_model(model, ["C2", "C5"]).name == f"{model.name}_features"


def test_clear_errors_for_models_without_taps_and_unknown_names():
    inp = keras.Input((8, 8, 3))
    plain = keras.Model(inp, keras.layers.Conv2D(4, 3)(inp), name="plain")
    for fn in (backbone_features, feature_model, feature_strides):
        with pytest.raises(ValueError, match=r"'plain' declares no feature maps.*FeatureTap"):
            fn(plain)
    model = ResNet18(include_top=False, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match=r"`names`=\['C6'\].*declares \['C1', 'C2'"):
        feature_model(model, ["C6"])
    outer_in = keras.Input((32, 32, 3))
    outer = keras.Model(outer_in, model(outer_in), name="outer")
    with pytest.raises(ValueError, match=r"nests the models \['resnet18'\]"):
        backbone_features(outer)


def test_feature_model_harness_with_export():
    """The dict-output feature model saves, runs under mixed precision (float16 features: no
    float32 heads), trains and exports to ONNX with one output per feature (SavedModel export
    of the same blocks is covered by the ResNet18 harness; skipped to keep the suite fast)."""
    run_model_test(
        lambda: feature_model(
            ResNet18(include_top=False, input_shape=(32, 32, 3), output_stride=16)
        ),
        (1, 32, 32, 3),
        [(1, 16, 16, 64), (1, 8, 8, 64), (1, 4, 4, 128), (1, 2, 2, 256), (1, 2, 2, 512)],
        float32_outputs=False,
        saved_model=False,
    )

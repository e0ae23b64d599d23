import keras
import pytest

from dlmodels.bench.flops import count_macs


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

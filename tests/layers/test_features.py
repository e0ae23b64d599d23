import keras
import numpy as np
import onnx
import pytest

from dlmodels import export
from dlmodels.layers import ConvNormAct, FeatureTap
from tests.helpers import run_layer_test


def test_feature_tap_harness():
    # No weights: nothing to train. It passes its input's dtype through instead of casting to
    # the compute dtype (the harness feeds float32), so mixed precision is checked below.
    run_layer_test(
        FeatureTap,
        {"stride": 8, "name": "C3"},
        (2, 6, 6, 4),
        (2, 6, 6, 4),
        train_step=False,
        mixed_precision=False,
    )


def test_feature_tap_is_the_identity_and_keeps_the_dtype():
    tap = FeatureTap(4, name="C2")
    assert tap.get_config()["stride"] == 4 and tap.name == "C2"
    x = np.arange(12, dtype="float32").reshape(1, 2, 2, 3)
    np.testing.assert_array_equal(tap(x), x)
    keras.config.set_dtype_policy("mixed_float16")
    try:
        half = FeatureTap(4, name="C2")
        assert half(keras.ops.cast(x, "float16")).dtype == "float16"
        assert half(x).dtype == "float32"  # passes dtypes through, casts nothing
    finally:
        keras.config.set_dtype_policy("float32")


def test_feature_tap_bad_arguments():
    with pytest.raises(ValueError, match=r"`name` must be the feature's name"):
        FeatureTap(8)
    with pytest.raises(ValueError, match=r"`stride` must be a positive integer.*0"):
        FeatureTap(0, name="C3")


def _tiny(with_taps):
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3), name="image")
    x = ConvNormAct(4, strides=2, name="a")(inp)
    if with_taps:
        x = FeatureTap(2, name="C1")(x)
    x = ConvNormAct(4, name="b")(x)
    if with_taps:
        x = FeatureTap(2, name="C2")(x)
    return keras.Model(inp, keras.layers.Conv2D(2, 1, name="logits")(x))


def test_taps_leave_the_exported_onnx_graph_unchanged(tmp_path):
    ops = []
    for with_taps in (False, True):
        path = export.to_onnx(_tiny(with_taps), tmp_path / f"m{with_taps}.onnx")
        ops.append(sorted(node.op_type for node in onnx.load(str(path)).graph.node))
    assert ops[0] == ops[1]
    assert "Identity" not in ops[1]

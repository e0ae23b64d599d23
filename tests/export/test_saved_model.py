"""SavedModel export: named serving signature, dynamic batch, parity with Keras."""

import numpy as np
import pytest
import tensorflow as tf

from dlmodels import export
from tests.export._tiny import IMAGE_SHAPE, images
from tests.helpers import assert_saved_model_parity


@pytest.fixture(scope="module")
def exported(model, multi_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("sm")
    return {
        "single": export.to_saved_model(model, root / "tiny" / "1"),
        "multi": export.to_saved_model(multi_model, root / "two" / "1"),
    }


def test_signature_names_and_dynamic_batch(exported):
    fn = tf.saved_model.load(str(exported["single"])).signatures["serving_default"]
    args, kwargs = fn.structured_input_signature
    assert args == ()
    assert list(kwargs) == ["image"]
    assert kwargs["image"].shape.as_list() == [None, *IMAGE_SHAPE]
    assert list(fn.structured_outputs) == ["logits"]
    assert fn.structured_outputs["logits"].shape.as_list() == [None, *IMAGE_SHAPE[:2], 3]


@pytest.mark.parametrize("batch", [1, 3])
def test_parity_single_output(model, exported, batch):
    x = images(batch, seed=batch)
    fn = tf.saved_model.load(str(exported["single"])).signatures["serving_default"]
    got = fn(image=tf.constant(x))["logits"].numpy()
    expected = model.predict(x, verbose=0)
    err = np.max(np.abs(got - expected))
    assert err <= 1e-5, err
    assert got.shape == (batch, *IMAGE_SHAPE[:2], 3)


@pytest.mark.parametrize("batch", [1, 3])
def test_parity_multi_output(multi_model, exported, batch):
    x = images(batch, seed=10 + batch)
    fn = tf.saved_model.load(str(exported["multi"])).signatures["serving_default"]
    out = fn(image=tf.constant(x))
    assert sorted(out) == sorted(multi_model.output_names) == ["label", "logits"]
    expected = multi_model.predict(x, verbose=0)
    for name, e in zip(multi_model.output_names, expected, strict=True):
        assert np.max(np.abs(out[name].numpy() - e)) <= 1e-5, name


def test_shared_helper_accepts_our_api(model, multi_model):
    assert_saved_model_parity(model, images(2, seed=3))
    assert_saved_model_parity(multi_model, images(2, seed=4))


def test_keras_format_roundtrip(model, tmp_path):
    import keras

    path = export.to_keras(model, tmp_path / "tiny.keras")
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = images(2)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6, rtol=0
    )
    with pytest.raises(ValueError, match=r"\.keras"):
        export.to_keras(model, tmp_path / "tiny.h5")

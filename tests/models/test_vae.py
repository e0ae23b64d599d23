"""VAE: the harness on its encoder / decoder, .keras round trip, sampling, errors, exact
multi-replica training on digits, and export of the deterministic sub-models."""

import os
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import dlmodels.models
from dlmodels.bench.generative import export_parts
from dlmodels.data import digits
from dlmodels.models import VAE
from dlmodels.training import Trainer, resolve_strategy
from tests.helpers import run_model_test


@pytest.mark.parametrize("architecture", ["dense", "conv"])
def test_encoder_and_decoder_through_the_harness(architecture):
    """Shapes, config, .keras, mixed precision, SavedModel and ONNX parity, one train step."""
    run_model_test(
        lambda: VAE(latent_dim=3, architecture=architecture, hidden_units=(16,)).encoder,
        (2, 8, 8, 1),
        [(2, 3), (2, 3)],
    )
    run_model_test(
        lambda: VAE(latent_dim=3, architecture=architecture, hidden_units=(16,)).decoder,
        (2, 3),
        (2, 8, 8, 1),
        float32_layers=("dec_out",),
    )


def test_vae_keras_roundtrip_sample_and_reconstruct():
    vae = VAE(latent_dim=4, architecture="conv", beta=2.0, likelihood="gaussian", seed=5)
    assert "vae" in dlmodels.models.list()
    assert "Kingma" in VAE.__doc__
    x, _ = digits.load("test", num_samples=6)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vae.keras")
        vae.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, VAE)
    assert loaded.get_config() == vae.get_config()
    np.testing.assert_allclose(loaded.reconstruct(x), vae.reconstruct(x), atol=1e-6)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(vae(x)), atol=1e-6)
    # Inference decodes the posterior mean: deterministic.
    np.testing.assert_array_equal(np.asarray(vae(x)), np.asarray(vae(x)))
    assert vae.sample(5).shape == (5, 8, 8, 1)
    np.testing.assert_array_equal(vae.sample(3, seed=1), vae.sample(3, seed=1))
    bernoulli = VAE(latent_dim=2)
    images = bernoulli.sample(4)
    assert images.min() >= 0.0 and images.max() <= 1.0  # sigmoid of the logits
    task = vae.task()
    assert (task.beta, task.likelihood, task.seed) == (2.0, "gaussian", 5)


def test_bad_input_raises_clear_value_errors():
    for bad in (0, -3):
        with pytest.raises(ValueError, match="latent_dim"):
            VAE(latent_dim=bad)
    with pytest.raises(ValueError, match="likelihood"):
        VAE(likelihood="poisson")
    with pytest.raises(ValueError, match="divisible by 4"):
        VAE(input_shape=(10, 10, 1), architecture="conv")
    with pytest.raises(ValueError, match="input_shape"):
        VAE(input_shape=(8, 8))
    vae = VAE(latent_dim=2, hidden_units=(8,))
    with pytest.raises(ValueError, match=r"\(N, 8, 8, 1\)"):
        vae.reconstruct(np.zeros((2, 28, 28, 1)))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        vae.decode(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="`n`"):
        vae.sample(0)


def _train(strategy, initial, ds):
    with strategy.scope():
        vae = VAE(latent_dim=2, architecture="conv", filters=(4, 8), seed=3)
        vae.set_weights(initial)
        sgd = keras.optimizers.SGD(0.01)
    history = Trainer(vae.task(sgd), strategy=strategy, progress=False).fit(ds, epochs=2)
    return vae, history


def test_vae_two_replicas_equal_one_device():
    """VAE on real digits, conv encoder/decoder: 2 epochs of 3 batches (8, 8, 5 -> uneven last
    split) under MirroredStrategy over two CPUs give one device's losses and weights."""
    x, y = digits.load("train", num_samples=21)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    initial = VAE(latent_dim=2, architecture="conv", filters=(4, 8)).get_weights()
    one, history = _train(tf.distribute.get_strategy(), initial, ds)
    two, history2 = _train(resolve_strategy("mirrored", devices=["/cpu:0", "/cpu:1"]), initial, ds)
    assert history["loss"][1] < history["loss"][0]
    np.testing.assert_allclose(history2["loss"], history["loss"], rtol=1e-5)
    moved = max(np.abs(a - b).max() for a, b in zip(one.get_weights(), initial, strict=True))
    assert moved > 1e-4
    for got, want in zip(two.get_weights(), one.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_export_encoder_and_decoder_without_random_ops(tmp_path):
    vae = VAE(latent_dim=3, architecture="conv", filters=(4, 8))
    x, _ = digits.load("test", num_samples=16)
    mu, _ = vae.encode(x)
    results = export_parts(
        [("encoder", vae.encoder, x), ("decoder", vae.decoder, mu)],
        tmp_path,
        formats=("keras", "saved_model", "onnx"),
    )
    for name, summary in results.items():
        assert summary["passed"], (name, summary)
        assert max(summary["max_abs_error"].values()) <= 1e-4
        assert summary["onnx_random_ops"] == []
        assert (tmp_path / name / "manifest.json").exists()
        assert (tmp_path / name / "saved_model" / "1" / "saved_model.pb").exists()
    # A graph that samples inside cannot be exported silently: tf2onnx has no mapping for the
    # stateless random op and the exporter refuses (continue_on_error stays off).
    mu_in, lv_in = keras.Input((3,)), keras.Input((3,))
    noisy = keras.Model(
        [mu_in, lv_in],
        dlmodels.layers.Sampling(mean_at_inference=False)([mu_in, lv_in]),
    )
    from dlmodels import export

    with pytest.raises(ValueError, match="StatelessRandomNormal"):
        export.to_onnx(noisy, tmp_path / "noisy.onnx")
    assert not (tmp_path / "noisy.onnx").exists()

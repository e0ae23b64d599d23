"""Sampling (the reparameterisation trick) and the closed-form Gaussian KL loss / metric."""

import os
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from dlmodels.layers import Sampling
from dlmodels.losses import GaussianKL, gaussian_kl_per_example
from dlmodels.metrics import MeanGaussianKL
from tests.helpers import run_layer_test

MU = np.array([[0.5, -1.0, 2.0], [0.0, 0.3, -0.7]], "float32")
LOG_VAR = np.array([[0.0, np.log(4.0), -1.0], [0.2, -0.5, 1.5]], "float32")


def numpy_kl(mu, log_var):
    return 0.5 * np.sum(mu**2 + np.exp(log_var) - 1.0 - log_var, axis=-1)


# -- KL ---------------------------------------------------------------------------------------
def test_kl_closed_form_on_fixed_values():
    # Row 0 by hand: 0.5 * [(0.25 + 1 - 1 - 0) + (1 + 4 - 1 - ln 4) + (4 + e^-1 - 1 + 1)]
    by_hand = 0.5 * ((0.25) + (4.0 - np.log(4.0)) + (4.0 + np.exp(-1.0)))
    got = np.asarray(gaussian_kl_per_example(MU, LOG_VAR))
    assert got.shape == (2,)
    assert got[0] == pytest.approx(by_hand, rel=1e-6)
    np.testing.assert_allclose(got, numpy_kl(MU, LOG_VAR), rtol=1e-6)
    # The standard normal has zero divergence from itself.
    assert float(gaussian_kl_per_example(np.zeros((1, 4)), np.zeros((1, 4)))[0]) == 0.0


def test_kl_equals_a_monte_carlo_estimate():
    """E_q[log q(z) - log p(z)] over 200k draws per row matches the closed form (3 sigma)."""
    rng = np.random.default_rng(0)
    n = 200_000
    for mu, log_var in zip(MU.astype("float64"), LOG_VAR.astype("float64"), strict=True):
        sigma = np.exp(0.5 * log_var)
        z = mu + sigma * rng.standard_normal((n, mu.size))
        log_q = -0.5 * (((z - mu) / sigma) ** 2 + log_var + np.log(2 * np.pi))
        log_p = -0.5 * (z**2 + np.log(2 * np.pi))
        terms = (log_q - log_p).sum(1)
        estimate, stderr = terms.mean(), terms.std() / np.sqrt(n)
        closed = float(gaussian_kl_per_example(mu[None], log_var[None])[0])
        assert abs(estimate - closed) < 4 * stderr + 1e-3, (estimate, closed, stderr)


def test_kl_loss_and_metric():
    loss = GaussianKL()
    want = numpy_kl(MU, LOG_VAR)
    assert float(loss(None, (MU, LOG_VAR))) == pytest.approx(want.mean(), rel=1e-6)
    assert float(loss(None, np.concatenate([MU, LOG_VAR], -1))) == pytest.approx(
        want.mean(), rel=1e-6
    )
    per_example = GaussianKL(weight=2.0, reduction=None)(None, (MU, LOG_VAR))
    np.testing.assert_allclose(np.asarray(per_example), 2.0 * want, rtol=1e-6)
    clone = GaussianKL.from_config(GaussianKL(weight=3.0).get_config())
    assert clone.weight == 3.0
    with pytest.raises(ValueError, match="even"):
        loss(None, np.zeros((2, 3), "float32"))
    with pytest.raises(ValueError, match="weight"):
        GaussianKL(weight=-1)

    metric = MeanGaussianKL()
    metric.update_state(MU[:1], LOG_VAR[:1])
    metric.update_state(MU[1:], LOG_VAR[1:])
    assert float(metric.result()) == pytest.approx(want.mean(), rel=1e-6)
    metric.reset_state()
    metric.update_state(None, (MU, LOG_VAR))
    assert float(metric.result()) == pytest.approx(want.mean(), rel=1e-6)


# -- Sampling ---------------------------------------------------------------------------------
def test_sampling_mean_and_variance_over_many_draws():
    n = 50_000
    mu = np.tile(np.array([[1.5, -2.0, 0.0]], "float32"), (n, 1))
    log_var = np.tile(np.array([[0.0, np.log(0.25), np.log(9.0)]], "float32"), (n, 1))
    z = np.asarray(Sampling(seed=3)([mu, log_var], training=True))
    np.testing.assert_allclose(z.mean(0), mu[0], atol=4 * 3.0 / np.sqrt(n))
    np.testing.assert_allclose(z.var(0), np.exp(log_var[0]), rtol=0.03)
    # Independent coordinates (the posterior is diagonal).
    assert abs(np.corrcoef(z.T)[0, 2]) < 0.02


def test_sampling_returns_mu_at_inference_unless_asked():
    layer = Sampling(seed=1)
    np.testing.assert_array_equal(np.asarray(layer([MU, LOG_VAR], training=False)), MU)
    np.testing.assert_array_equal(np.asarray(layer([MU, LOG_VAR])), MU)
    drawn = np.asarray(layer([MU, LOG_VAR], training=True))
    assert np.abs(drawn - MU).max() > 1e-3
    # Every call draws new noise (the seed generator advances).
    assert np.abs(np.asarray(layer([MU, LOG_VAR], training=True)) - drawn).max() > 1e-3
    always = Sampling(mean_at_inference=False, seed=1)
    assert np.abs(np.asarray(always([MU, LOG_VAR], training=False)) - MU).max() > 1e-3


def test_gradients_reach_mu_and_log_var():
    mu = tf.Variable(MU)
    log_var = tf.Variable(LOG_VAR)
    layer = Sampling(seed=0)
    with tf.GradientTape() as tape:
        z = layer([mu, log_var], training=True)
        loss = tf.reduce_sum(z**2)
    d_mu, d_lv = tape.gradient(loss, [mu, log_var])
    # z = mu + exp(lv / 2) eps: dL/dmu = 2 z, dL/dlv = 2 z * 0.5 * exp(lv / 2) * eps
    eps = (np.asarray(z) - MU) / np.exp(0.5 * LOG_VAR)
    np.testing.assert_allclose(np.asarray(d_mu), 2 * np.asarray(z), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(d_lv), np.asarray(z) * np.exp(0.5 * LOG_VAR) * eps, rtol=1e-4, atol=1e-6
    )
    assert np.abs(np.asarray(d_lv)).min() > 0


def test_sampling_layer_harness_and_errors():
    run_layer_test(
        Sampling,
        {"seed": 2},
        [((None, 4), "float32"), ((None, 4), "float32")],
        (2, 4),
        train_step=False,  # no weights
    )
    with pytest.raises(ValueError, match="mu, log_var"):
        Sampling()(MU)
    with pytest.raises(ValueError, match="same shape"):
        Sampling()([MU, LOG_VAR[:, :2]])
    with pytest.raises(ValueError, match="seed"):
        Sampling(seed="x")


def test_sampling_in_a_saved_model_keeps_mu_at_inference():
    mu_in, lv_in = keras.Input((3,)), keras.Input((3,))
    model = keras.Model([mu_in, lv_in], Sampling(seed=4)([mu_in, lv_in]))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.keras")
        model.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(np.asarray(loaded([MU, LOG_VAR])), MU)
    assert loaded.layers[-1].get_config()["seed"] == 4

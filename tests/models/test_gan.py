"""ConditionalGAN: the harness on generator / discriminator, .keras round trip, label checks,
exact multi-replica training (non-saturating with batch norm, WGAN-GP) and generator export."""

import os
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import dlmodels.models
from dlmodels.bench.generative import export_parts
from dlmodels.data import digits
from dlmodels.models import ConditionalGAN
from dlmodels.training import GANTask, Trainer, resolve_strategy
from tests.helpers import run_model_test

SMALL = {"latent_dim": 8, "embedding_dim": 4, "filters": (16, 8)}
GEN_INPUTS = [((None, 8), "float32"), ((None,), "int32", 10)]
DISC_INPUTS = [((None, 8, 8, 1), "float32"), ((None,), "int32", 10)]


def test_generator_through_the_harness():
    """(z, label) -> image: config, .keras, mixed precision, SavedModel and ONNX parity."""
    run_model_test(
        lambda: ConditionalGAN(**SMALL).generator,
        GEN_INPUTS,
        (2, 8, 8, 1),
        float32_layers=("g_out",),
    )


@pytest.mark.parametrize(
    ("conditioning", "norm"), [("projection", "batch"), ("label_map", "layer")]
)
def test_discriminator_through_the_harness(conditioning, norm):
    run_model_test(
        lambda: (
            ConditionalGAN(
                **SMALL, conditioning=conditioning, discriminator_norm=norm
            ).discriminator
        ),
        DISC_INPUTS,
        (2, 1),
        saved_model=False,
        onnx=False,
        float32_layers=("d_linear", "d_projection"),
    )


def test_projection_uses_the_label():
    """The projection term makes the logit depend on the label (Miyato & Koyama 2018)."""
    d = ConditionalGAN(**SMALL).discriminator
    x = np.random.default_rng(0).uniform(size=(4, 8, 8, 1)).astype("float32")
    a = np.asarray(d([x, np.zeros(4, "int32")], training=False))
    b = np.asarray(d([x, np.full(4, 3, "int32")], training=False))
    assert np.abs(a - b).max() > 1e-4


def test_cgan_keras_roundtrip_and_sampling():
    cgan = ConditionalGAN(**SMALL, loss="wgan_gp", gp_weight=5.0, seed=7)
    assert "cgan" in dlmodels.models.list()
    assert "Mirza" in ConditionalGAN.__doc__ and "Miyato" in ConditionalGAN.__doc__
    assert cgan.discriminator_norm is None  # WGAN-GP: no batch norm in the critic
    z = np.random.default_rng(0).standard_normal((3, 8)).astype("float32")
    labels = np.array([0, 5, 9], "int32")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cgan.keras")
        cgan.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, ConditionalGAN)
    assert loaded.get_config() == cgan.get_config()
    np.testing.assert_allclose(loaded.generate(z, labels), cgan.generate(z, labels), atol=1e-6)
    np.testing.assert_allclose(np.asarray(cgan([z, labels])), cgan.generate(z, labels), atol=1e-6)
    images = cgan.sample([1, 2, 3, 4])
    assert images.shape == (4, 8, 8, 1)
    assert images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_array_equal(cgan.sample([1, 2], seed=4), cgan.sample([1, 2], seed=4))
    task = cgan.task()
    assert isinstance(task, GANTask)
    assert (task.loss, task.gp_weight, task.conditional, task.seed) == ("wgan_gp", 5.0, True, 7)


def test_bad_input_raises_clear_value_errors():
    for bad in (0, -1):
        with pytest.raises(ValueError, match="latent_dim"):
            ConditionalGAN(latent_dim=bad)
    cgan = ConditionalGAN(**SMALL)
    for labels in ([10], [-1], [0, 3, 12]):
        with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
            cgan.sample(labels)
    with pytest.raises(ValueError, match="integer class ids"):
        cgan.sample([0.5])
    with pytest.raises(ValueError, match=r"expected \(2, 8\)"):
        cgan.generate(np.zeros((2, 5)), [0, 1])
    with pytest.raises(ValueError, match="divisible by 4"):
        ConditionalGAN(input_shape=(6, 6, 1))
    with pytest.raises(ValueError, match="input_shape"):
        ConditionalGAN(input_shape=(8, 8))
    with pytest.raises(ValueError, match="batch norm"):
        ConditionalGAN(loss="wgan_gp", discriminator_norm="batch")
    with pytest.raises(ValueError, match="conditioning"):
        ConditionalGAN(conditioning="concat")
    with pytest.raises(ValueError, match="d_steps"):
        cgan.task(d_steps=0)


def _train(strategy, initial, ds, loss):
    with strategy.scope():
        cgan = ConditionalGAN(**SMALL, loss=loss, seed=5)
        for model, weights in zip((cgan.generator, cgan.discriminator), initial, strict=True):
            model.set_weights(weights)
        g_opt, d_opt = keras.optimizers.SGD(0.05), keras.optimizers.SGD(0.05)
    task = cgan.task(g_opt, d_opt, d_steps=2 if loss == "wgan_gp" else 1)
    history = Trainer(task, strategy=strategy, progress=False).fit(ds, epochs=2)
    return cgan, history


@pytest.mark.parametrize("loss", ["non_saturating", "wgan_gp"])
def test_cgan_two_replicas_equal_one_device(loss):
    """Real digits, batches of 8 (4 + 4 per replica): two replicas end with one device's
    generator and discriminator weights: latents (and WGAN-GP's interpolation weights) drawn
    for the global batch, losses averaged over it, BatchNorm synchronised."""
    x, y = digits.load("train", num_samples=16)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8, drop_remainder=True)
    reference = ConditionalGAN(**SMALL, loss=loss)
    initial = [reference.generator.get_weights(), reference.discriminator.get_weights()]
    one, history = _train(tf.distribute.get_strategy(), initial, ds, loss)
    two, history2 = _train(
        resolve_strategy("mirrored", devices=["/cpu:0", "/cpu:1"]), initial, ds, loss
    )
    np.testing.assert_allclose(history2["d_loss"], history["d_loss"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(history2["g_loss"], history["g_loss"], rtol=1e-4, atol=1e-5)
    for a, b, init in zip(
        (two.generator, two.discriminator), (one.generator, one.discriminator), initial, strict=True
    ):
        moved = max(np.abs(w - i).max() for w, i in zip(b.get_weights(), init, strict=True))
        assert moved > 1e-4
        for got, want in zip(a.get_weights(), b.get_weights(), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_wgan_gp_penalty_is_the_gradient_norm_penalty():
    """The critic loss of one step equals numpy's D(G(z)) - D(x) + w (||grad|| - 1)^2, with
    the interpolation and gradient recomputed here from the same seeds."""
    from dlmodels.training import StepContext

    cgan = ConditionalGAN(**SMALL, loss="wgan_gp", gp_weight=10.0, seed=2)
    task = cgan.task(keras.optimizers.SGD(0.0), keras.optimizers.SGD(0.0))
    Trainer(task, progress=False)  # builds the optimizers
    x, y = digits.load("train", num_samples=6)
    x, y = tf.constant(x), tf.constant(y)
    ctx = StepContext(tf.distribute.get_strategy(), (x, y))
    seed = ctx.seed(task.seed, 0, salt=100)
    z = ctx.normal(task.latent_shape, ctx.seed(task.seed, 0, salt=0))
    fake = cgan.generator([z, y], training=True)
    penalty = np.asarray(task._gradient_penalty(x, fake, y, ctx, seed))
    alpha = np.asarray(ctx.uniform([1, 1, 1], seed))
    mixed = tf.constant(alpha * np.asarray(x) + (1 - alpha) * np.asarray(fake))
    norms = []
    for i in range(len(x)):  # one example at a time: no batch interaction to hide
        with tf.GradientTape() as tape:
            xi = mixed[i : i + 1]
            tape.watch(xi)
            logit = cgan.discriminator([xi, y[i : i + 1]], training=True)
        norms.append(np.linalg.norm(np.asarray(tape.gradient(logit, xi))))
    np.testing.assert_allclose(penalty, (np.array(norms) - 1.0) ** 2, rtol=1e-4, atol=1e-6)
    assert penalty.max() > 1e-3


def test_export_generator_takes_z_and_label_without_random_ops(tmp_path):
    cgan = ConditionalGAN(**SMALL)
    rng = np.random.default_rng(0)
    samples = {
        "z": rng.standard_normal((16, 8)).astype("float32"),
        "label": (np.arange(16) % 10).astype("int32"),
    }
    results = export_parts(
        [("generator", cgan.generator, samples)], tmp_path, formats=("saved_model", "onnx")
    )
    summary = results["generator"]
    assert summary["passed"], summary
    assert max(summary["max_abs_error"].values()) <= 1e-4
    assert summary["onnx_random_ops"] == []
    from dlmodels import export

    io = export.onnx_io(tmp_path / "generator" / "model.onnx")
    assert [i["name"] for i in io["inputs"]] == ["z", "label"]

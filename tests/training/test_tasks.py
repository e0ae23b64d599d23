"""Tasks through the Trainer: VAE and GAN exact under replicas, ignore index, logits convention."""

import logging
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from dlmodels.losses import SparseCrossEntropy
from dlmodels.metrics import confusion_matrix_iou
from dlmodels.training import GANTask, SupervisedTask, Trainer, VAETask, resolve_strategy


def mirrored():
    return resolve_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])


def assert_same_weights(models, references, atol=1e-5):
    for model, reference in zip(models, references, strict=True):
        for got, want in zip(model.get_weights(), reference.get_weights(), strict=True):
            np.testing.assert_allclose(got, want, atol=atol)


def moved(models, initial):
    return max(
        np.abs(w - i).max()
        for m, init in zip(models, initial, strict=True)
        for w, i in zip(m.get_weights(), init, strict=True)
    )


def images(n=16, seed=0):
    return np.random.default_rng(seed).uniform(size=(n, 8, 8, 1)).astype("float32")


# -- VAE -------------------------------------------------------------------------------------
def vae_models():
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Dense(16, activation="tanh")(keras.layers.Flatten()(inp))
    encoder = keras.Model(inp, [keras.layers.Dense(2)(h), keras.layers.Dense(2)(h)])
    z = keras.Input((2,))
    h = keras.layers.Dense(16, activation="tanh")(z)
    decoder = keras.Model(z, keras.layers.Reshape((8, 8, 1))(keras.layers.Dense(64)(h)))
    return encoder, decoder


def run_vae(strategy, initial, ds):
    with strategy.scope():
        encoder, decoder = vae_models()
        encoder.set_weights(initial[0])
        decoder.set_weights(initial[1])
        sgd = keras.optimizers.SGD(0.05)
    task = VAETask(encoder, decoder, optimizer=sgd, beta=0.5, seed=3)
    history = Trainer(task, strategy=strategy, progress=False).fit(ds, epochs=2)
    return (encoder, decoder), history


def test_vae_task_two_replicas_equal_one_device():
    """4 SGD steps of a toy VAE (batches of 8 = 4 + 4 and 3 = 2 + 1 over two replicas): same
    weights as one device, which needs the global-batch average and the global-batch epsilon
    sliced at each replica's row offset (all-gathered local sizes for the uneven batch)."""
    x = images(11)
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(11, "int32"))).batch(8)
    keras.utils.set_random_seed(0)
    initial = [m.get_weights() for m in vae_models()]
    one, history = run_vae(tf.distribute.get_strategy(), initial, ds)
    two, history2 = run_vae(mirrored(), initial, ds)
    assert moved(one, initial) > 1e-3
    assert set(history) >= {"loss", "reconstruction", "kl"}
    assert history["loss"][1] < history["loss"][0]
    np.testing.assert_allclose(history2["loss"], history["loss"], rtol=1e-5)
    assert_same_weights(two, one)


def test_vae_loss_is_the_negative_elbo():
    encoder, decoder = vae_models()
    task = VAETask(encoder, decoder, beta=2.0, likelihood="gaussian")
    x = images(4)
    result = Trainer(task, progress=False).evaluate(tf.data.Dataset.from_tensor_slices(x).batch(4))
    mu, log_var = (np.asarray(t) for t in encoder(x))
    mean = np.asarray(decoder(mu))
    nll = (0.5 * (x - mean) ** 2 + 0.5 * np.log(2 * np.pi)).reshape(4, -1).sum(1)
    kl = 0.5 * (mu**2 + np.exp(log_var) - 1 - log_var).sum(1)
    assert result["loss"] == pytest.approx(float(np.mean(nll + 2.0 * kl)), rel=1e-5)
    with pytest.raises(ValueError, match="likelihood"):
        VAETask(encoder, decoder, likelihood="poisson")


# -- GAN -------------------------------------------------------------------------------------
def gan_models(conditional=False):
    z = keras.Input((4,))
    label = keras.Input((), dtype="int32")
    h = z
    if conditional:
        h = keras.layers.Concatenate()([z, keras.layers.Embedding(3, 2)(label)])
    h = keras.layers.Dense(16)(h)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization(momentum=0.5)(h))
    fake = keras.layers.Reshape((8, 8, 1))(keras.layers.Dense(64, activation="sigmoid")(h))
    generator = keras.Model([z, label] if conditional else z, fake)
    x = keras.Input((8, 8, 1))
    h = keras.layers.Flatten()(x)
    if conditional:
        h = keras.layers.Concatenate()([h, keras.layers.Embedding(3, 2)(label)])
    h = keras.layers.Dense(16)(h)
    h = keras.layers.LeakyReLU(0.2)(keras.layers.BatchNormalization(momentum=0.5)(h))
    discriminator = keras.Model([x, label] if conditional else x, keras.layers.Dense(1)(h))
    return generator, discriminator


def run_gan(strategy, initial, ds, conditional):
    with strategy.scope():
        models = gan_models(conditional)
        for model, weights in zip(models, initial, strict=True):
            model.set_weights(weights)
        g_opt, d_opt = keras.optimizers.SGD(0.1), keras.optimizers.SGD(0.1)
    task = GANTask(*models, g_opt, d_opt, latent_dim=4, conditional=conditional, seed=5)
    history = Trainer(task, strategy=strategy, progress=False).fit(ds, epochs=2)
    return models, history


@pytest.mark.parametrize("conditional", [False, True])
def test_gan_task_two_replicas_equal_one_device(conditional):
    """4 batches of D then G SGD steps, BatchNorm in both models: two replicas (sync BN,
    global-batch latents) end with one device's weights and moving statistics."""
    x = images()
    labels = (np.arange(16) % 3).astype("int32")
    # Static per-replica batches (drop_remainder) take the `replica_id * local` offset path.
    ds = tf.data.Dataset.from_tensor_slices((x, labels)).batch(8, drop_remainder=not conditional)
    keras.utils.set_random_seed(0)
    initial = [m.get_weights() for m in gan_models(conditional)]
    one, history = run_gan(tf.distribute.get_strategy(), initial, ds, conditional)
    strategy = mirrored()
    two, history2 = run_gan(strategy, initial, ds, conditional)
    assert set(history) >= {"d_loss", "g_loss"}
    assert moved(one, initial) > 1e-3
    np.testing.assert_allclose(history2["d_loss"], history["d_loss"], rtol=1e-5)
    assert_same_weights(two, one)  # replica 0's copy of every variable
    # Moving statistics are kept per replica (aggregation "none"): `get_weights()` returns
    # replica 0's, so read both replicas' copies.
    checked = 0
    for model, reference in zip(two, one, strict=True):
        for layer, ref in zip(model.layers, reference.layers, strict=True):
            if not isinstance(layer, keras.layers.BatchNormalization):
                continue
            for variable, want in (
                (layer.moving_mean, ref.moving_mean),
                (layer.moving_variance, ref.moving_variance),
            ):
                values = strategy.experimental_local_results(variable.value)
                assert len(values) == 2
                for replica, value in enumerate(values):
                    np.testing.assert_allclose(
                        np.asarray(value), np.asarray(want), atol=1e-5, err_msg=f"{replica}"
                    )
                checked += 1
    assert checked == 4  # moving mean and variance of the generator's and discriminator's BN


def test_gan_task_errors():
    generator, discriminator = gan_models()
    with pytest.raises(ValueError, match="latent_dim"):
        GANTask(generator, discriminator, latent_dim=0)
    with pytest.raises(ValueError, match="loss"):
        GANTask(generator, discriminator, latent_dim=4, loss="wasserstein")
    opt = keras.optimizers.SGD()
    with pytest.raises(ValueError, match="same object"):
        Trainer(GANTask(generator, discriminator, opt, opt, latent_dim=4))
    with pytest.raises(ValueError, match="apply when the first argument"):
        Trainer(GANTask(generator, discriminator, latent_dim=4), loss="mse")


# -- supervised: ignore index ----------------------------------------------------------------
def seg_model(activation=None):
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    return keras.Model(inp, keras.layers.Conv2D(3, 1, activation=activation)(x))


def numpy_ce(labels, scores, from_logits=True, ignore_index=None):
    """Per example: mean over its non-ignored pixels of -log p[label]; then mean over examples."""
    if from_logits:
        scores = scores - scores.max(-1, keepdims=True)
        logp = scores - np.log(np.exp(scores).sum(-1, keepdims=True))
    else:
        logp = np.log(np.clip(scores, 1e-7, 1 - 1e-7))
    keep = np.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
    safe = np.where(keep, labels, 0)
    ce = -np.take_along_axis(logp, safe[..., None], -1)[..., 0]
    axes = tuple(range(1, labels.ndim))
    per_example = (ce * keep).sum(axes) / np.maximum(keep.sum(axes), 1)
    return float(per_example.mean())


def ignored_data(n=10):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, size=(n, 8, 8)).astype("int32")
    y[rng.uniform(size=y.shape) < 0.3] = 255
    y[0] = 255  # an example with no valid pixel counts 0
    return x, y


@pytest.mark.parametrize(
    "loss",
    [None, keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255)],
    ids=["default", "keras_ignore_class"],
)
def test_cross_entropy_with_ignored_pixels_equals_numpy(loss):
    """Two replicas, uneven last batch: the Trainer's training and evaluation losses, mIoU and
    pixel accuracy all exclude label 255 exactly like a numpy reference."""
    x, y = ignored_data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)  # 4, 4, 2
    strategy = mirrored()
    with strategy.scope():
        model = seg_model()
        sgd = keras.optimizers.SGD(0.0)
    trainer = Trainer(
        model, loss=loss, ignore_index=255, optimizer=sgd, strategy=strategy, progress=False
    )
    logits = model.predict(x, verbose=0)
    per_batch = [numpy_ce(y[i : i + 4], logits[i : i + 4], ignore_index=255) for i in (0, 4, 8)]
    history = trainer.fit(ds, epochs=1)
    assert history["loss"][0] == pytest.approx(np.mean(per_batch), rel=1e-5)
    result = trainer.evaluate(ds)
    assert result["loss"] == pytest.approx(numpy_ce(y, logits, ignore_index=255), rel=1e-5)
    # The reference differs when ignored pixels count: the test can tell.
    assert abs(numpy_ce(np.where(y == 255, 0, y), logits) - result["loss"]) > 1e-3
    miou, _ = confusion_matrix_iou(y, logits.argmax(-1), 3, ignore_index=255)
    assert result["mean_iou"] == pytest.approx(miou, abs=1e-6)
    keep = y != 255
    accuracy = (logits.argmax(-1) == y)[keep].mean()
    assert result["pixel_accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_ignore_index_disagreement_and_generic_losses():
    model = seg_model()
    with pytest.raises(ValueError, match="ignore_class"):
        SupervisedTask(
            model,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0),
            ignore_index=255,
        )
    # A loss that does not know the ignore index is averaged over the non-ignored pixels.
    x, y = ignored_data(4)

    def plain(y_true, y_pred):
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)

    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    result = Trainer(model, loss=plain, ignore_index=255, progress=False).evaluate(ds)
    want = numpy_ce(y, model.predict(x, verbose=0), ignore_index=255)
    assert result["loss"] == pytest.approx(want, rel=1e-5)


# -- supervised: logits convention -----------------------------------------------------------
def test_loss_must_agree_with_the_model_output():
    with pytest.raises(ValueError, match=r"from_logits=False\) but the model returns logits"):
        SupervisedTask(seg_model(), loss=SparseCrossEntropy(from_logits=False))
    with pytest.raises(ValueError, match=r"softmax.*twice"):
        SupervisedTask(
            seg_model("softmax"),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    with pytest.raises(ValueError, match="sigmoid"):
        SupervisedTask(seg_model("sigmoid"))
    # A softmax model gets from_logits=False by default: the loss is -log p.
    model = seg_model("softmax")
    x, y = ignored_data(4)
    y = np.where(y == 255, 1, y)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    with warnings.catch_warnings(record=True) as caught:
        # Keras quietly repairs from_logits=True on a Softmax op (with this warning) but not
        # behind other ops (a cast, a reshape): the default must not rely on it.
        warnings.simplefilter("always")
        result = Trainer(model, progress=False).evaluate(ds)
    assert not [w for w in caught if "from_logits" in str(w.message)]
    probs = model.predict(x, verbose=0)
    assert result["loss"] == pytest.approx(numpy_ce(y, probs, from_logits=False), rel=1e-5)


def test_resnet18_defaults_train_without_logits_warnings(caplog):
    """dlmodels' ResNet18 with default arguments through the Trainer: no Keras warning about
    from_logits / Softmax, and the reported loss is numpy's cross-entropy of the output, for
    whichever output (logits or softmax) ResNet's default gives."""
    import dlmodels.models
    from dlmodels.models.outputs import output_kind

    model = dlmodels.models.ResNet18(input_shape=(32, 32, 3), num_classes=3)
    kind = output_kind(model)
    assert kind in ("logits", "softmax")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 3, size=(4,)).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    trainer = Trainer(
        model, task="classification", optimizer=keras.optimizers.SGD(0.0), progress=False
    )
    train_output = np.asarray(model(x, training=True))  # batch statistics, as in the step
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = trainer.fit(ds, epochs=1)
        result = trainer.evaluate(ds)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "from_logits" in m or "Softmax" in m], messages
    from_logits = kind == "logits"
    want_train = numpy_ce(y, train_output, from_logits=from_logits)
    assert history["loss"][0] == pytest.approx(want_train, rel=1e-4)
    want_eval = numpy_ce(y, model.predict(x, verbose=0), from_logits=from_logits)
    assert result["loss"] == pytest.approx(want_eval, rel=1e-4)


def nested_softmax_model():
    """`outer = keras.Model(i, inner(i))`, the inner model ending in a softmax Dense."""
    i = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(i)
    inner = keras.Model(i, keras.layers.Dense(3, activation="softmax")(h))
    j = keras.Input((8, 8, 3))
    return keras.Model(j, inner(j))


def test_nested_softmax_model_is_not_given_a_second_softmax():
    """The default loss of a model whose softmax sits in a nested sub-model is -log p of its
    output (it used to be read as "unknown", then as logits: a silent double softmax)."""
    model = nested_softmax_model()
    x, y = ignored_data(4)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    result = Trainer(model, ignore_index=255, progress=False).evaluate(ds)
    probs = model.predict(x, verbose=0)
    want = numpy_ce(y, probs, from_logits=False, ignore_index=255)
    assert result["loss"] == pytest.approx(want, rel=1e-5)
    assert abs(numpy_ce(y, probs, from_logits=True, ignore_index=255) - want) > 1e-2
    with pytest.raises(ValueError, match="twice"):
        SupervisedTask(model, loss=SparseCrossEntropy(from_logits=True))


def unknown_model():
    inp = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(3, 1)(inp)
    b = keras.layers.Conv2D(3, 1)(inp)
    return keras.Model(inp, keras.layers.Add()([a, b]))


def test_unknown_output_kind_needs_an_explicit_loss():
    model = unknown_model()
    with pytest.raises(ValueError, match=r"output_kind='unknown'.*explicit loss"):
        SupervisedTask(model)
    with pytest.raises(ValueError, match="explicit loss"):
        Trainer(model, progress=False)
    # An explicit loss is taken at its word.
    x, y = ignored_data(4)
    y = np.where(y == 255, 0, y)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    trainer = Trainer(model, loss=SparseCrossEntropy(from_logits=True), progress=False)
    result = trainer.evaluate(ds)
    assert result["loss"] == pytest.approx(numpy_ce(y, model.predict(x, verbose=0)), rel=1e-5)


@pytest.mark.parametrize(
    "loss",
    [
        "sparse_categorical_crossentropy",
        "SparseCategoricalCrossentropy",
        keras.losses.sparse_categorical_crossentropy,
        "ce",
    ],
    ids=["name", "class_name", "function", "dlmodels_name"],
)
@pytest.mark.parametrize("activation", [None, "softmax"], ids=["logits", "softmax"])
def test_cross_entropy_by_name_follows_the_model_output(loss, activation):
    """A loss by name / as Keras' function has no from_logits of the caller's (Keras' default
    is False): it is built for what the model returns, so logits are never read as
    probabilities (nor probabilities given a second softmax); ignored pixels are excluded."""
    model = seg_model(activation)
    x, y = ignored_data(4)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    result = Trainer(model, loss=loss, ignore_index=255, progress=False).evaluate(ds)
    scores = model.predict(x, verbose=0)
    from_logits = activation is None
    want = numpy_ce(y, scores, from_logits=from_logits, ignore_index=255)
    assert result["loss"] == pytest.approx(want, rel=1e-5)
    wrong = numpy_ce(y, scores, from_logits=not from_logits, ignore_index=255)
    assert abs(wrong - want) > 1e-2  # the test can tell the two readings apart


def test_binary_cross_entropy_by_name_follows_the_model_output():
    inp = keras.Input((5,))
    h = keras.layers.Dense(4, activation="relu")(inp)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 5)).astype("float32")
    y = rng.integers(0, 2, size=(8, 1)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    for activation in (None, "sigmoid"):
        model = keras.Model(inp, keras.layers.Dense(1, activation=activation)(h))
        task = SupervisedTask(model, task="classification", loss="binary_crossentropy", metrics=[])
        result = Trainer(task, progress=False).evaluate(ds)
        out = model.predict(x, verbose=0)
        p = np.clip(1 / (1 + np.exp(-out)) if activation is None else out, 1e-7, 1 - 1e-7)
        want = float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))
        assert result["loss"] == pytest.approx(want, rel=1e-4), activation


def test_cross_entropy_by_name_is_refused_when_the_output_kind_is_unknown():
    for loss in ("sparse_categorical_crossentropy", keras.losses.categorical_crossentropy):
        with pytest.raises(ValueError, match=r"by name.*output_kind='unknown'.*from_logits"):
            SupervisedTask(unknown_model(), loss=loss)
    with pytest.raises(ValueError, match="sigmoid"):
        SupervisedTask(seg_model("sigmoid"), loss="sparse_categorical_crossentropy")
    # A loss that is not a cross-entropy keeps working by name.
    assert SupervisedTask(unknown_model(), loss="mse").loss is not None


def deep_supervision_model():
    """Two heads on one trunk: "logits_1" (listed first) and the main "logits"."""
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    aux = keras.layers.Conv2D(3, 1, name="logits_1")(x)
    main = keras.layers.Conv2D(3, 1, name="logits")(x)
    pooled = keras.layers.GlobalAveragePooling2D()(x)
    cls = keras.layers.Dense(2, activation="sigmoid", name="cgm")(pooled)
    return keras.Model(inp, [aux, main, cls])


@pytest.mark.parametrize("deep", ["auto", False])
def test_deep_supervision_and_presence_losses_and_the_main_output(deep):
    """The training loss is the mean over the per-pixel heads (or the main head only with
    deep_supervision=False) plus the presence output's binary cross-entropy; metrics and the
    evaluation loss read the output named "logits", not the first one."""
    x, y = ignored_data(8)
    y[1] = np.where(y[1] == 255, 255, 0)  # an example with background only: "absent"
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    model = deep_supervision_model()
    trainer = Trainer(
        model,
        ignore_index=255,
        optimizer=keras.optimizers.SGD(0.0),
        strategy=resolve_strategy("default"),
        progress=False,
        deep_supervision=deep,
    )
    aux, main, cgm = (np.asarray(o, np.float64) for o in model.predict(x, verbose=0))
    ce_aux = numpy_ce(y, aux, ignore_index=255)
    ce_main = numpy_ce(y, main, ignore_index=255)
    assert abs(ce_aux - ce_main) > 1e-3  # the heads differ, so the test can tell them apart
    present = np.array([np.any((m != 0) & (m != 255)) for m in y])
    assert present.tolist() == [False, False] + [True] * 6  # example 0 is all void
    target = np.stack([~present, present], -1).astype(np.float64)
    bce = -(target * np.log(cgm) + (1 - target) * np.log(1 - cgm)).mean()
    history = trainer.fit(ds, epochs=1)
    expected = ((ce_aux + ce_main) / 2 if deep == "auto" else ce_main) + bce
    assert history["loss"][0] == pytest.approx(expected, rel=1e-5)
    result = trainer.evaluate(ds)
    assert result["loss"] == pytest.approx(ce_main, rel=1e-5)
    miou, _ = confusion_matrix_iou(y, main.argmax(-1), 3, ignore_index=255)
    assert result["mean_iou"] == pytest.approx(miou, abs=1e-6)

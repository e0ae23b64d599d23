"""State Keras 3 keeps per replica: BatchNorm statistics (synchronised) and seeds (folded)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dlmodels.training import Trainer, fold_seeds_per_replica, resolve_strategy

SIZE = 16


def mirrored():
    return resolve_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])


def bn_model():
    """Conv -> BatchNorm -> ReLU -> 1x1 classifier: BN nested in a sub-model too, as in
    dlmodels' blocks."""
    inp = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inp)
    block = keras.Sequential([keras.layers.BatchNormalization(momentum=0.5)], name="block")
    x = keras.layers.ReLU()(block(x))
    return keras.Model(inp, keras.layers.Conv2D(3, 1)(x))


def data(n=16, seed=0):
    """Different statistics in each half of every batch of 8, so per-replica moments differ."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, SIZE, SIZE, 3)).astype("float32")
    x[np.arange(n) % 8 >= 4] = 3.0 * x[np.arange(n) % 8 >= 4] + 2.0
    y = rng.integers(0, 3, size=(n, SIZE, SIZE)).astype("int32")
    return x, y


def bn_layer(model):
    return next(
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
    )


def replica_values(strategy, variable):
    return [np.asarray(v) for v in strategy.experimental_local_results(variable.value)]


def train_pair(sync, checkpoint_dir=None):
    x, y = data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    keras.utils.set_random_seed(0)
    reference = bn_model()
    initial = reference.get_weights()
    Trainer(reference, optimizer=keras.optimizers.SGD(0.5), progress=False).fit(ds, epochs=1)
    strategy = mirrored()
    with strategy.scope():
        model = bn_model()
        model.set_weights(initial)
        sgd = keras.optimizers.SGD(0.5)
    trainer = Trainer(
        model,
        optimizer=sgd,
        strategy=strategy,
        sync_batch_norm=sync,
        checkpoint_dir=checkpoint_dir,
        progress=False,
    )
    trainer.fit(ds, epochs=1)
    return reference, model, strategy, trainer, ds


def test_sync_batch_norm_equals_one_device(tmp_path):
    """Two replicas with sync BN ("auto") on the same global batches: weights and moving
    statistics equal one device within 1e-5 on *both* replicas, evaluation equals one device,
    the checkpoint holds those statistics, and the BN config is unchanged."""
    reference, model, strategy, trainer, ds = train_pair("auto", tmp_path)
    assert trainer.sync_batch_norm
    for got, want in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    bn, ref_bn = bn_layer(model), bn_layer(reference)
    for name in ("moving_mean", "moving_variance"):
        want = np.asarray(getattr(ref_bn, name))
        assert np.abs(want - (0.0 if name == "moving_mean" else 1.0)).max() > 0.1  # it moved
        for value in replica_values(strategy, getattr(bn, name)):
            np.testing.assert_allclose(value, want, atol=1e-5)
    # Evaluation (moving statistics) on both replicas matches one device.
    ref_eval = Trainer(reference, progress=False).evaluate(ds)
    got_eval = trainer.evaluate(ds)
    assert abs(got_eval["loss"] - ref_eval["loss"]) < 1e-5
    # The checkpoint holds the statistics evaluation used.
    fresh = bn_model()
    tf.train.Checkpoint(model=fresh).restore(
        tf.train.latest_checkpoint(str(tmp_path))
    ).expect_partial()
    np.testing.assert_allclose(
        np.asarray(bn_layer(fresh).moving_mean), ref_bn.moving_mean, atol=1e-5
    )
    # The flag was only on while stepping.
    assert bn.synchronized is False and bn.get_config()["synchronized"] is False
    assert "_moments" not in vars(bn)  # the per-instance override is gone too


def test_without_sync_batch_norm_replicas_drift_apart():
    """The control: per-replica statistics differ (so the test above can fail)."""
    reference, model, strategy, _, _ = train_pair(False)
    first, second = replica_values(strategy, bn_layer(model).moving_mean)
    assert np.abs(first - second).max() > 0.1
    assert np.abs(first - np.asarray(bn_layer(reference).moving_mean)).max() > 0.1


def dropout_model():
    inp = keras.Input((64,))
    x = keras.layers.Dense(64, kernel_initializer="identity", bias_initializer="ones")(inp)
    return keras.Model(inp, keras.layers.Dropout(0.5, seed=7)(x))


def masks_per_replica(strategy, model):
    ones = tf.ones((2, 64))

    @tf.function
    def probe():
        return model(ones, training=True)

    return [np.asarray(v) != 0 for v in strategy.experimental_local_results(strategy.run(probe))]


def test_seed_folding_gives_each_replica_its_own_masks():
    """Keras replicates SeedGenerator states: without folding both replicas draw the same
    dropout mask; after the Trainer starts, the masks differ (and stay reproducible)."""
    strategy = mirrored()
    with strategy.scope():
        model = dropout_model()
    first, second = masks_per_replica(strategy, model)
    np.testing.assert_array_equal(first, second)  # the problem the fold fixes

    with strategy.scope():
        model = dropout_model()
    x = np.ones((8, 64), "float32")
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros((8,), "int32"))).batch(8)
    trainer = Trainer(model, task="classification", strategy=strategy, metrics=[], progress=False)
    state = next(v for v in model.variables if "seed_generator_state" in v.path)
    before = np.asarray(state)
    trainer.fit(ds, epochs=1)
    first, second = masks_per_replica(strategy, model)
    assert (first != second).mean() > 0.2
    # Replica 0 keeps the unfolded stream (what a checkpoint saves); replica 1 is offset.
    zero, one = replica_values(strategy, state)
    assert zero[0] == before[0] and one[0] != before[0]
    # One replica: folding changes nothing.
    assert fold_seeds_per_replica(tf.distribute.get_strategy(), [dropout_model()]) == 0


def test_stochastic_depth_masks_differ_across_replicas():
    from dlmodels.layers import ResidualBlock

    strategy = mirrored()
    with strategy.scope():
        inp = keras.Input((4, 4, 8))
        block = ResidualBlock(8, stochastic_depth_rate=0.5, norm=None, seed=3)
        model = keras.Model(inp, block(inp))
    x = tf.random.stateless_normal((16, 4, 4, 8), seed=[1, 2])

    def kept():
        @tf.function
        def probe():
            return model(x, training=True)

        outs = strategy.experimental_local_results(strategy.run(probe))
        # A dropped branch leaves the shortcut only: the output is then relu(x) exactly.
        return [np.any(np.asarray(o) != np.maximum(np.asarray(x), 0), axis=(1, 2, 3)) for o in outs]

    first, second = kept()
    np.testing.assert_array_equal(first, second)
    fold_seeds_per_replica(strategy, [model])
    first, second = kept()
    assert (first != second).any(), (first, second)


def test_synced_moments_equal_keras_synchronized_moments_and_gradients():
    """One all-reduce gives Keras' synchronized moments (three all-reduces) and their
    gradients, per replica, on different data per replica; in bfloat16 too; the global batch's
    moments with uneven (and empty) replica batches."""
    from keras.src.backend.tensorflow.nn import moments as keras_moments

    from dlmodels.training.replicas import synced_moments

    strategy = resolve_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 3, 5, 4, 6)).astype("float32") * [[[[[1.0]]]], [[[[3.0]]]]] + 1.0
    weights = tf.constant(rng.normal(size=(6,)).astype("float32"))

    def per_replica(fn, dtype):
        def step():
            rid = tf.distribute.get_replica_context().replica_id_in_sync_group
            x = tf.cast(tf.gather(tf.constant(data), rid), dtype)
            with tf.GradientTape() as tape:
                tape.watch(x)
                mean, var = fn(x)
                objective = tf.reduce_sum(tf.cast(mean * var, tf.float32) * weights)
            return tf.cast(mean, tf.float32), tf.cast(var, tf.float32), tape.gradient(objective, x)

        out = strategy.run(tf.function(step))
        return [[t.numpy() for t in strategy.experimental_local_results(o)] for o in out]

    for dtype, atol in ((tf.float32, 1e-5), (tf.bfloat16, 2e-2)):
        ours = per_replica(lambda x: synced_moments(x, [0, 1, 2]), dtype)
        theirs = per_replica(lambda x: keras_moments(x, [0, 1, 2], synchronized=True), dtype)
        for a, b in zip(ours, theirs, strict=True):
            for replica_a, replica_b in zip(a, b, strict=True):
                np.testing.assert_allclose(replica_a.astype("float32"), replica_b, atol=atol)
    # The moments are those of the global batch (both replicas' rows), equal on every replica.
    everything = data.reshape(-1, 6)
    ours = per_replica(lambda x: synced_moments(x, [0, 1, 2]), tf.float32)
    for mean, var in zip(ours[0], ours[1], strict=True):
        np.testing.assert_allclose(mean, everything.mean(0), atol=1e-5)
        np.testing.assert_allclose(var, everything.var(0), atol=1e-4)
    # Uneven replica batches (the last batch of an epoch split unevenly), one of them empty:
    # each replica's count weighs its mean and M2 (Chan et al.'s combination).
    for rows in ((1, 3), (0, 3)):

        def uneven(x, rows=rows):
            rid = tf.distribute.get_replica_context().replica_id_in_sync_group
            return synced_moments(x[: tf.gather(tf.constant(rows), rid)], [0, 1, 2])

        mean, var = per_replica(uneven, tf.float32)[:2]
        kept = np.concatenate([data[r, :n] for r, n in enumerate(rows)]).reshape(-1, 6)
        for m, v in zip(mean, var, strict=True):
            np.testing.assert_allclose(m, kept.mean(0), atol=1e-5)
            np.testing.assert_allclose(v, kept.var(0), atol=1e-4)
    # A large mean against a small spread: E[x^2] - E[x]^2 (Keras') cancels to 0 in float32;
    # per-replica two-pass moments combined keep the variance (as tf.nn.moments on one device).
    data = (1000.0 + 0.01 * rng.normal(size=(2, 3, 5, 4, 6))).astype("float32")
    want = data.reshape(-1, 6).astype("float64").var(0)
    ours = per_replica(lambda x: synced_moments(x, [0, 1, 2]), tf.float32)
    theirs = per_replica(lambda x: keras_moments(x, [0, 1, 2], synchronized=True), tf.float32)
    for var in ours[1]:
        np.testing.assert_allclose(var, want, rtol=0.02)
    assert np.abs(theirs[1][0] - want).max() > 0.5 * want.min()  # Keras' is far off here


def test_synchronized_batch_norm_restores_the_layers_on_error():
    from dlmodels.training import synchronized_batch_norm

    model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
    bn = model.layers[0]
    with pytest.raises(RuntimeError, match="inside"), synchronized_batch_norm([model]):
        assert bn.synchronized and "_moments" in vars(bn)
        raise RuntimeError("inside")
    assert bn.synchronized is False and "_moments" not in vars(bn)

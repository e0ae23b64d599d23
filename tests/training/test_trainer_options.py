"""Trainer options for training at scale: EMA of weights, global-norm clipping, several steps
per call, NaN stops, CSV / TensorBoard logs, each against an independent reference."""

import csv
import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from dlmodels.training import Trainer, resolve_strategy
from dlmodels.training.trainer import NonFiniteLossError

SIZE = 8


def tiny_model():
    inp = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    return keras.Model(inp, keras.layers.Conv2D(3, 1)(x))


def data(n=16, batch=4, nan_batch=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, SIZE, SIZE, 3)).astype("float32")
    y = rng.integers(0, 3, size=(n, SIZE, SIZE)).astype("int32")
    if nan_batch is not None:
        x[nan_batch * batch : (nan_batch + 1) * batch] = np.nan
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def mirrored():
    return resolve_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])


def build(strategy, initial, **kwargs):
    with strategy.scope():
        model = tiny_model()
        model.set_weights(initial)
        sgd = keras.optimizers.SGD(0.5)
    return model, Trainer(model, optimizer=sgd, strategy=strategy, progress=False, **kwargs)


def test_ema_equals_numpy_mean_teacher_on_both_replicas(tmp_path):
    """decay 0.6 over 3 steps: the ramp min(1 - 1/(t+1), 0.6) gives 0, 0.5 then 0.6, so both the
    ramp and the fixed decay are checked. Both replicas hold the numpy average; evaluate uses
    it and puts the raw weights back; a checkpoint restores it."""
    keras.utils.set_random_seed(0)
    initial = tiny_model().get_weights()
    strategy = mirrored()
    model, trainer = build(strategy, initial, ema_decay=0.6, checkpoint_dir=tmp_path)
    ds = data(n=8, batch=8)  # one step (4 + 4 rows per replica) per epoch
    after = []
    trainer.fit(ds, epochs=3, callbacks=[lambda e, logs: after.append(model.get_weights())])
    want = [w.copy() for w in initial]
    for t, weights in enumerate(after):
        d = min(1 - 1 / (t + 1), 0.6)
        want = [d * a + (1 - d) * w for a, w in zip(want, weights, strict=True)]
    assert np.abs(want[0] - after[-1][0]).max() > 1e-4  # the average is not the last weights
    for average, expected in zip(trainer.ema.averages, want, strict=True):
        for replica in strategy.experimental_local_results(average):
            np.testing.assert_allclose(np.asarray(replica), expected, atol=1e-6)
    raw = model.get_weights()
    got = trainer.evaluate(ds)["loss"]
    plain = Trainer(model, strategy=strategy, progress=False)
    model.set_weights(want)
    assert got == pytest.approx(plain.evaluate(ds)["loss"], rel=1e-5)
    model.set_weights(raw)
    assert trainer.evaluate(ds, use_ema=False)["loss"] == pytest.approx(
        plain.evaluate(ds)["loss"], rel=1e-5
    )
    for got_w, want_w in zip(model.get_weights(), raw, strict=True):
        np.testing.assert_array_equal(got_w, want_w)  # swapped back after evaluate

    keras.utils.set_random_seed(5)
    _, again = build(
        tf.distribute.get_strategy(),
        tiny_model().get_weights(),
        ema_decay=0.6,
        checkpoint_dir=tmp_path,
    )
    assert again.restore() == 3 and int(again.ema.updates.numpy()) == 3
    for average, expected in zip(again.ema.averages, want, strict=True):
        np.testing.assert_allclose(np.asarray(average), expected, atol=1e-6)
    again.ema.assign_to_variables()
    for got_w, want_w in zip(again.model.get_weights(), want, strict=True):
        np.testing.assert_allclose(got_w, want_w, atol=1e-6)


def test_clip_global_norm_on_the_summed_gradient_equals_numpy():
    """One SGD step with clip_global_norm=c on two replicas equals w0 - lr * g * c / |g|, with
    g the unclipped one-device gradient (read off an unclipped step)."""
    keras.utils.set_random_seed(0)
    initial = tiny_model().get_weights()
    ds = data(n=8, batch=8)
    free, trainer = build(tf.distribute.get_strategy(), initial)
    trainer.fit(ds)
    grads = [(w0 - w1) / 0.5 for w0, w1 in zip(initial, free.get_weights(), strict=True)]
    norm = np.sqrt(sum((g.astype("float64") ** 2).sum() for g in grads))
    clip = 0.05 * norm
    clipped, trainer = build(mirrored(), initial, clip_global_norm=float(clip))
    trainer.fit(ds)
    for got, w0, g in zip(clipped.get_weights(), initial, grads, strict=True):
        np.testing.assert_allclose(got, w0 - 0.5 * g * clip / norm, atol=1e-6)
    with pytest.raises(ValueError, match="clip_global_norm"):
        Trainer(tiny_model(), clip_global_norm=0)
    with pytest.raises(ValueError, match="already clips"):
        Trainer(tiny_model(), optimizer=keras.optimizers.SGD(clipnorm=1.0), clip_global_norm=1.0)


@pytest.mark.parametrize("replicas", [1, 2])
def test_steps_per_execution_equals_one_step_per_call(tmp_path, replicas):
    """3 steps per call over 4 batches per epoch and a checkpoint every 2 steps: the same
    weights, epoch losses and checkpoints as one step per call, in fewer calls."""
    keras.utils.set_random_seed(0)
    initial = tiny_model().get_weights()
    strategy = mirrored() if replicas == 2 else tf.distribute.get_strategy()
    runs = {}
    for spe in (1, 3):
        directory = str(tmp_path / f"spe{spe}")
        model, trainer = build(
            strategy,
            initial,
            steps_per_execution=spe,
            checkpoint_dir=directory,
            checkpoint_every=2,
            max_checkpoints=10,
        )
        calls = []
        if spe > 1:
            multi = trainer._build_multi_fn()

            def counting(iterator, n, multi=multi, calls=calls):
                calls.append(int(n))
                return multi(iterator, n)

            trainer._multi_fn = counting
        history = trainer.fit(data(), epochs=2)
        saved = sorted(int(p.split("-")[-1]) for p in trainer._manager.checkpoints)
        runs[spe] = (model.get_weights(), history["loss"], saved, calls)
    (w1, loss1, saved1, _), (w3, loss3, saved3, calls) = runs[1], runs[3]
    assert calls == [2, 2, 2, 2]  # chunks end on checkpoint steps (every 2)
    assert saved1 == saved3 == [2, 4, 6, 8]
    np.testing.assert_allclose(loss3, loss1, rtol=1e-6)
    for a, b in zip(w3, w1, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    _, trainer = build(strategy, initial, steps_per_execution=3)
    trainer._multi_fn = trainer._build_multi_fn()
    sizes = []
    original = trainer._multi_fn
    trainer._multi_fn = lambda it, n: sizes.append(int(n)) or original(it, n)
    trainer.fit(data(), epochs=1)
    assert sizes == [3, 1]  # 4 batches: 3 + 1


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    """Batch 3 of 4 is NaN, a checkpoint every step: training stops before saving step 3's
    weights with an error naming the step; the latest checkpoint is step 2's, finite."""
    keras.utils.set_random_seed(0)
    initial = tiny_model().get_weights()
    _, trainer = build(
        tf.distribute.get_strategy(),
        initial,
        checkpoint_dir=tmp_path,
        checkpoint_every=1,
        max_checkpoints=5,
    )
    with pytest.raises(NonFiniteLossError, match=r"step 3.*ckpt-2.*intact"):
        trainer.fit(data(nan_batch=2), epochs=1)
    latest = tf.train.latest_checkpoint(str(tmp_path))
    assert latest.endswith("ckpt-2")
    fresh = tiny_model()
    tf.train.Checkpoint(model=fresh).restore(latest).expect_partial()
    assert all(np.isfinite(w).all() for w in fresh.get_weights())
    assert any(np.abs(w - i).max() > 0 for w, i in zip(fresh.get_weights(), initial, strict=True))


def test_nan_step_is_skipped_under_loss_scaling():
    """The control: under mixed_float16 the NaN step is skipped (all replicas agree) and
    training goes on to finite weights; stop_on_nan does not fire."""
    keras.config.set_dtype_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    model = tiny_model()
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.1), strategy=None, progress=False)
    trainer.fit(data(nan_batch=2), epochs=1)
    keras.config.set_dtype_policy("float32")
    assert int(trainer.optimizer.iterations.numpy()) == 3  # 4 batches, one skipped
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_csv_and_tensorboard_logs(tmp_path):
    keras.utils.set_random_seed(0)
    _, trainer = build(tf.distribute.get_strategy(), tiny_model().get_weights(), log_dir=tmp_path)
    history = trainer.fit(data(), data(n=8), epochs=2)
    with open(tmp_path / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for key in ("loss", "val_loss", "mean_iou"):
        np.testing.assert_allclose([float(r[key]) for r in rows], history[key], rtol=1e-6)
    scalars = {}
    for path in glob.glob(os.path.join(tmp_path, "tensorboard", "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(
                    (event.step, float(tf.make_ndarray(value.tensor)))
                )
    assert [s for s, _ in scalars["loss"]] == [1, 2]
    np.testing.assert_allclose([v for _, v in scalars["loss"]], history["loss"], rtol=1e-6)
    # A second fit appends, keeping the header.
    trainer.fit(data(), data(n=8), epochs=3)
    with open(tmp_path / "history.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]


def test_option_errors():
    with pytest.raises(ValueError, match="ema_decay"):
        Trainer(tiny_model(), ema_decay=1.0)
    with pytest.raises(ValueError, match="steps_per_execution"):
        Trainer(tiny_model(), steps_per_execution=0)
    with pytest.raises(ValueError, match="auto_shard"):
        Trainer(tiny_model(), auto_shard="rows")

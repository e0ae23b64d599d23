"""Step-based checkpoints: save every N steps, resume mid-epoch, same result as no interruption."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from dlmodels.training import Trainer


def model_with_dropout():
    """Dropout makes the seed-generator state part of what a resume must restore."""
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    x = keras.layers.Dropout(0.3, seed=1)(x)
    return keras.Model(inp, keras.layers.Conv2D(3, 1)(x))


def dataset(repeat):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, size=(16, 8, 8)).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)  # 4 batches
    return ds.repeat() if repeat else ds


def make_trainer(initial, directory, **kwargs):
    model = model_with_dropout()
    model.set_weights(initial)
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)  # state to restore too
    return model, Trainer(
        model, optimizer=optimizer, checkpoint_dir=directory, progress=False, **kwargs
    )


def crash_after(directory, step):
    """Leave only the checkpoints up to `step`, as if the run had died right after it."""
    for name in os.listdir(directory):
        if name.startswith("ckpt-") and not name.startswith(f"ckpt-{step}."):
            os.remove(os.path.join(directory, name))
    with open(os.path.join(directory, "checkpoint"), "w") as f:
        f.write(
            f'model_checkpoint_path: "ckpt-{step}"\nall_model_checkpoint_paths: "ckpt-{step}"\n'
        )


@pytest.mark.parametrize("repeat", [False, True], ids=["finite", "repeated"])
def test_resume_mid_epoch_equals_uninterrupted_run(tmp_path, repeat):
    """3 epochs of 4 steps, a checkpoint every 3 steps. A run that dies after step 6 (epoch 2,
    step 2) and resumes ends with exactly the uninterrupted run's weights and optimizer state,
    having counted epochs and steps right."""
    keras.utils.set_random_seed(0)
    initial = model_with_dropout().get_weights()
    fit = {"epochs": 3, "steps_per_epoch": 4 if repeat else None}

    full_model, full = make_trainer(initial, None)
    full.fit(dataset(repeat), **fit)

    directory = str(tmp_path)
    _, first = make_trainer(initial, directory, checkpoint_every=3, max_checkpoints=10)
    first.fit(dataset(repeat), **fit)
    # Every 3 steps plus each epoch's end, numbered by step.
    saved = sorted(int(p.split("-")[-1]) for p in first._manager.checkpoints)
    assert saved == [3, 4, 6, 8, 9, 12]
    crash_after(directory, 6)

    model, resumed = make_trainer(model_with_dropout().get_weights(), directory, checkpoint_every=3)
    assert resumed.restore() == 1  # one complete epoch
    assert int(resumed.step.numpy()) == 6 and int(resumed.epoch_step.numpy()) == 2
    history = resumed.fit(dataset(repeat), **fit)
    assert history["epoch"] == [2, 3]
    assert int(resumed.step.numpy()) == 12 and int(resumed.optimizer.iterations.numpy()) == 12
    for got, want in zip(model.get_weights(), full_model.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(resumed.optimizer.variables, full.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert tf.train.latest_checkpoint(directory).endswith("ckpt-12")


def host_reads(monkeypatch):
    """Count every device-to-host read of an eager tensor: `.numpy()`, `float()`, `int()`,
    `bool()` and `np.asarray` all go through `_EagerTensorBase._numpy` (a variable's `.numpy()`
    reads a tensor too)."""
    from tensorflow.python.framework import ops

    count = [0]
    original = ops._EagerTensorBase._numpy

    def counting(self):
        count[0] += 1
        return original(self)

    monkeypatch.setattr(ops._EagerTensorBase, "_numpy", counting)
    return count


def test_host_reads_per_epoch_do_not_grow_with_steps(monkeypatch):
    """With progress off, a fit reads the device a fixed number of times per epoch (the epoch's
    summed logs, the metrics, the step counters), however many steps the epoch has: an epoch of
    8 steps reads exactly as often as one of 2. A per-step `float(loss)` would add 6 reads."""

    def reads(batches, epochs):
        keras.utils.set_random_seed(0)
        _, trainer = make_trainer(model_with_dropout().get_weights(), None)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(4 * batches, 8, 8, 3)).astype("float32")
        y = rng.integers(0, 3, size=(4 * batches, 8, 8)).astype("int32")
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
        count = host_reads(monkeypatch)
        history = trainer.fit(ds, epochs=epochs)
        monkeypatch.undo()
        assert int(trainer.step.numpy()) == batches * epochs
        assert np.isfinite(history["loss"]).all()
        return count[0]

    for epochs in (1, 2):
        two, eight = reads(2, epochs), reads(8, epochs)
        assert two > 0  # the counter sees the epoch-end reads
        assert eight == two, f"{epochs} epoch(s): {eight} host reads for 8 steps, {two} for 2"


@pytest.mark.parametrize("known_size", [True, False])
def test_epoch_loss_is_the_mean_of_the_step_losses(known_size):
    """The epoch's loss is the mean of the step losses, summed on the device, whether the
    batches are read inside the step function (known epoch size) or by the host (unknown)."""
    keras.utils.set_random_seed(0)
    _, trainer = make_trainer(model_with_dropout().get_weights(), None)
    seen = []
    ds = dataset(False)
    if known_size:
        original = trainer._build_multi_fn()

        def recording(iterator, n):
            logs = original(iterator, n)
            seen.append(logs["loss"])
            return logs

        trainer._multi_fn = recording
    else:
        ds = ds.filter(lambda *batch: True)  # cardinality unknown
        original = trainer._build_train_fn()

        def recording(batch):
            logs = original(batch)
            seen.append(logs["loss"])
            return logs

        trainer._train_fn = recording
    history = trainer.fit(ds, epochs=1)
    assert len(seen) == 4
    assert history["loss"][0] == pytest.approx(np.mean([float(v) for v in seen]), rel=1e-6)


def test_checkpoint_arguments_are_checked():
    with pytest.raises(ValueError, match="checkpoint_every"):
        Trainer(model_with_dropout(), checkpoint_every=0)
    with pytest.raises(ValueError, match="sync_batch_norm"):
        Trainer(model_with_dropout(), sync_batch_norm="always")

"""The distributed custom loop: learning, exact replica scaling, resume, evaluation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dlmodels.data import shapes
from dlmodels.metrics import confusion_matrix_iou
from dlmodels.training import Trainer, resolve_strategy

SIZE = 32


def tiny_model(num_classes=4, l2=None):
    """Two 3x3 convs and a 1x1 classifier: no BatchNorm, so replicas compute exactly alike."""
    reg = keras.regularizers.L2(l2) if l2 else None
    inp = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", kernel_regularizer=reg)(inp)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    return keras.Model(inp, keras.layers.Conv2D(num_classes, 1)(x))


def mirrored():
    return resolve_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])


def test_loss_decreases_on_shapes():
    train = shapes.dataset("train", batch_size=16, image_size=SIZE, num_samples=128)
    model = tiny_model()
    trainer = Trainer(model, optimizer=keras.optimizers.Adam(3e-3), progress=False)
    before = trainer.evaluate(train)["loss"]
    history = trainer.fit(train, epochs=4)  # 8 steps per epoch, 32 steps
    after = trainer.evaluate(train)["loss"]
    assert history["epoch"] == [1, 2, 3, 4]
    assert trainer.fit(train, epochs=5)["epoch"] == [5]  # `epochs` counts the total
    assert history["loss"][-1] < history["loss"][0]
    assert after < 0.75 * before, (before, after)
    assert set(history) >= {"loss", "mean_iou", "pixel_accuracy", "seconds"}


@pytest.mark.parametrize("l2", [None, 0.01])
def test_mirrored_step_equals_single_device_step(l2):
    """One SGD step on a global batch of 8 split 4 + 4 over two replicas must give the same
    weights as the step on one device: proves global-batch averaging and the 1/replicas
    scaling of regularisation losses."""
    images, masks = shapes.load("train", image_size=SIZE, num_samples=8)
    ds = tf.data.Dataset.from_tensor_slices((images, masks)).batch(8)
    keras.utils.set_random_seed(0)
    reference = tiny_model(l2=l2)
    initial = reference.get_weights()
    Trainer(reference, optimizer=keras.optimizers.SGD(0.5), progress=False).fit(ds)

    strategy = mirrored()
    with strategy.scope():
        model = tiny_model(l2=l2)
        model.set_weights(initial)
        sgd = keras.optimizers.SGD(0.5)
    Trainer(model, optimizer=sgd, strategy=strategy, progress=False).fit(ds)
    moved = max(np.abs(a - b).max() for a, b in zip(reference.get_weights(), initial, strict=True))
    assert moved > 1e-3  # the step did something
    for got, want in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("clip", ["clipnorm", "global_clipnorm", "clipvalue"])
def test_mirrored_gradient_clipping_equals_single_device(clip):
    """Keras clips each replica's partial gradient before the all-reduce; the Trainer clips the
    summed gradient, so two replicas take one device's clipped step."""
    images, masks = shapes.load("train", image_size=SIZE, num_samples=8)
    ds = tf.data.Dataset.from_tensor_slices((images, masks)).batch(8)
    keras.utils.set_random_seed(0)
    reference = tiny_model()
    initial = reference.get_weights()
    limit = {"clipnorm": 0.01, "global_clipnorm": 0.01, "clipvalue": 1e-4}[clip]
    sgd = keras.optimizers.SGD(0.5, **{clip: limit})
    Trainer(reference, optimizer=sgd, progress=False).fit(ds)
    strategy = mirrored()
    with strategy.scope():
        model = tiny_model()
        model.set_weights(initial)
        sgd = keras.optimizers.SGD(0.5, **{clip: limit})
    Trainer(model, optimizer=sgd, strategy=strategy, progress=False).fit(ds)
    for got, want in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-7)


def test_checkpoint_resume(tmp_path):
    train = shapes.dataset("train", batch_size=8, image_size=SIZE, num_samples=32)
    model = tiny_model()
    first = Trainer(model, checkpoint_dir=tmp_path, progress=False)
    history = first.fit(train, epochs=2)
    assert history["epoch"] == [1, 2]
    saved = model.get_weights()
    saved_iterations = int(first.optimizer.iterations.numpy())
    assert saved_iterations == 8

    keras.utils.set_random_seed(99)
    fresh = tiny_model()
    second = Trainer(fresh, checkpoint_dir=tmp_path, progress=False)
    assert second.restore() == 2
    for got, want in zip(fresh.get_weights(), saved, strict=True):
        np.testing.assert_array_equal(got, want)
    assert int(second.optimizer.iterations.numpy()) == saved_iterations
    resumed = second.fit(train, epochs=3)
    assert resumed["epoch"] == [3]  # only the remaining epoch ran
    assert int(second.optimizer.iterations.numpy()) == saved_iterations + 4
    # Numbered by step: 3 epochs of 4 steps.
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-12")
    assert second.fit(train, epochs=3) == {}  # nothing left to do


def test_evaluate_matches_numpy_under_mirrored_with_uneven_batches():
    strategy = mirrored()
    with strategy.scope():
        model = tiny_model()
    trainer = Trainer(model, strategy=strategy, progress=False)
    # 22 images in batches of 6: the last batch (4) and the split of 6 over 2 replicas.
    val = shapes.dataset("validation", batch_size=6, image_size=SIZE, num_samples=22)
    result = trainer.evaluate(val)
    images, masks = shapes.load("validation", image_size=SIZE, num_samples=22)
    logits = model.predict(images, verbose=0)
    miou, _ = confusion_matrix_iou(masks, logits.argmax(-1), 4)
    accuracy = (logits.argmax(-1) == masks).mean()
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(masks, logits)
    assert result["mean_iou"] == pytest.approx(miou, abs=1e-5)
    assert result["pixel_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert result["loss"] == pytest.approx(float(ce), rel=1e-5)


def _one_sgd_step(policy, initial, ds, strategy=None):
    keras.config.set_dtype_policy(policy)
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        model = tiny_model()
        model.set_weights(initial)
        sgd = keras.optimizers.SGD(0.5)
    trainer = Trainer(model, optimizer=sgd, strategy=strategy, progress=False)
    trainer.fit(ds, epochs=1)
    keras.config.set_dtype_policy("float32")
    return model, trainer


@pytest.mark.parametrize("replicas", [1, 2])
def test_mixed_precision_sgd_step_matches_float32(replicas):
    """One SGD step under mixed_float16 (loss scaled by 2**15, unscaled after the all-reduce)
    moves the weights like the float32 step within 2% of the step size: a missing unscale (a
    step 32768x too large), a double unscale or a wrong replica scaling cannot pass. SGD, not
    Adam, because Adam's update is invariant to the gradient's scale."""
    images, masks = shapes.load("train", image_size=SIZE, num_samples=8)
    ds = tf.data.Dataset.from_tensor_slices((images, masks)).batch(8)
    keras.utils.set_random_seed(0)
    initial = tiny_model().get_weights()
    reference, _ = _one_sgd_step("float32", initial, ds)
    strategy = mirrored() if replicas == 2 else None
    model, trainer = _one_sgd_step("mixed_float16", initial, ds, strategy)
    assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.compute_dtype == "float16"
    for got, want, start in zip(model.get_weights(), reference.get_weights(), initial, strict=True):
        step = np.abs(want - start).max()
        assert step > 1e-4
        assert np.abs(got - want).max() <= 0.02 * step, (np.abs(got - want).max(), step)


def test_mixed_precision_non_finite_on_one_replica_skips_on_all():
    """A NaN in replica 1's half of the batch only: every replica skips the step and halves the
    loss scale (Keras alone decides on replica 0's gradients and would apply NaN weights)."""
    images, masks = shapes.load("train", image_size=SIZE, num_samples=8)
    images[4:] = np.nan  # replica 1's rows
    ds = tf.data.Dataset.from_tensor_slices((images, masks)).batch(8)
    keras.utils.set_random_seed(0)
    initial = tiny_model().get_weights()
    model, trainer = _one_sgd_step("mixed_float16", initial, ds, mirrored())
    for got, want in zip(model.get_weights(), initial, strict=True):
        np.testing.assert_array_equal(got, want)
    scales = trainer.strategy.experimental_local_results(trainer.optimizer.dynamic_scale.value)
    assert [float(s) for s in scales] == [2.0**14, 2.0**14]
    assert int(trainer.optimizer.iterations.numpy()) == 0


def test_classification_task_and_custom_loss():
    from dlmodels.losses import DiceCrossEntropy

    inp = keras.Input((SIZE, SIZE, 3))
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(inp))
    model = keras.Model(inp, out)
    x = np.random.default_rng(0).uniform(size=(16, SIZE, SIZE, 3)).astype("float32")
    y = (x.mean((1, 2, 3)) * 3).astype("int32").clip(0, 2)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    trainer = Trainer(model, task="classification", loss=DiceCrossEntropy(), progress=False)
    history = trainer.fit(ds, ds, epochs=1)
    assert set(history) >= {"loss", "accuracy", "val_loss", "val_accuracy"}


def test_clear_errors():
    with pytest.raises(ValueError, match="task"):
        Trainer(tiny_model(), task="detection")
    model = tiny_model()  # built outside the mirrored scope
    with pytest.raises(ValueError, match=r"strategy\.scope\(\)"):
        Trainer(model, strategy=mirrored())
    strategy = mirrored()
    with strategy.scope():
        scoped = tiny_model()
    with pytest.raises(ValueError, match="optimizer was created outside"):
        Trainer(scoped, strategy=strategy, optimizer=keras.optimizers.SGD())
    trainer = Trainer(tiny_model(), progress=False)
    repeated = shapes.dataset("train", batch_size=4, image_size=SIZE, num_samples=4)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        trainer.fit(repeated, steps_per_epoch=3)


def _free_ports(n):
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_two_processes_match_single_device(tmp_path):
    """Two worker processes under MultiWorkerMirroredStrategy (TF_CONFIG on localhost), a model
    with BatchNorm: both end with one process's weights and moving statistics (synchronised
    BN across workers), evaluate alike, the chief's checkpoint holds those statistics, and
    only the chief's checkpoints land in the shared directory."""
    import json
    import os
    import subprocess
    import sys

    from tests.training.mwms_worker import bn_model, datasets

    keras.utils.set_random_seed(0)
    reference = bn_model()
    initial = reference.get_weights()
    train, val = datasets()
    ref_trainer = Trainer(reference, optimizer=keras.optimizers.SGD(0.5), progress=False)
    ref_trainer.fit(train, epochs=2)
    ref_val = ref_trainer.evaluate(val)["loss"]

    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    script = os.path.join(os.path.dirname(__file__), "mwms_worker.py")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("TF_CONFIG", None)
    procs, outs = [], []
    for index in range(2):
        out = str(tmp_path / f"worker{index}.npz")
        np.savez(out.replace(".npz", "_init.npz"), **{f"w{i}": w for i, w in enumerate(initial)})
        config = json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, script, config, out, str(tmp_path / "ckpt"), "init"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
        outs.append(out)
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-3000:]
    results = [np.load(out) for out in outs]
    n = len(initial)
    for i, want in enumerate(reference.get_weights()):
        np.testing.assert_array_equal(results[0][f"arr_{i}"], results[1][f"arr_{i}"])
        np.testing.assert_allclose(results[0][f"arr_{i}"], want, atol=1e-5)
    assert n == len([k for k in results[0].files if k.startswith("arr_")])
    ref_bn = reference.get_layer("bn")
    assert np.abs(np.asarray(ref_bn.moving_mean)).max() > 0.01  # the statistics moved
    for result in results:
        np.testing.assert_allclose(result["moving_mean"], ref_bn.moving_mean, atol=1e-5)
        np.testing.assert_allclose(result["moving_variance"], ref_bn.moving_variance, atol=1e-5)
        assert float(result["val_loss"]) == pytest.approx(ref_val, abs=1e-5)
    restored = bn_model()
    latest = tf.train.latest_checkpoint(str(tmp_path / "ckpt"))
    tf.train.Checkpoint(model=restored).restore(latest).expect_partial()
    bn = restored.get_layer("bn")
    np.testing.assert_allclose(np.asarray(bn.moving_mean), ref_bn.moving_mean, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.moving_variance), ref_bn.moving_variance, atol=1e-5)
    # Numbered by step: 2 epochs of 2 steps.
    assert tf.train.latest_checkpoint(str(tmp_path / "ckpt")).endswith("ckpt-4")
    # max_checkpoints=1: the chief swept ckpt-2; the other worker wrote only to a temp dir.
    assert not list((tmp_path / "ckpt").glob("ckpt-2*"))


def test_one_device_strategy():
    strategy = resolve_strategy("one_device", devices=["/cpu:1"])
    with strategy.scope():
        model = tiny_model()
    train = shapes.dataset("train", batch_size=4, image_size=SIZE, num_samples=8)
    history = Trainer(model, strategy=strategy, progress=False).fit(train, train, epochs=1)
    assert np.isfinite(history["loss"][0]) and 0 <= history["val_mean_iou"][0] <= 1


def test_iterators_are_released_off_the_training_thread(monkeypatch):
    """Deleting a tf.data iterator waits for its pipeline threads (seconds, sometimes): fit and
    evaluate hand every iterator they made to `_release_in_background` as its only reference,
    one per epoch for a finite dataset, one per call with steps_per_epoch, one per evaluation."""
    import sys

    from dlmodels.training import trainer as trainer_module

    handed = []

    def record(box):
        (iterator,) = box
        # Only `box`, this frame's local and getrefcount's argument hold it: nothing in fit.
        handed.append((type(iterator).__name__, sys.getrefcount(iterator)))
        box.clear()

    monkeypatch.setattr(trainer_module, "_release_in_background", record)
    train = shapes.dataset("train", batch_size=8, image_size=SIZE, num_samples=16)
    trainer = Trainer(tiny_model(), optimizer=keras.optimizers.SGD(0.1), progress=False)
    trainer.fit(train, val_ds=train, epochs=2)  # 2 epochs, each with an evaluation
    assert len(handed) == 4 and all(refs == 3 for _, refs in handed), handed
    handed.clear()
    trainer.fit(train.repeat(), epochs=4, steps_per_epoch=2)  # one iterator across epochs
    assert len(handed) == 1 and handed[0][1] == 3, handed
    handed.clear()
    trainer.evaluate(train, steps=1)  # stopping early releases it too
    assert len(handed) == 1 and handed[0][1] == 3, handed


def test_release_in_background_drops_the_iterator_on_another_thread():
    import threading
    import weakref

    from dlmodels.training.trainer import _release_in_background

    seen = []

    class Probe:
        def __del__(self):
            seen.append(threading.current_thread().name)

    box = [Probe()]
    ref = weakref.ref(box[0])
    _release_in_background(box)
    for thread in threading.enumerate():
        if thread.name == "dlmodels-release-iterator":
            thread.join(10)
    assert ref() is None and seen == ["dlmodels-release-iterator"]

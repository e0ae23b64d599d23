"""Precision choice (`resolve_precision`, `precision_scope`) and the Trainer under
mixed_bfloat16 on CPU, against a GradientTape step in the same policy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dlmodels.data import shapes
from dlmodels.training import (
    Precision,
    Trainer,
    precision_scope,
    resolve_precision,
    resolve_strategy,
)

SIZE = 16


def bn_model():
    """Conv, BatchNorm (state), ReLU and a 1x1 classifier with float32 logits."""
    inp = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(4, 1)(x)
    return keras.Model(inp, keras.layers.Activation("linear", dtype="float32")(x))


def test_explicit_choices_pass_through_and_bad_ones_are_refused():
    for name in ("float32", "mixed_float16", "mixed_bfloat16"):
        assert resolve_precision(name) == Precision(name, "asked for")
    with pytest.raises(ValueError, match=r"`precision`='fp16'; choose from auto, float32"):
        resolve_precision("fp16")


def test_auto_on_cpu_follows_the_bfloat16_flags():
    cpu = resolve_strategy("one_device", devices=["/cpu:0"])
    got = resolve_precision("auto", cpu, flags={"avx2", "avx512_bf16"})
    assert got.policy == "mixed_bfloat16" and "avx512_bf16" in got.reason
    assert got.compute_dtype == "bfloat16"
    assert resolve_precision("auto", cpu, flags={"amx_bf16"}).policy == "mixed_bfloat16"
    plain = resolve_precision("auto", cpu, flags={"avx2", "avx512f"})
    assert (plain.policy, plain.compute_dtype) == ("float32", "float32")


def _fake_gpus(monkeypatch, capabilities, virtual=None):
    """Visible GPUs with the given compute capabilities (no GPU here): TensorFlow's device
    queries faked, the device matching of `resolve_precision` run for real."""
    gpus = [tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU") for i in range(12)]
    gpus = gpus[: len(capabilities)]
    details = dict(zip([g.name for g in gpus], capabilities, strict=True))
    monkeypatch.setattr(tf.config, "get_visible_devices", lambda kind=None: list(gpus))
    monkeypatch.setattr(
        tf.config, "get_logical_device_configuration", lambda gpu: (virtual or {}).get(gpu.name)
    )
    monkeypatch.setattr(
        tf.config.experimental,
        "get_device_details",
        lambda gpu: {"compute_capability": details[gpu.name]} if details[gpu.name] else {},
    )


class _Strategy:
    """A stand-in for a GPU strategy: only `extended.worker_devices` is read."""

    def __init__(self, *indices):
        names = [f"/job:localhost/replica:0/task:0/device:GPU:{i}" for i in indices]
        self.extended = type("Extended", (), {"worker_devices": names})()


def test_auto_on_gpus_needs_tensor_cores(monkeypatch):
    """float16 needs compute capability >= 7.0 on every GPU the strategy uses; GPU:1 is GPU 1,
    not GPU 11; virtual GPUs map to their physical GPU; a CPU strategy ignores the GPUs."""
    caps = [(8, 0)] + [(6, 1)] * 10 + [(8, 6)]
    _fake_gpus(monkeypatch, caps)
    got = resolve_precision("auto", flags=set())  # the whole machine: one old GPU among them
    assert got.policy == "float32" and "(6, 1)" in got.reason
    assert resolve_precision("auto", _Strategy(0, 11), flags=set()).policy == "mixed_float16"
    assert resolve_precision("auto", _Strategy(1), flags=set()).policy == "float32"
    got = resolve_precision("auto", _Strategy(11), flags=set())
    assert got.policy == "mixed_float16" and got.reason.endswith("8.6 (tensor cores)")
    # A GPU the strategy names but the machine lacks: float32, never the CPU's bf16 flags.
    got = resolve_precision("auto", _Strategy(12), flags={"avx512_bf16"})
    assert got.policy == "float32" and "not found" in got.reason
    # Unknown capability: float32.
    _fake_gpus(monkeypatch, [(8, 0), None])
    assert resolve_precision("auto", _Strategy(1), flags=set()).policy == "float32"
    # GPU 0 split into 2 virtual GPUs: logical GPU:2 is physical GPU 1.
    _fake_gpus(monkeypatch, [(8, 0), (6, 0)], virtual={"/physical_device:GPU:0": [1, 2]})
    assert resolve_precision("auto", _Strategy(0, 1), flags=set()).policy == "mixed_float16"
    assert resolve_precision("auto", _Strategy(2), flags=set()).policy == "float32"
    cpu = resolve_strategy("one_device", devices=["/cpu:0"])
    assert resolve_precision("auto", cpu, flags=set()).policy == "float32"


def test_precision_scope_sets_and_restores_the_policy():
    with precision_scope(Precision("mixed_bfloat16", "test")) as name:
        assert name == "mixed_bfloat16"
        layer = keras.layers.Dense(2)
        assert (layer.compute_dtype, layer.variable_dtype) == ("bfloat16", "float32")
    assert keras.config.dtype_policy().name == "float32"
    with pytest.raises(RuntimeError), precision_scope("mixed_float16"):
        raise RuntimeError("inside")
    assert keras.config.dtype_policy().name == "float32"
    with pytest.raises(ValueError, match="pass a policy name"), precision_scope("auto"):
        pass


def _ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _trainer(model, **kwargs):
    return Trainer(model, optimizer=keras.optimizers.SGD(0.5), loss=_ce(), progress=False, **kwargs)


@tf.function
def _one_step(model, images, masks, lr):
    """The reference: one SGD step by hand, loss in float32 from the model's logits. In a
    tf.function like the Trainer's step: eagerly, TF 2.21's CPU bias gradient in bfloat16
    sums 2048 values in bfloat16 and comes out 5.8x too small here (0.0625 for 0.361)."""
    loss_fn = _ce()
    with tf.GradientTape() as tape:
        loss = loss_fn(masks, model(images, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    for v, g in zip(model.trainable_variables, grads, strict=True):
        v.assign(v - lr * tf.cast(g, v.dtype))


def test_trainer_step_under_mixed_bfloat16_equals_a_tape_step():
    """bfloat16 compute, float32 variables, no loss scaling: the Trainer's step equals the
    plain GradientTape step in the same policy, BatchNorm statistics included; and it differs
    from the float32 step by bfloat16 rounding only."""
    images, masks = shapes.load("train", image_size=SIZE, num_samples=8)
    ds = tf.data.Dataset.from_tensor_slices((images, masks)).batch(8)
    keras.utils.set_random_seed(0)
    with precision_scope("mixed_bfloat16"):
        model = bn_model()
        reference = bn_model()
    initial = model.get_weights()
    reference.set_weights(initial)
    assert model.layers[1].compute_dtype == "bfloat16"
    trainer = _trainer(model)
    assert not isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
    trainer.fit(ds)
    _one_step(reference, tf.constant(images), tf.constant(masks), 0.5)
    assert all(w.dtype == "float32" for w in model.weights)
    moved = max(np.abs(a - b).max() for a, b in zip(model.get_weights(), initial, strict=True))
    assert moved > 1e-2
    for got, want in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
    keras.utils.set_random_seed(0)
    fp32 = bn_model()
    fp32.set_weights(initial)
    _trainer(fp32).fit(ds)
    gaps = [
        np.abs(a - b).max() for a, b in zip(model.get_weights(), fp32.get_weights(), strict=True)
    ]
    assert 0 < max(gaps) < 0.01 * moved, gaps


def test_mirrored_mixed_bfloat16_equals_one_device():
    """Two replicas in bfloat16 (synchronised BatchNorm, float32 all-reduce) take the one-device
    bfloat16 step, to bfloat16 rounding."""
    images, masks = shapes.load("train", image_size=SIZE, num_samples=8)
    ds = tf.data.Dataset.from_tensor_slices((images, masks)).batch(8)
    keras.utils.set_random_seed(0)
    with precision_scope("mixed_bfloat16"):
        single = bn_model()
    initial = single.get_weights()
    _trainer(single).fit(ds)
    strategy = resolve_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
    with strategy.scope(), precision_scope("mixed_bfloat16"):
        model = bn_model()
        model.set_weights(initial)
        trainer = _trainer(model, strategy=strategy)
    trainer.fit(ds)
    for got, want in zip(model.get_weights(), single.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-3)

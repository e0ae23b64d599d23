"""Warmup + cosine / step decay and the linear scaling rule against their closed forms."""

import math

import keras
import numpy as np
import pytest

from dlmodels.training.schedules import (
    WarmupCosineDecay,
    WarmupStepDecay,
    goyal_schedule,
    scaled_learning_rate,
)


def cosine_reference(t, peak, total, warmup, alpha, start):
    """Goyal et al.'s linear warmup, then SGDR's half cosine, written out in plain Python."""
    if t < warmup:
        return start + (peak - start) * t / warmup
    progress = min(t - warmup, total - warmup) / (total - warmup)
    floor = alpha * peak
    return floor + (peak - floor) * (1 + math.cos(math.pi * progress)) / 2


def values(schedule, steps):
    return np.array([float(schedule(s)) for s in steps])


def test_linear_scaling_rule():
    assert scaled_learning_rate(0.1, 8192, 256) == pytest.approx(3.2)  # Goyal et al., k = 32
    assert scaled_learning_rate(0.1, 16) == pytest.approx(0.00625)
    with pytest.raises(ValueError, match="global_batch_size"):
        scaled_learning_rate(0.1, 0)
    with pytest.raises(ValueError, match="base_lr"):
        scaled_learning_rate(-0.1, 16)


def test_warmup_cosine_equals_the_closed_form():
    schedule = WarmupCosineDecay(
        0.4, total_steps=100, warmup_steps=10, alpha=0.1, warmup_start_lr=0.05
    )
    steps = list(range(0, 121))
    want = [cosine_reference(t, 0.4, 100, 10, 0.1, 0.05) for t in steps]
    np.testing.assert_allclose(values(schedule, steps), want, rtol=1e-6, atol=1e-7)
    assert float(schedule(0)) == pytest.approx(0.05)
    assert float(schedule(10)) == pytest.approx(0.4)  # the peak right after warmup
    assert float(schedule(55)) == pytest.approx(0.04 + 0.36 * 0.5, rel=1e-6)  # half way down
    assert float(schedule(500)) == pytest.approx(0.04)  # stays at the floor
    no_warmup = WarmupCosineDecay(1.0, total_steps=4)
    np.testing.assert_allclose(
        values(no_warmup, range(5)), [1, 0.853553, 0.5, 0.146447, 0], atol=1e-6
    )


def test_warmup_step_decay_equals_the_closed_form():
    schedule = WarmupStepDecay(0.8, boundaries=[20, 40], decay_rate=0.1, warmup_steps=8)
    got = values(schedule, range(50))
    want = [0.8 * t / 8 if t < 8 else 0.8 * 0.1 ** ((t >= 20) + (t >= 40)) for t in range(50)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_goyal_recipe():
    """ImageNet in the paper: 0.1 per 256 images, global batch 8192 -> 3.2, warmup from 0.1 over
    5 epochs, / 10 at epochs 30, 60, 80."""
    schedule = goyal_schedule(0.1, 8192, steps_per_epoch=156)
    assert float(schedule(0)) == pytest.approx(0.1)
    assert float(schedule(5 * 156 // 2)) == pytest.approx(0.1 + 3.1 / 2, rel=1e-5)
    assert float(schedule(5 * 156)) == pytest.approx(3.2)
    assert float(schedule(30 * 156 - 1)) == pytest.approx(3.2)
    assert float(schedule(30 * 156)) == pytest.approx(0.32)
    assert float(schedule(80 * 156)) == pytest.approx(3.2e-3)


def test_optimizer_follows_the_schedule_and_serializes():
    schedule = WarmupCosineDecay(0.5, total_steps=10, warmup_steps=4)
    sgd = keras.optimizers.SGD(schedule)
    w = keras.Variable(np.zeros(3, "float32"))
    sgd.build([w])
    moved = []
    for _ in range(6):
        before = np.asarray(w).copy()
        sgd.apply_gradients([(keras.ops.ones(3), w)])
        moved.append(float(before[0] - np.asarray(w)[0]))
    # Step t moves by lr(t) * grad: the schedule read at iterations 0..5.
    np.testing.assert_allclose(
        moved, [cosine_reference(t, 0.5, 10, 4, 0, 0) for t in range(6)], atol=1e-6
    )
    for sched in (schedule, WarmupStepDecay(0.1, [5, 9], warmup_steps=2, warmup_start_lr=0.01)):
        clone = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(sched))
        assert type(clone) is type(sched) and clone.get_config() == sched.get_config()
        np.testing.assert_allclose(values(clone, range(12)), values(sched, range(12)))
    restored = keras.optimizers.SGD.from_config(sgd.get_config())
    assert isinstance(restored.learning_rate, WarmupCosineDecay) or isinstance(
        restored._learning_rate, WarmupCosineDecay
    )


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: WarmupCosineDecay(0.1, total_steps=10, warmup_steps=10), "warmup_steps"),
        (lambda: WarmupCosineDecay(0.0, total_steps=10), "peak_lr"),
        (lambda: WarmupCosineDecay(0.1, total_steps=10, alpha=2.0), "alpha"),
        (lambda: WarmupStepDecay(0.1, boundaries=[5, 3]), "boundaries"),
        (lambda: WarmupStepDecay(0.1, boundaries=[2], warmup_steps=4), "boundaries"),
        (lambda: WarmupStepDecay(0.1, boundaries=[5], decay_rate=1.5), "decay_rate"),
    ],
)
def test_bad_arguments_name_the_argument(make, fragment):
    with pytest.raises(ValueError, match=fragment):
        make()

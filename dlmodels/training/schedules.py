"""Learning-rate schedules for large-batch distributed training (Goyal et al. 2017).

Goyal, Dollar, Girshick et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1
Hour": when the global batch grows k times, multiply the learning rate by k (the *linear
scaling rule*, `scaled_learning_rate`), and reach that rate by a *gradual warmup* that raises the
rate linearly over the first epochs, because the scaled rate is too large for the untrained
network. After warmup the paper divides the rate by 10 at fixed epochs (`WarmupStepDecay`);
a cosine decay to a floor (Loshchilov & Hutter 2017, "SGDR") is the common alternative
(`WarmupCosineDecay`).

Both are `keras.optimizers.schedules.LearningRateSchedule`s: pass them as an optimizer's
`learning_rate`. They read the optimizer's `iterations` (0 at the first update), are saved with
the optimizer (`get_config`), and, being a function of the step alone, resume exactly from a
checkpoint.
"""

from __future__ import annotations

import itertools
import math

import keras
from keras import ops

from dlmodels._validation import check_positive_int
from dlmodels.errors import UserError


def _check_rate(name, value, owner, *, allow_zero=False):
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise UserError(f"{owner}: `{name}`={value!r} must be a finite number {bound}, e.g. 0.1.")
    return float(value)


def _check_steps(name, value, owner):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{owner}: `{name}`={value!r} must be an int >= 0 (a number of steps).")
    return int(value)


def scaled_learning_rate(base_lr, global_batch_size, base_batch_size=256) -> float:
    """The linear scaling rule: `base_lr * global_batch_size / base_batch_size`.

    Args:
        base_lr: the rate tuned for `base_batch_size` (Goyal et al.: 0.1 for 256 on ImageNet).
        global_batch_size: the batch summed over all replicas and workers.
        base_batch_size: the batch `base_lr` was tuned for.

    Returns:
        The learning rate for `global_batch_size`, a float.
    """
    owner = "scaled_learning_rate"
    base_lr = _check_rate("base_lr", base_lr, owner)
    global_batch_size = check_positive_int("global_batch_size", global_batch_size, owner=owner)
    base_batch_size = check_positive_int("base_batch_size", base_batch_size, owner=owner)
    return base_lr * global_batch_size / base_batch_size


def _warmup(step, peak_lr, warmup_steps, warmup_start_lr):
    """Linear from `warmup_start_lr` at step 0 to `peak_lr` at step `warmup_steps`."""
    if warmup_steps == 0:
        return ops.convert_to_tensor(peak_lr, "float32")
    fraction = ops.minimum(step / float(warmup_steps), 1.0)
    return warmup_start_lr + (peak_lr - warmup_start_lr) * fraction


@keras.saving.register_keras_serializable(package="dlmodels")
class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak_lr`, then a half cosine down to `alpha * peak_lr`.

    For step t (the optimizer's `iterations`), W = `warmup_steps`, T = `total_steps`:

        t < W:  lr = s + (peak - s) * t / W                       (s = warmup_start_lr)
        t >= W: lr = floor + (peak - floor) * (1 + cos(pi * min(t - W, T - W) / (T - W))) / 2

    with floor = `alpha * peak_lr`; after T steps the rate stays at the floor.

    Args:
        peak_lr: the rate reached after warmup (e.g. `scaled_learning_rate(...)`).
        total_steps: steps of the whole run, warmup included (> `warmup_steps`).
        warmup_steps: steps of linear warmup (0: none).
        alpha: the final rate as a fraction of `peak_lr`, in [0, 1].
        warmup_start_lr: the rate at step 0 (Goyal et al. start from the unscaled rate).
        name: the schedule's name.

    References:
        Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour";
        Loshchilov & Hutter 2017, "SGDR: Stochastic Gradient Descent with Warm Restarts".
    """

    def __init__(
        self,
        peak_lr,
        total_steps,
        warmup_steps=0,
        alpha=0.0,
        warmup_start_lr=0.0,
        name="warmup_cosine_decay",
    ):
        super().__init__()
        owner = "WarmupCosineDecay"
        self.peak_lr = _check_rate("peak_lr", peak_lr, owner)
        self.total_steps = check_positive_int("total_steps", total_steps, owner=owner)
        self.warmup_steps = _check_steps("warmup_steps", warmup_steps, owner)
        if self.warmup_steps >= self.total_steps:
            raise UserError(
                f"{owner}: `warmup_steps`={warmup_steps!r} must be smaller than "
                f"`total_steps`={total_steps!r}, so that some steps decay."
            )
        self.alpha = _check_rate("alpha", alpha, owner, allow_zero=True)
        if self.alpha > 1:
            raise UserError(f"{owner}: `alpha`={alpha!r} must lie in [0, 1] (a fraction).")
        self.warmup_start_lr = _check_rate(
            "warmup_start_lr", warmup_start_lr, owner, allow_zero=True
        )
        self.name = name

    def __call__(self, step):
        step = ops.cast(step, "float32")
        decay_steps = float(self.total_steps - self.warmup_steps)
        progress = ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        floor = self.alpha * self.peak_lr
        cosine = floor + (self.peak_lr - floor) * 0.5 * (1.0 + ops.cos(math.pi * progress))
        warm = _warmup(step, self.peak_lr, self.warmup_steps, self.warmup_start_lr)
        return ops.where(step < self.warmup_steps, warm, cosine)

    def get_config(self):
        return {
            "peak_lr": self.peak_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "alpha": self.alpha,
            "warmup_start_lr": self.warmup_start_lr,
            "name": self.name,
        }


@keras.saving.register_keras_serializable(package="dlmodels")
class WarmupStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak_lr`, then multiply by `decay_rate` at each boundary.

    For step t, W = `warmup_steps`: t < W gives the linear warmup of `WarmupCosineDecay`;
    t >= W gives `peak_lr * decay_rate ** n` with n the number of `boundaries` <= t. Goyal et al.
    (ImageNet, 90 epochs): 5 warmup epochs, decay 0.1 at epochs 30, 60 and 80.

    Args:
        peak_lr: the rate reached after warmup.
        boundaries: increasing steps (each >= `warmup_steps`) at which the rate is multiplied.
        decay_rate: the factor at each boundary, in (0, 1].
        warmup_steps: steps of linear warmup (0: none).
        warmup_start_lr: the rate at step 0.
        name: the schedule's name.

    References:
        Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour".
    """

    def __init__(
        self,
        peak_lr,
        boundaries,
        decay_rate=0.1,
        warmup_steps=0,
        warmup_start_lr=0.0,
        name="warmup_step_decay",
    ):
        super().__init__()
        owner = "WarmupStepDecay"
        self.peak_lr = _check_rate("peak_lr", peak_lr, owner)
        self.warmup_steps = _check_steps("warmup_steps", warmup_steps, owner)
        try:
            bounds = [_check_steps("boundaries", b, owner) for b in boundaries]
        except TypeError as err:
            raise UserError(
                f"{owner}: `boundaries`={boundaries!r} must be a list of step numbers."
            ) from err
        if any(b <= a for a, b in itertools.pairwise(bounds)) or (
            bounds and bounds[0] < self.warmup_steps
        ):
            raise UserError(
                f"{owner}: `boundaries`={boundaries!r} must be strictly increasing and not "
                f"before `warmup_steps`={warmup_steps!r}, e.g. [30_000, 60_000, 80_000]."
            )
        self.boundaries = bounds
        self.decay_rate = _check_rate("decay_rate", decay_rate, owner)
        if self.decay_rate > 1:
            raise UserError(f"{owner}: `decay_rate`={decay_rate!r} must lie in (0, 1].")
        self.warmup_start_lr = _check_rate(
            "warmup_start_lr", warmup_start_lr, owner, allow_zero=True
        )
        self.name = name

    def __call__(self, step):
        step = ops.cast(step, "float32")
        lr = ops.convert_to_tensor(self.peak_lr, "float32")
        for boundary in self.boundaries:
            lr = ops.where(step >= boundary, lr * self.decay_rate, lr)
        warm = _warmup(step, self.peak_lr, self.warmup_steps, self.warmup_start_lr)
        return ops.where(step < self.warmup_steps, warm, lr)

    def get_config(self):
        return {
            "peak_lr": self.peak_lr,
            "boundaries": list(self.boundaries),
            "decay_rate": self.decay_rate,
            "warmup_steps": self.warmup_steps,
            "warmup_start_lr": self.warmup_start_lr,
            "name": self.name,
        }


def goyal_schedule(
    base_lr,
    global_batch_size,
    steps_per_epoch,
    *,
    base_batch_size=256,
    warmup_epochs=5,
    decay_epochs=(30, 60, 80),
    decay_rate=0.1,
) -> WarmupStepDecay:
    """The recipe of Goyal et al. 2017: the linearly scaled rate, reached by a warmup from
    `base_lr` over `warmup_epochs`, divided by 10 at `decay_epochs`.

    Args:
        base_lr: the rate for `base_batch_size` (0.1 for 256 in the paper).
        global_batch_size: the batch over all replicas.
        steps_per_epoch: optimizer steps per epoch at `global_batch_size`.
        base_batch_size, warmup_epochs, decay_epochs, decay_rate: as in the paper by default.

    Returns:
        A `WarmupStepDecay` in optimizer steps.
    """
    steps_per_epoch = check_positive_int("steps_per_epoch", steps_per_epoch, owner="goyal_schedule")
    peak = scaled_learning_rate(base_lr, global_batch_size, base_batch_size)
    return WarmupStepDecay(
        peak,
        boundaries=[int(e) * steps_per_epoch for e in decay_epochs],
        decay_rate=decay_rate,
        warmup_steps=int(warmup_epochs) * steps_per_epoch,
        warmup_start_lr=min(float(base_lr), peak),
    )

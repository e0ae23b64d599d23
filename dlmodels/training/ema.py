"""Exponential moving average of weights (the "mean teacher" of Tarvainen & Valpola 2017).

Tarvainen & Valpola 2017, "Mean teachers are better role models": the average of the weights
over the recent steps, theta' <- a * theta' + (1 - a) * theta after every optimizer step,
evaluates better than the last weights, and is the teacher of semi-supervised training. The
paper ramps the decay up as a = min(1 - 1 / (t + 1), decay) (t counting updates from 0), so
the first update copies the weights and the early average is a plain running mean instead of
being dominated by the random initial weights.

Under tf.distribute the averages are mirrored variables created under the strategy's scope and
updated in cross-replica context right after the (synchronised) optimizer step, from the
replicated weights: every replica and every worker holds the same averages.
"""

from __future__ import annotations

import contextlib
import math

import tensorflow as tf

from dlmodels.errors import UserError


def check_decay(decay, owner="ExponentialMovingAverage"):
    ok = isinstance(decay, int | float) and not isinstance(decay, bool) and math.isfinite(decay)
    if not ok or not 0.0 < decay < 1.0:
        raise UserError(
            f"{owner}: `ema_decay`={decay!r} must lie in (0, 1), e.g. 0.999 (the weight of the "
            "previous average at each step)."
        )
    return float(decay)


class ExponentialMovingAverage(tf.Module):
    """Moving averages of `variables`, updated by `update()`, swapped in by `swapped()`.

    Checkpointed with the Trainer (averages and update count), so a resumed run continues the
    same averages.

    Args:
        variables: the variables to average (e.g. the models' trainable variables).
        decay: the decay `a` in (0, 1).
        ramp: use the mean-teacher ramp `min(1 - 1 / (t + 1), decay)`; False: fixed `decay`
            (the averages then start from the initial weights).
        strategy: the strategy the variables live under (default: the current one).

    References:
        Tarvainen & Valpola 2017, "Mean teachers are better role models: Weight-averaged
        consistency targets improve semi-supervised deep learning results".
    """

    def __init__(self, variables, decay, *, ramp=True, strategy=None, name="ema"):
        super().__init__(name=name)
        self.decay = check_decay(decay)
        self.ramp = bool(ramp)
        self._targets = list(variables)
        if not self._targets:
            raise UserError("ExponentialMovingAverage: no variables to average.")
        self.strategy = strategy or tf.distribute.get_strategy()
        with self.strategy.scope():
            self.averages = [
                tf.Variable(tf.identity(tf.convert_to_tensor(v)), trainable=False, name=f"ema_{i}")
                for i, v in enumerate(self._targets)
            ]
            self.updates = tf.Variable(0, dtype=tf.int64, trainable=False, name="ema_updates")

    def current_decay(self):
        """The decay of the next update (a float32 tensor)."""
        if not self.ramp:
            return tf.constant(self.decay, tf.float32)
        t = tf.cast(self.updates, tf.float32)
        return tf.minimum(1.0 - 1.0 / (t + 1.0), self.decay)

    def update(self):
        """One update from the current weights; call in cross-replica context (the Trainer
        does, after each step), where each variable's value is the replicated one."""
        decay = self.current_decay()
        for average, variable in zip(self.averages, self._targets, strict=True):
            value = tf.convert_to_tensor(variable)
            d = tf.cast(decay, average.dtype)
            average.assign(d * average + (1.0 - d) * tf.cast(value, average.dtype))
        self.updates.assign_add(1)

    def _assign(self, pairs):
        for target, value in pairs:
            target.assign(tf.cast(tf.convert_to_tensor(value), target.dtype))

    @contextlib.contextmanager
    def swapped(self):
        """Inside the block the variables hold the averages (evaluate, export); restored after."""
        saved = [tf.identity(tf.convert_to_tensor(v)) for v in self._targets]
        self._assign(zip(self._targets, self.averages, strict=True))
        try:
            yield self
        finally:
            self._assign(zip(self._targets, saved, strict=True))

    def assign_to_variables(self):
        """Copy the averages into the variables for good (before export / saving the model)."""
        self._assign(zip(self._targets, self.averages, strict=True))

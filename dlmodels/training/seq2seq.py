"""Seq2SeqTask: teacher-forced training and autoregressive evaluation of an RNN encoder-decoder.

Training feeds the decoder the true previous values (teacher forcing, Williams & Zipser 1989):
stable, parallel over the horizon. What the model is used for, and what evaluation measures,
is the autoregressive forecast, each step fed the previous prediction
(`dlmodels.models.seq2seq_inference_model`): the gap between the two ("exposure bias") shows
up as eval loss above train loss.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from dlmodels._validation import check_choice
from dlmodels.training.tasks import Task, _check_model, _SingleModelTask

LOSSES = ("mse", "mae")


class Seq2SeqTask(_SingleModelTask, Task):
    """Train a `dlmodels.models.Seq2SeqForecaster` on `(series, targets)` batches.

    Args:
        model: the training model of `Seq2SeqForecaster` (inputs "series", "decoder_inputs").
        loss: "mse" or "mae", per example averaged over horizon and features.
        optimizer: an optimizer created under the Trainer's strategy, a name, or None (Adam).
        seed: task seed (unused noise; kept for the Task contract).

    Logs: train "loss" (teacher forced); eval "loss" and the metric "mae" of the
    autoregressive forecast.
    """

    name = "seq2seq"

    def __init__(self, model, *, loss="mse", optimizer=None, seed=None):
        super().__init__(seed=seed)
        from dlmodels.models.sequence import seq2seq_inference_model

        self.model = _check_model(model, "model", "Seq2SeqTask")
        self.loss_name = check_choice("loss", loss, LOSSES, owner="Seq2SeqTask")
        self.inference_model = seq2seq_inference_model(model)
        self._optimizer_arg = optimizer
        self.optimizer = None

    def _build_metrics(self, strategy):
        return [keras.metrics.MeanAbsoluteError(name="mae")]

    def per_example_loss(self, y, pred):
        diff = tf.cast(pred, tf.float32) - tf.cast(y, tf.float32)
        values = tf.square(diff) if self.loss_name == "mse" else tf.abs(diff)
        return tf.reduce_mean(values, axis=[1, 2])

    @staticmethod
    def _unpack(batch):
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise ValueError(
                "Seq2SeqTask: batches must be (series, targets) pairs: series [batch, time, "
                "features], targets [batch, horizon, output_features]."
            )
        return batch

    def train_step(self, batch, ctx):
        from dlmodels.models.sequence import teacher_forcing_inputs

        x, y = self._unpack(batch)
        inputs = {"series": x, "decoder_inputs": teacher_forcing_inputs(x, y)}
        with tf.GradientTape() as tape:
            pred = self.model(inputs, training=True)
            loss = ctx.average_loss(self.per_example_loss(y, pred))
            loss += ctx.regularization_loss(self.model)
        ctx.minimize(tape, loss, self.model.trainable_variables, self.optimizer)
        return {"loss": loss}

    def eval_step(self, batch, ctx):
        x, y = self._unpack(batch)
        pred = tf.cast(self.inference_model(x, training=False), tf.float32)
        for metric in self.metrics:
            metric.update_state(tf.cast(y, tf.float32), pred)
        return {"loss": ctx.average_loss(self.per_example_loss(y, pred))}

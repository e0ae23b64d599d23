"""A distributed custom training loop for Keras 3 models on TensorFlow.

Keras 3's `model.fit` breaks under `MultiWorkerMirroredStrategy` (keras-team/keras#20585), so
this loop drives training itself with the tf.distribute primitives that work under every
strategy: `experimental_distribute_dataset`, `strategy.run` inside a `tf.function`, per-example
losses averaged over the *global* batch (`tf.nn.compute_average_loss`) and regularisation
losses divided by the number of replicas, so the all-reduced (summed) gradients equal the
single-device gradients of the same global batch.

The model (and a given optimizer) must be created under `strategy.scope()` by the caller:

    strategy = resolve_strategy("auto")
    with strategy.scope():
        model = dlmodels.models.get("unet", input_shape=(96, 96, 3), num_classes=4)
    history = Trainer(model, strategy=strategy, checkpoint_dir="ckpt").fit(train_ds, val_ds)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import keras
import tensorflow as tf

from dlmodels._validation import check_choice, check_positive_int
from dlmodels.metrics import MeanIoU
from dlmodels.training.strategy import is_chief

TASKS = ("segmentation", "classification")


def _first_output(outputs):
    if isinstance(outputs, dict):
        return next(iter(outputs.values()))
    if isinstance(outputs, list | tuple):
        return outputs[0]
    return outputs


def _per_example_loss_fn(loss):
    """Wrap `loss` to return one float32 value per example, shape `(batch,)`.

    Keras `Loss` objects are rebuilt with `reduction=None`; their per-element output (per pixel
    for segmentation) is averaged over the non-batch axes. Plain callables are treated alike.
    """
    if isinstance(loss, keras.losses.Loss):
        config = {**loss.get_config(), "reduction": None}
        loss = type(loss).from_config(config)
    elif isinstance(loss, str):
        loss = keras.losses.get(loss)
    if not callable(loss):
        raise ValueError(
            f"Trainer: `loss`={loss!r} is not a keras.losses.Loss, loss name or callable."
        )

    def per_example(y_true, y_pred):
        values = tf.cast(loss(y_true, tf.cast(y_pred, tf.float32)), tf.float32)
        if values.shape.rank is not None and values.shape.rank > 1:
            values = tf.reduce_mean(values, axis=tf.range(1, tf.rank(values)))
        return values

    return per_example


def _num_classes(model):
    channels = _first_output(model.outputs if model.outputs else [None])
    if channels is None or channels.shape[-1] is None:
        raise ValueError(
            "Trainer: cannot infer num_classes from the model's outputs; pass `metrics=` "
            "explicitly."
        )
    return int(channels.shape[-1])


class Trainer:
    """Train and evaluate a Keras model under any `tf.distribute` strategy with a custom loop.

    `fit(epochs=N)` trains until N epochs are done in total: a Trainer that already ran (or
    restored) k epochs runs N - k more, which is what resuming from a checkpoint needs.

    Works under the default strategy, `OneDeviceStrategy`, `MirroredStrategy`,
    `MultiWorkerMirroredStrategy` and `TPUStrategy`. For TPUs use datasets with a static batch
    dimension (`drop_remainder=True`). Under mixed precision (`mixed_float16`) the optimizer is
    wrapped in `keras.optimizers.LossScaleOptimizer` and the loss is computed in float32.

    Args:
        model: a built Keras model created under `strategy.scope()`, outputting logits.
        task: "segmentation" (labels `(B, H, W)`, outputs `(B, H, W, C)`) or "classification"
            (labels `(B,)`, outputs `(B, C)`).
        loss: a `keras.losses.Loss`, loss name or callable `(y_true, y_pred) -> values`; default
            sparse categorical cross-entropy from logits. Its per-example values are averaged
            over the global batch.
        optimizer: a Keras optimizer created under the strategy's scope, a name, or None for
            `Adam(1e-3)`.
        metrics: Keras metrics created under the strategy's scope, or None: `MeanIoU` (classes
            from the model's output channels) and pixel accuracy for segmentation, accuracy for
            classification.
        strategy: the strategy the model was built under; default `tf.distribute.get_strategy()`.
        checkpoint_dir: where `tf.train.CheckpointManager` saves after every epoch and from where
            `fit` resumes. Under multi-worker training only the chief writes there.
        max_checkpoints: checkpoints to keep.
        progress: show a progress bar on a terminal (one line per epoch otherwise).
    """

    def __init__(
        self,
        model,
        *,
        task="segmentation",
        loss=None,
        optimizer=None,
        metrics=None,
        strategy=None,
        checkpoint_dir=None,
        max_checkpoints=3,
        progress=True,
    ):
        self.task = check_choice("task", task, TASKS, owner="Trainer")
        self.strategy = strategy or tf.distribute.get_strategy()
        self.model = model
        self.progress = bool(progress)
        self._check_model_strategy()
        with self.strategy.scope():
            self.optimizer = self._make_optimizer(optimizer)
            # Built here, in cross-replica context, so slot variables are mirrored and exist
            # before a checkpoint restore.
            if not self.optimizer.built:
                self.optimizer.build(model.trainable_variables)
            self.metrics = self._make_metrics(metrics)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self._loss = _per_example_loss_fn(
            keras.losses.SparseCategoricalCrossentropy(from_logits=True) if loss is None else loss
        )
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.max_checkpoints = check_positive_int(
            "max_checkpoints", max_checkpoints, owner="Trainer"
        )
        self._manager = None
        self._restored = None
        self._train_fn = None
        self._eval_fn = None
        if self.checkpoint_dir is not None:
            self.checkpoint = tf.train.Checkpoint(
                model=model, optimizer=self.optimizer, step=self.step, epoch=self.epoch
            )
            self._manager = self._make_manager()

    # -- construction ------------------------------------------------------------------------
    def _check_model_strategy(self):
        extended = self.strategy.extended
        for v in self.model.weights:
            if not extended.variable_created_in_scope(getattr(v, "value", v)):
                raise ValueError(
                    f"Trainer: the model's variable {v.path!r} was not created under the "
                    f"Trainer's strategy ({type(self.strategy).__name__}). Build the model inside "
                    "`with strategy.scope():` and pass the same strategy to Trainer."
                )

    def _make_optimizer(self, optimizer):
        if optimizer is None:
            optimizer = keras.optimizers.Adam(1e-3)
        elif isinstance(optimizer, str):
            optimizer = keras.optimizers.get(optimizer)
        elif not isinstance(optimizer, keras.optimizers.Optimizer):
            raise ValueError(
                f"Trainer: `optimizer`={optimizer!r} must be a keras optimizer, a name or None."
            )
        # Keras' TF optimizer records the strategy it was created under and all-reduces through
        # it; one made outside the scope would silently skip the cross-replica gradient sum.
        made_under = getattr(optimizer, "_distribution_strategy", self.strategy)
        if made_under is not self.strategy:
            raise ValueError(
                "Trainer: the optimizer was created outside the Trainer's strategy scope. Create "
                "it inside `with strategy.scope():` (or pass optimizer=None / a name)."
            )
        mixed = self.model.compute_dtype == "float16"
        if mixed and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        return optimizer

    def _make_metrics(self, metrics):
        if metrics is not None:
            return list(metrics)
        if self.task == "segmentation":
            # TPUs have no float64.
            tpu = isinstance(self.strategy, tf.distribute.TPUStrategy)
            return [
                MeanIoU(
                    _num_classes(self.model),
                    accumulator_dtype="float32" if tpu else "float64",
                    name="mean_iou",
                ),
                keras.metrics.SparseCategoricalAccuracy(name="pixel_accuracy"),
            ]
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]

    def _make_manager(self):
        directory = self.checkpoint_dir
        self._is_chief = is_chief(self.strategy)
        if not self._is_chief:
            # Every worker must take part in saving (variables may need collectives), but only
            # the chief's files are kept: the others write to a private temporary directory.
            directory = tempfile.mkdtemp(prefix="dlmodels_worker_ckpt_")
        return tf.train.CheckpointManager(
            self.checkpoint, directory, max_to_keep=self.max_checkpoints
        )

    # -- checkpoints -------------------------------------------------------------------------
    def restore(self) -> int:
        """Restore the latest checkpoint in `checkpoint_dir`, if any; return the number of epochs
        done (0 for a fresh run; without `checkpoint_dir`, the epochs this Trainer has run).

        All workers read the chief's checkpoint.
        """
        if self._manager is None:
            return int(self.epoch.numpy())
        latest = tf.train.latest_checkpoint(self.checkpoint_dir)
        if latest is not None and latest != self._restored:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            self._restored = latest
        return int(self.epoch.numpy())

    def _save(self):
        path = self._manager.save(checkpoint_number=int(self.epoch.numpy()))
        if not self._is_chief:
            shutil.rmtree(self._manager.directory, ignore_errors=True)
        return path

    # -- steps -------------------------------------------------------------------------------
    def _global_batch_size(self, x):
        """Static when known (TPU, drop_remainder), else summed over replicas: the last partial
        batch splits unevenly and each replica must divide by the true global size."""
        local = tf.nest.flatten(x)[0].shape[0]
        if local is not None:
            # A static per-replica size means every replica got the same share.
            return local * self.strategy.num_replicas_in_sync
        return tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, tf.shape(tf.nest.flatten(x)[0])[0]
        )

    def _build_train_fn(self):
        model, optimizer, strategy = self.model, self.optimizer, self.strategy
        scale_loss = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

        def step_fn(x, y):
            global_batch = self._global_batch_size(x)
            with tf.GradientTape() as tape:
                logits = _first_output(model(x, training=True))
                per_example = self._loss(y, logits)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
                if model.losses:
                    loss += tf.nn.scale_regularization_loss(
                        tf.add_n([tf.cast(v, tf.float32) for v in model.losses])
                    )
                scaled = optimizer.scale_loss(loss) if scale_loss else loss
            grads = tape.gradient(scaled, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            logits = tf.cast(logits, tf.float32)
            for metric in self.metrics:
                metric.update_state(y, logits)
            return loss

        @tf.function(reduce_retracing=True)
        def train_fn(batch):
            x, y = batch
            per_replica = strategy.run(step_fn, args=(x, y))
            self.step.assign_add(1)
            return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

        return train_fn

    def _build_eval_fn(self):
        model, strategy = self.model, self.strategy

        def step_fn(x, y):
            logits = tf.cast(_first_output(model(x, training=False)), tf.float32)
            per_example = self._loss(y, logits)
            for metric in self.metrics:
                metric.update_state(y, logits)
            return tf.reduce_sum(per_example), tf.cast(tf.shape(per_example)[0], tf.float32)

        @tf.function(reduce_retracing=True)
        def eval_fn(batch):
            x, y = batch
            total, count = strategy.run(step_fn, args=(x, y))
            reduce = tf.distribute.ReduceOp.SUM
            return strategy.reduce(reduce, total, axis=None), strategy.reduce(
                reduce, count, axis=None
            )

        return eval_fn

    def _metric_logs(self, prefix=""):
        return {prefix + m.name: float(m.result()) for m in self.metrics}

    def _reset_metrics(self):
        for metric in self.metrics:
            metric.reset_state()

    # -- public ------------------------------------------------------------------------------
    def fit(
        self,
        train_ds,
        val_ds=None,
        *,
        epochs=1,
        steps_per_epoch=None,
        validation_steps=None,
        callbacks=None,
    ) -> dict:
        """Train until `epochs` epochs are done in total, resuming from `checkpoint_dir`.

        Args:
            train_ds: `tf.data.Dataset` of `(inputs, labels)` batches of the *global* batch
                size. A finite dataset is iterated once per epoch; an infinite (repeated) one
                needs `steps_per_epoch`.
            val_ds: optional validation dataset, evaluated after every epoch.
            epochs: the total epoch count; a resumed run only runs the remaining epochs.
            steps_per_epoch: batches per epoch (the iterator then persists across epochs).
            validation_steps: batches per validation (default: the whole `val_ds`).
            callbacks: objects with `on_epoch_end(epoch, logs)` (e.g. Keras callbacks) or
                callables `fn(epoch, logs)`, called after each epoch with its logs.

        Returns:
            History: a dict of lists, one entry per epoch run now: "epoch" (1-based), "loss",
            the metrics, "val_loss" / "val_<metric>" with `val_ds`, and "seconds".
        """
        epochs = check_positive_int("epochs", epochs, owner="Trainer.fit")
        if steps_per_epoch is not None:
            steps_per_epoch = check_positive_int(
                "steps_per_epoch", steps_per_epoch, owner="Trainer.fit"
            )
        start_epoch = self.restore()
        if self._train_fn is None:
            self._train_fn = self._build_train_fn()
        dist_train = self.strategy.experimental_distribute_dataset(train_ds)
        persistent = iter(dist_train) if steps_per_epoch is not None else None
        total_steps = steps_per_epoch or self._cardinality(train_ds)
        history: dict[str, list] = {}
        for epoch in range(start_epoch, epochs):
            begin = time.perf_counter()
            self._reset_metrics()
            iterator = persistent if persistent is not None else iter(dist_train)
            total, steps = 0.0, 0
            with self._progress(f"epoch {epoch + 1}/{epochs}", total_steps) as advance:
                while steps_per_epoch is None or steps < steps_per_epoch:
                    batch = next(iterator, None)
                    if batch is None:
                        if steps_per_epoch is not None:
                            raise ValueError(
                                f"Trainer.fit: train_ds ran out after {steps} of "
                                f"steps_per_epoch={steps_per_epoch} batches. Use a repeated "
                                "dataset or fewer steps_per_epoch."
                            )
                        break
                    loss = float(self._train_fn(batch))
                    total += loss
                    steps += 1
                    advance(loss)
            if steps == 0:
                raise ValueError("Trainer.fit: train_ds yielded no batches.")
            logs = {"epoch": epoch + 1, "loss": total / steps, **self._metric_logs()}
            if val_ds is not None:
                val = self.evaluate(val_ds, steps=validation_steps)
                logs.update({f"val_{k}": v for k, v in val.items()})
            self.epoch.assign(epoch + 1)
            if self._manager is not None:
                self._save()
            logs["seconds"] = time.perf_counter() - begin
            for key, value in logs.items():
                history.setdefault(key, []).append(value)
            self._print_logs(logs)
            for callback in callbacks or ():
                if hasattr(callback, "on_epoch_end"):
                    callback.on_epoch_end(epoch, logs)
                else:
                    callback(epoch, logs)
        return history

    def evaluate(self, ds, steps=None) -> dict:
        """Mean per-example loss and the metrics over `ds` (or its first `steps` batches)."""
        if steps is not None:
            steps = check_positive_int("steps", steps, owner="Trainer.evaluate")
        if self._eval_fn is None:
            self._eval_fn = self._build_eval_fn()
        self._reset_metrics()
        total, count = 0.0, 0.0
        for done, batch in enumerate(self.strategy.experimental_distribute_dataset(ds)):
            if steps is not None and done >= steps:
                break
            batch_total, batch_count = self._eval_fn(batch)
            total += float(batch_total)
            count += float(batch_count)
        if count == 0:
            raise ValueError("Trainer.evaluate: the dataset yielded no examples.")
        return {"loss": total / count, **self._metric_logs()}

    @staticmethod
    def _cardinality(ds):
        try:
            n = int(ds.cardinality())
        except (AttributeError, TypeError, ValueError):
            return None
        return n if n > 0 else None

    # -- output ------------------------------------------------------------------------------
    def _show(self):
        return self.progress and is_chief(self.strategy)

    def _progress(self, description, total):
        import contextlib

        if not (self._show() and sys.stdout.isatty()):
            return contextlib.nullcontext(lambda loss: None)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        @contextlib.contextmanager
        def bar():
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"),
                transient=True,
            ) as progress:
                task = progress.add_task(description, total=total, loss=float("nan"))
                yield lambda loss: progress.update(task, advance=1, loss=loss)

        return bar()

    def _print_logs(self, logs):
        if not self._show():
            return
        parts = [f"{k} {v:.4f}" for k, v in logs.items() if k not in ("epoch", "seconds")]
        print(f"epoch {logs['epoch']}: " + ", ".join(parts) + f" ({logs['seconds']:.1f} s)")

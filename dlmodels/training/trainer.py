"""A distributed custom training loop for Keras 3 models on TensorFlow.

Keras 3's `model.fit` breaks under `MultiWorkerMirroredStrategy` (keras-team/keras#20585), so
this loop drives training itself with the tf.distribute primitives that work under every
strategy: `experimental_distribute_dataset` and `strategy.run` inside a `tf.function`. What a
step computes belongs to a `Task` (`SupervisedTask`, `VAETask`, `GANTask`); the step's
distributed maths (global-batch averaging, regularisation / replicas, loss scaling, global-batch
noise) to its `StepContext`, so the summed gradients equal one device's on the same global
batch. The Trainer adds what Keras 3 leaves per replica: BatchNormalization statistics
(synchronised across replicas while stepping) and random seeds (folded with the replica id).

The model(s) (and any given optimizer) must be created under `strategy.scope()` by the caller:

    strategy = resolve_strategy("auto")
    with strategy.scope():
        model = dlmodels.models.get("unet", input_shape=(96, 96, 3), num_classes=4)
    history = Trainer(model, strategy=strategy, checkpoint_dir="ckpt").fit(train_ds, val_ds)
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import shutil
import sys
import tempfile
import threading
import time

import keras
import tensorflow as tf

from dlmodels._validation import check_choice, check_positive_int
from dlmodels.training.context import StepContext
from dlmodels.training.ema import ExponentialMovingAverage, check_decay
from dlmodels.training.replicas import (
    fold_seeds_per_replica,
    seed_state_variables,
    synchronized_batch_norm,
)
from dlmodels.training.strategy import is_chief
from dlmodels.training.tasks import SupervisedTask, Task

AUTO_SHARD_POLICIES = {
    "data": tf.data.experimental.AutoShardPolicy.DATA,
    "file": tf.data.experimental.AutoShardPolicy.FILE,
    "auto": tf.data.experimental.AutoShardPolicy.AUTO,
    "off": tf.data.experimental.AutoShardPolicy.OFF,
}


class NonFiniteLossError(FloatingPointError):
    """Training logs became NaN or infinite; the run stopped before saving those weights."""


def _release_in_background(box: list) -> None:
    """Drop the tf.data iterator held in `box` (its only reference) on a helper thread.

    Deleting an iterator waits for its input-pipeline threads (prefetch, autotuning) to stop:
    after the last epoch, `dlmodels.bench.training` saw that wait take 0.1-28 s with almost no
    CPU, in `model.fit` and in this loop alike. Training need not wait for it. The thread is not
    a daemon, so the interpreter lets it finish before exiting.
    """
    threading.Thread(target=box.clear, name="dlmodels-release-iterator").start()


class Trainer:
    """Train and evaluate a `Task` (or one Keras model) under any `tf.distribute` strategy.

    `fit(epochs=N)` trains until N epochs are done in total: a Trainer that already ran (or
    restored) k epochs runs N - k more, which is what resuming from a checkpoint needs. The
    number of batches trained (`step`, saved in every checkpoint with the epoch and the
    position inside it) is the truth of progress: a run resumed from a checkpoint written
    mid-epoch continues the same epoch at the next batch (deterministic input pipelines then
    reproduce an uninterrupted run exactly).

    Works under the default strategy, `OneDeviceStrategy`, `MirroredStrategy`,
    `MultiWorkerMirroredStrategy` and `TPUStrategy`. For TPUs use datasets with a static batch
    dimension (`drop_remainder=True`). Under mixed precision (`mixed_float16`) optimizers are
    wrapped in `keras.optimizers.LossScaleOptimizer` and losses are computed in float32.

    Args:
        model: a `Task`, or a built Keras model created under `strategy.scope()`, outputting
            logits (or probabilities: the loss follows `output_kind`; a model whose output
            kind is "unknown" needs an explicit `loss`), for a `SupervisedTask` made from
            `task`, `loss`, `optimizer`, `metrics` and `ignore_index`.
        task: "segmentation" (labels `(B, H, W)`, outputs `(B, H, W, C)`) or "classification"
            (labels `(B,)`, outputs `(B, C)`); only with a model.
        loss, optimizer, metrics, ignore_index: see `SupervisedTask`; only with a model. With
            `ignore_index`, each example's loss is the mean over its own valid (non-ignored)
            positions, and the loss is the mean of those over the *global* batch: an example
            with no valid position contributes 0 but still counts in the denominator. This
            differs from PyTorch's `CrossEntropyLoss(ignore_index=...)` (`reduction="mean"`),
            which divides by the valid positions of the whole batch.
        deep_supervision: "auto" or False; see `SupervisedTask` (several per-pixel heads, e.g.
            UNet++ with `deep_supervision=True`, are trained on the mean of their losses).
        strategy: the strategy the models were built under; default
            `tf.distribute.get_strategy()`.
        checkpoint_dir: where `tf.train.CheckpointManager` saves (every `checkpoint_every`
            steps and after every epoch, numbered by step) and from where `fit` resumes. Under
            multi-worker training only the chief writes there.
        checkpoint_every: save every this many steps too (None: at epoch ends only).
        max_checkpoints: checkpoints to keep.
        sync_batch_norm: "auto" (when more than one replica), True or False: run every
            BatchNormalization of the task's models with `synchronized=True` while stepping,
            so batch moments are those of the global batch and moving statistics are equal on
            all replicas (Keras 3 keeps them per replica otherwise).
        progress: show a progress bar on a terminal (one line per epoch otherwise), on the
            chief only.
        progress_every: the bar reads the loss from the device every this many steps.
        clip_global_norm: clip the gradients of each optimizer to this global norm, computed
            on the gradients summed over all replicas (as one device would; see
            `StepContext.minimize`). None: no clipping beyond the optimizer's own.
        ema_decay: keep an exponential moving average of the trainable weights with this decay
            (the mean teacher, Tarvainen & Valpola 2017; see `ExponentialMovingAverage`):
            `evaluate` and validation use the averages, `ema.swapped()` /
            `ema.assign_to_variables()` put them in the models for export. None: no average.
        steps_per_execution: training steps per `tf.function` call (one host round trip per
            this many steps; a loop over `tf.range` inside the function, which every strategy
            runs). Needs a known number of steps per epoch (`steps_per_epoch` or a dataset of
            known cardinality), else one step per call. Checkpoints still land on their steps.
            With a known number of steps the function also reads its batches from the
            distributed iterator itself, as `model.fit` does (with an unknown number, the host
            reads each batch and passes it in, about 4% more CPU time per step for the demo
            U-Net on a CPU).
        log_dir: on the chief only, append each epoch's logs to `log_dir/history.csv` and
            write them as TensorBoard scalars to `log_dir/tensorboard`.
        stop_on_nan: raise `NonFiniteLossError` when a step's logs are NaN or infinite, before
            any checkpoint of those weights is written (checked at every save and epoch end,
            so it costs no per-step host reads); the last good checkpoint stays the latest.
            Under loss scaling (`mixed_float16`) a non-finite step is skipped instead, and
            this only stops on non-finite *logs* when the skipped steps still report them.
        preemption: with `checkpoint_dir`, watch for preemption signals (SIGTERM, or the cloud
            provider's maintenance notice) with
            `tf.distribute.experimental.PreemptionCheckpointHandler`: all workers agree on a
            step, save a checkpoint there (numbered by step, through the Trainer's manager)
            and exit (status 42 off Google Cloud), so a restarted job resumes at that step.
        auto_shard: the `tf.data` auto-shard policy for multi-worker input: "data" (default:
            every worker reads the whole dataset and keeps its rows of each global batch,
            which reproduces one device's batches exactly), "file" (each worker reads its own
            files: cheaper I/O, different batches), "auto" or "off".

    Raises:
        ValueError: bad arguments, models or optimizers not created under `strategy`.
    """

    def __init__(
        self,
        model,
        *,
        task=None,
        loss=None,
        optimizer=None,
        metrics=None,
        ignore_index=None,
        deep_supervision="auto",
        strategy=None,
        checkpoint_dir=None,
        checkpoint_every=None,
        max_checkpoints=3,
        sync_batch_norm="auto",
        progress=True,
        progress_every=10,
        clip_global_norm=None,
        ema_decay=None,
        steps_per_execution=1,
        log_dir=None,
        stop_on_nan=True,
        preemption=False,
        auto_shard="data",
    ):
        if isinstance(model, Task):
            given = {
                "task": task,
                "loss": loss,
                "optimizer": optimizer,
                "metrics": metrics,
                "ignore_index": ignore_index,
                "deep_supervision": None if deep_supervision == "auto" else deep_supervision,
            }
            extra = [k for k, v in given.items() if v is not None]
            if extra:
                raise ValueError(
                    f"Trainer: {', '.join(f'`{k}`' for k in extra)} apply when the first "
                    f"argument is a Keras model, not a {type(model).__name__}. Pass them to the "
                    "task's constructor instead."
                )
            self.task = model
        else:
            self.task = SupervisedTask(
                model,
                task="segmentation" if task is None else task,
                loss=loss,
                optimizer=optimizer,
                metrics=metrics,
                ignore_index=ignore_index,
                deep_supervision=deep_supervision,
            )
        self.strategy = strategy or tf.distribute.get_strategy()
        self.progress = bool(progress)
        self.progress_every = check_positive_int("progress_every", progress_every, owner="Trainer")
        if sync_batch_norm not in ("auto", True, False):
            raise ValueError(
                f"Trainer: `sync_batch_norm`={sync_batch_norm!r} must be 'auto' (synchronise "
                "when there is more than one replica), True or False."
            )
        if sync_batch_norm == "auto":
            sync_batch_norm = self.strategy.num_replicas_in_sync > 1
        self.sync_batch_norm = bool(sync_batch_norm)
        self.task.build(self.strategy)
        self.steps_per_execution = check_positive_int(
            "steps_per_execution", steps_per_execution, owner="Trainer"
        )
        self.auto_shard = check_choice(
            "auto_shard", auto_shard, tuple(AUTO_SHARD_POLICIES), owner="Trainer"
        )
        self.stop_on_nan = bool(stop_on_nan)
        self.preemption = bool(preemption)
        self._preemption_handler = None
        if self.preemption and checkpoint_dir is None:
            raise ValueError(
                "Trainer: `preemption`=True needs a `checkpoint_dir` to save the preempted step to."
            )
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self._summary_writer = None
        self.clip_global_norm = self._set_clipping(clip_global_norm)
        with self.strategy.scope():
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            self.epoch_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch_step")
        self.ema = None
        if ema_decay is not None:
            check_decay(ema_decay, owner="Trainer")
            variables = [v for m in self.models for v in m.trainable_variables]
            self.ema = ExponentialMovingAverage(variables, ema_decay, strategy=self.strategy)
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.checkpoint_every = (
            None
            if checkpoint_every is None
            else check_positive_int("checkpoint_every", checkpoint_every, owner="Trainer")
        )
        self.max_checkpoints = check_positive_int(
            "max_checkpoints", max_checkpoints, owner="Trainer"
        )
        self._manager = None
        self._restored = None
        self._seeds_folded = False
        self._train_fn = None
        self._multi_fn = None
        self._eval_fn = None
        self._finite_weights_fn = None
        if self.checkpoint_dir is not None:
            # Keras' SeedGenerator is not trackable: its state (dropout / stochastic depth
            # stream) is unreachable from the model, so it is listed here, in layer order, for
            # a resumed run to draw the masks the uninterrupted run would have drawn.
            seeds = {
                name: seed_state_variables([model]) for name, model in self.task.models.items()
            }
            self.checkpoint = tf.train.Checkpoint(
                **self.task.checkpoint_items(),
                seed_states={k: v for k, v in seeds.items() if v},
                **({"ema": self.ema} if self.ema is not None else {}),
                step=self.step,
                epoch=self.epoch,
                epoch_step=self.epoch_step,
            )
            self._manager = self._make_manager()

    # -- the task's parts --------------------------------------------------------------------
    @property
    def models(self) -> list:
        return list(self.task.models.values())

    @property
    def model(self):
        """The task's (first) model."""
        return self.models[0]

    @property
    def optimizer(self):
        """The task's (first) optimizer."""
        return next(iter(self.task.optimizers.values()))

    @property
    def metrics(self) -> list:
        return self.task.metrics

    def _set_clipping(self, clip):
        if clip is None:
            return None
        ok = isinstance(clip, int | float) and not isinstance(clip, bool) and math.isfinite(clip)
        if not ok or clip <= 0:
            raise ValueError(
                f"Trainer: `clip_global_norm`={clip!r} must be a positive number (e.g. 1.0) or "
                "None."
            )
        for name, optimizer in self.task.optimizers.items():
            inner = getattr(optimizer, "inner_optimizer", optimizer)
            if any(getattr(inner, a, None) for a in ("clipnorm", "clipvalue", "global_clipnorm")):
                raise ValueError(
                    f"Trainer: `clip_global_norm`={clip!r} but the {name} already clips "
                    "(clipnorm / clipvalue / global_clipnorm). Keep one of the two."
                )
            # StepContext.minimize reads this at trace time and clips the all-reduced sum.
            inner.global_clipnorm = float(clip)
        return float(clip)

    @property
    def _loss_scaled(self):
        return any(
            isinstance(o, keras.optimizers.LossScaleOptimizer)
            for o in self.task.optimizers.values()
        )

    def _check_finite(self, sums, step):
        """Raise before saving when the logs summed so far or the weights hold a NaN / inf.

        The weights are checked too: a NaN input can leave the loss finite (ReLU maps NaN
        to 0 on CPU) while the gradients, and so the weights, are NaN."""
        if not self.stop_on_nan or self._loss_scaled:
            return
        bad = {k: float(v) for k, v in sums.items() if not math.isfinite(float(v))}
        if self._finite_weights_fn is None:
            variables = [v for m in self.models for v in m.trainable_variables]

            @tf.function
            def finite_weights():
                checks = [tf.reduce_all(tf.math.is_finite(v)) for v in variables]
                return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)

            self._finite_weights_fn = finite_weights
        if not bad and bool(self._finite_weights_fn()):
            return
        last = None
        if self.checkpoint_dir is not None:
            last = tf.train.latest_checkpoint(self.checkpoint_dir)
        kept = f"; the last good checkpoint {last!r} is intact" if last else ""
        what = f"non-finite training logs {bad}" if bad else "non-finite weights"
        raise NonFiniteLossError(
            f"Trainer.fit: {what} at or before step {step} (a NaN or inf loss or gradient: a "
            "too large learning rate, bad inputs or a numerically unstable loss). Training "
            f"stopped without saving these weights{kept}. Lower the learning rate, set "
            "clip_global_norm, or check the data."
        )

    def _watch_preemption(self):
        if not self.preemption or self._preemption_handler is not None:
            return
        self._preemption_handler = tf.distribute.experimental.PreemptionCheckpointHandler(
            getattr(self.strategy, "cluster_resolver", None), self._manager
        )

    def _distribute(self, ds):
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = AUTO_SHARD_POLICIES[self.auto_shard]
        ds = ds.with_options(options)
        if isinstance(self.strategy, tf.distribute.TPUStrategy):
            batch_dims = {
                s.shape[0] if s.shape.rank else None for s in tf.nest.flatten(ds.element_spec)
            }
            if None in batch_dims:
                raise ValueError(
                    "Trainer: a TPU needs static shapes, but the dataset's batch dimension is "
                    f"unknown ({ds.element_spec}). Batch with `drop_remainder=True`."
                )
        return self.strategy.experimental_distribute_dataset(ds)

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
        """Restore the latest checkpoint in `checkpoint_dir`, if any; return the number of
        complete epochs (0 for a fresh run; without `checkpoint_dir`, the epochs this Trainer
        has run). All workers read the chief's checkpoint."""
        if self._manager is not None:
            latest = tf.train.latest_checkpoint(self.checkpoint_dir)
            if latest is not None and latest != self._restored:
                self.checkpoint.restore(latest).assert_existing_objects_matched()
                self._restored = latest
                # A restore writes replica 0's (unfolded) seed states to every replica.
                self._seeds_folded = False
        return int(self.epoch.numpy())

    def _save(self, step):
        path = self._manager.save(checkpoint_number=step)
        if not self._is_chief:
            shutil.rmtree(self._manager.directory, ignore_errors=True)
        return path

    def _prepare_replicas(self):
        if not self._seeds_folded:
            fold_seeds_per_replica(self.strategy, self.models)
            self._seeds_folded = True

    @contextlib.contextmanager
    def _stepping(self):
        with synchronized_batch_norm(self.models, enabled=self.sync_batch_norm):
            yield

    # -- steps -------------------------------------------------------------------------------
    def _build_train_fn(self):
        strategy, task = self.strategy, self.task

        def replica_fn(batch):
            return task.train_step(batch, StepContext(strategy, batch))

        def one_step(batch):
            per_replica = strategy.run(replica_fn, args=(batch,))
            logs = {
                k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                for k, v in per_replica.items()
            }
            if self.ema is not None:
                self.ema.update()
            self.step.assign_add(1)
            self.epoch_step.assign_add(1)
            return logs

        return tf.function(one_step, reduce_retracing=True)

    def _build_multi_fn(self):
        """`fn(iterator, n)`: n steps in one call, each reading its batch inside the function
        (as `model.fit` does: no host-side batch per step); returns the logs summed over them."""
        one_step = self._build_train_fn().python_function

        if self.steps_per_execution == 1:

            @tf.function(reduce_retracing=True)
            def single_fn(iterator, n):
                del n  # always 1
                return one_step(next(iterator))

            return single_fn

        @tf.function(reduce_retracing=True)
        def multi_fn(iterator, n):
            logs = one_step(next(iterator))
            for _ in tf.range(n - 1):
                more = one_step(next(iterator))
                logs = {k: logs[k] + more[k] for k in logs}
            return logs

        return multi_fn

    def _build_eval_fn(self):
        strategy, task = self.strategy, self.task

        def replica_fn(batch):
            ctx = StepContext(strategy, batch)
            return task.eval_step(batch, ctx), tf.cast(ctx.local_batch_size, tf.float32)

        @tf.function(reduce_retracing=True)
        def eval_fn(batch):
            logs, count = strategy.run(replica_fn, args=(batch,))
            reduce = tf.distribute.ReduceOp.SUM
            count = strategy.reduce(reduce, count, axis=None)
            # Each batch's logs are means over it; weight by its size for the dataset mean.
            return {k: strategy.reduce(reduce, v, axis=None) * count for k, v in logs.items()}, (
                count
            )

        return eval_fn

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
            train_ds: `tf.data.Dataset` of batches of the *global* batch size (`(inputs,
                labels)` for supervised tasks). A finite dataset is iterated once per epoch; an
                infinite (repeated) one needs `steps_per_epoch`.
            val_ds: optional validation dataset, evaluated after every epoch.
            epochs: the total epoch count; a resumed run only runs the remaining epochs.
            steps_per_epoch: batches per epoch (one iterator then runs across epochs).
            validation_steps: batches per validation (default: the whole `val_ds`).
            callbacks: objects with `on_epoch_end(epoch, logs)` (e.g. Keras callbacks) or
                callables `fn(epoch, logs)`, called after each epoch with its logs.

        On resume the batches already trained are skipped with `Dataset.skip(n)`: the ones
        already trained in the interrupted epoch for a finite dataset, all `step` batches of a
        repeated one (`steps_per_epoch`). `skip` reads and discards those batches, running the
        input pipeline over them again: the resumed run sees the batches an uninterrupted run
        would only when the pipeline is deterministic (no unseeded shuffle or augmentation,
        deterministic parallel maps), and the cost of resuming grows with the step (a repeated
        dataset re-reads every batch trained so far).

        Returns:
            History: a dict of lists, one entry per epoch run now: "epoch" (1-based), the
            task's logs (e.g. "loss"; means over the epoch's steps run now), the metrics,
            "val_<name>" with `val_ds`, and "seconds".
        """
        epochs = check_positive_int("epochs", epochs, owner="Trainer.fit")
        if steps_per_epoch is not None:
            steps_per_epoch = check_positive_int(
                "steps_per_epoch", steps_per_epoch, owner="Trainer.fit"
            )
        start_epoch = self.restore()
        self._watch_preemption()
        self._prepare_replicas()
        if self._train_fn is None:
            self._train_fn = self._build_train_fn()
        step = int(self.step.numpy())
        done_in_epoch = int(self.epoch_step.numpy())
        persistent = None
        if steps_per_epoch is not None:
            persistent = iter(self._distribute(train_ds.skip(step) if step else train_ds))
        total_steps = steps_per_epoch or self._cardinality(train_ds)
        # Reading batches inside the step function needs to know where the epoch ends (no
        # end-of-data inside); otherwise the host reads each batch and steps on it.
        chunked = total_steps is not None
        if chunked and self._multi_fn is None:
            self._multi_fn = self._build_multi_fn()
        history: dict[str, list] = {}
        for epoch in range(start_epoch, epochs):
            begin = time.perf_counter()
            self.task.reset_metrics()
            if persistent is not None:
                iterator = persistent
            else:
                remaining = train_ds.skip(done_in_epoch) if done_in_epoch else train_ds
                iterator = iter(self._distribute(remaining))
            sums, steps, pending_save = {}, 0, False
            with self._progress(
                f"epoch {epoch + 1}/{epochs}", total_steps, done_in_epoch
            ) as advance:
                while steps_per_epoch is None or done_in_epoch + steps < steps_per_epoch:
                    if chunked:
                        left = total_steps - done_in_epoch - steps
                        if left <= 0:
                            break
                        count = min(self.steps_per_execution, left)
                        if self._manager is not None and self.checkpoint_every:
                            count = min(count, self.checkpoint_every - step % self.checkpoint_every)
                        if pending_save:
                            self._check_finite(sums, step)
                            self._save(step)
                            pending_save = False
                        try:
                            with self._stepping():
                                logs = self._multi_fn(iterator, tf.constant(count, tf.int32))
                        except tf.errors.OutOfRangeError as err:
                            raise ValueError(
                                f"Trainer.fit: train_ds ran out before step {step + count} "
                                f"({total_steps} batches per epoch expected). Use a repeated "
                                "dataset or fewer steps_per_epoch."
                            ) from err
                    else:
                        batch = next(iterator, None)
                        if batch is None:
                            if steps_per_epoch is not None:
                                raise ValueError(
                                    f"Trainer.fit: train_ds ran out after "
                                    f"{done_in_epoch + steps} of steps_per_epoch="
                                    f"{steps_per_epoch} batches. Use a repeated dataset or "
                                    "fewer steps_per_epoch."
                                )
                            break
                        if pending_save:
                            # Saved once the next batch exists: a checkpoint taken at the end
                            # of an epoch is the epoch-end one, which records the finished
                            # epoch.
                            self._check_finite(sums, step)
                            self._save(step)
                            pending_save = False
                        count = 1
                        with self._stepping():
                            logs = self._train_fn(batch)
                    # Summed on the device: no host synchronisation per step.
                    sums = {k: sums[k] + v if k in sums else v for k, v in logs.items()}
                    steps += count
                    step += count
                    advance(logs, steps, count)
                    if self._manager is not None and self.checkpoint_every:
                        pending_save = step % self.checkpoint_every == 0
                    if self._preemption_handler is not None:
                        # Saves (all workers agreeing on the step) and exits when preempted.
                        self._preemption_handler.save_checkpoint_if_preempted(
                            checkpoint_number=step
                        )
            if persistent is None:  # this epoch's own iterator: let it go off the loop
                box, iterator = [iterator], None
                _release_in_background(box)
            if steps == 0 and done_in_epoch == 0:
                raise ValueError("Trainer.fit: train_ds yielded no batches.")
            self._check_finite(sums, step)
            logs = {"epoch": epoch + 1}
            logs.update({k: float(v) / max(steps, 1) for k, v in sums.items()})
            logs.update(self.task.metric_logs())
            if val_ds is not None:
                val = self.evaluate(val_ds, steps=validation_steps)
                logs.update({f"val_{k}": v for k, v in val.items()})
            self.epoch.assign(epoch + 1)
            self.epoch_step.assign(0)
            done_in_epoch = 0
            if self._manager is not None:
                self._save(step)
            logs["seconds"] = time.perf_counter() - begin
            for key, value in logs.items():
                history.setdefault(key, []).append(value)
            self._print_logs(logs)
            self._write_logs(logs)
            for callback in callbacks or ():
                if hasattr(callback, "on_epoch_end"):
                    callback.on_epoch_end(epoch, logs)
                else:
                    callback(epoch, logs)
        if persistent is not None:
            box, persistent, iterator = [persistent], None, None
            _release_in_background(box)
        return history

    def evaluate(self, ds, steps=None, *, use_ema=True) -> dict:
        """Means of the task's evaluation logs over `ds` (or its first `steps` batches), each
        batch weighted by its size, and the metrics. With `ema_decay`, the moving averages of
        the weights are evaluated (`use_ema=False`: the raw weights)."""
        if self.ema is not None and use_ema:
            with self.ema.swapped():
                return self.evaluate(ds, steps, use_ema=False)
        if steps is not None:
            steps = check_positive_int("steps", steps, owner="Trainer.evaluate")
        if self._eval_fn is None:
            self._eval_fn = self._build_eval_fn()
        self.task.reset_metrics()
        sums, count = {}, None
        iterator = iter(self._distribute(ds))
        try:
            for done, batch in enumerate(iterator):
                if steps is not None and done >= steps:
                    break
                with self._stepping():
                    logs, batch_count = self._eval_fn(batch)
                sums = {k: sums[k] + v if k in sums else v for k, v in logs.items()}
                count = batch_count if count is None else count + batch_count
        finally:
            box, iterator = [iterator], None
            _release_in_background(box)
        if count is None or float(count) == 0:
            raise ValueError("Trainer.evaluate: the dataset yielded no examples.")
        count = float(count)
        return {**{k: float(v) / count for k, v in sums.items()}, **self.task.metric_logs()}

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

    def _progress(self, description, total, completed=0):
        if not (self._show() and sys.stdout.isatty()):
            return contextlib.nullcontext(lambda logs, steps, count=1: None)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        every = self.progress_every

        @contextlib.contextmanager
        def bar():
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[shown]}"),
                transient=True,
            ) as progress:
                task = progress.add_task(description, total=total, completed=completed, shown="")

                def advance(logs, steps, count=1):
                    if (steps - 1) // every != (steps - count - 1) // every or every == 1:
                        # Reading a value waits for the device: only every `every` steps.
                        shown = ", ".join(f"{k} {float(v) / count:.4f}" for k, v in logs.items())
                        progress.update(task, advance=count, shown=shown)
                    else:
                        progress.update(task, advance=count)

                yield advance

        return bar()

    def _write_logs(self, logs):
        """Append the epoch's logs to `log_dir/history.csv` and TensorBoard, on the chief."""
        if self.log_dir is None or not is_chief(self.strategy):
            return
        os.makedirs(self.log_dir, exist_ok=True)
        path = os.path.join(self.log_dir, "history.csv")
        fields = list(logs)
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, newline="", encoding="utf-8") as f:
                fields = next(csv.reader(f))
            header = False
        else:
            header = True
        with open(path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if header:
                writer.writeheader()
            writer.writerow(logs)
        if self._summary_writer is None:
            self._summary_writer = tf.summary.create_file_writer(
                os.path.join(self.log_dir, "tensorboard")
            )
        # `tf.summary.scalar` lives in the tensorboard package; the core op with the scalars
        # plugin's metadata writes the same event without that dependency.
        from tensorflow.core.framework import summary_pb2

        metadata = summary_pb2.SummaryMetadata()
        metadata.plugin_data.plugin_name = "scalars"
        with self._summary_writer.as_default():
            for key, value in logs.items():
                if key != "epoch":
                    tf.summary.write(
                        key,
                        tf.constant(float(value), tf.float32),
                        step=int(logs["epoch"]),
                        metadata=metadata,
                    )
        self._summary_writer.flush()

    def _print_logs(self, logs):
        if not self._show():
            return
        parts = [f"{k} {v:.4f}" for k, v in logs.items() if k not in ("epoch", "seconds")]
        print(f"epoch {logs['epoch']}: " + ", ".join(parts) + f" ({logs['seconds']:.1f} s)")

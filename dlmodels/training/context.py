"""The distributed maths of one replica's training step, behind a small helper.

A `Task`'s `train_step(batch, ctx)` runs once per replica inside `strategy.run`. To give, summed
over replicas, exactly the gradients one device computes on the same global batch, every step
needs the same few pieces: the *global* batch size (static when known, else all-reduced),
per-example losses averaged over that global batch (`tf.nn.compute_average_loss`),
regularisation losses divided by the number of replicas, loss scaling under `mixed_float16`
with a skip decision all replicas agree on, and noise drawn for the whole global batch so that
two replicas see the rows one device would. `StepContext` holds them.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def _first_tensor(batch):
    flat = tf.nest.flatten(batch)
    if not flat:
        raise ValueError("StepContext: the batch holds no tensors.")
    return flat[0]


def _scale_gradient(grad, factor):
    if grad is None:
        return None
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(
            grad.values * tf.cast(factor, grad.values.dtype), grad.indices, grad.dense_shape
        )
    return grad * tf.cast(factor, grad.dtype)


def _all_finite(grads):
    checks = []
    for grad in grads:
        if grad is None:
            continue
        values = grad.values if isinstance(grad, tf.IndexedSlices) else grad
        checks.append(tf.reduce_all(tf.math.is_finite(values)))
    return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)


def _clipping_optimizer(optimizer):
    """The (inner) optimizer when it clips gradients, else None."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if any(getattr(inner, a, None) for a in ("clipnorm", "global_clipnorm", "clipvalue")):
        return inner
    return None


class StepContext:
    """Per-replica helper for one step: batch sizes, loss averaging, loss scaling, noise.

    Built by the `Trainer` inside `strategy.run` for each batch and passed to
    `Task.train_step(batch, ctx)` / `Task.eval_step(batch, ctx)`. Values a step returns as logs
    must be contributions that *sum* over replicas to the value of the global batch, which is
    what `average_loss` returns.

    Args:
        strategy: the `tf.distribute.Strategy` the step runs under.
        batch: this replica's batch (any nest; its first tensor's leading axis is the batch).
    """

    def __init__(self, strategy, batch):
        self.strategy = strategy
        self.num_replicas = int(strategy.num_replicas_in_sync)
        self._replica_context = tf.distribute.get_replica_context()
        first = _first_tensor(batch)
        self._static_local = first.shape[0]
        self._local = tf.shape(first)[0]
        self._global = None
        self._offset = None

    # -- batch sizes -------------------------------------------------------------------------
    @property
    def local_batch_size(self):
        """This replica's batch size: a Python int when static, else an int32 tensor."""
        return self._static_local if self._static_local is not None else self._local

    @property
    def global_batch_size(self):
        """The batch size over all replicas: static (`local * replicas`) when the per-replica
        shape is static (every replica then got the same share), else all-reduced, because the
        last partial batch splits unevenly."""
        if self._global is None:
            if self._static_local is not None:
                self._global = self._static_local * self.num_replicas
            elif self.num_replicas == 1:
                self._global = self._local
            else:
                self._global = self._replica_context.all_reduce(
                    tf.distribute.ReduceOp.SUM, self._local
                )
        return self._global

    @property
    def replica_id(self):
        """This replica's index in the sync group (0 .. replicas - 1, across workers)."""
        return self._replica_context.replica_id_in_sync_group

    @property
    def row_offset(self):
        """Index of this replica's first row in the global batch: the sum of the local batch
        sizes of the lower replicas (`replica_id * local` when static)."""
        if self._offset is None:
            if self.num_replicas == 1:
                self._offset = tf.constant(0, tf.int32)
            elif self._static_local is not None:
                rid = tf.cast(self.replica_id, tf.int32)
                self._offset = rid * self._static_local
            else:
                sizes = self._replica_context.all_gather(tf.reshape(self._local, [1]), axis=0)
                lower = tf.range(tf.shape(sizes)[0]) < tf.cast(self.replica_id, tf.int32)
                self._offset = tf.reduce_sum(tf.where(lower, sizes, tf.zeros_like(sizes)))
        return self._offset

    # -- losses ------------------------------------------------------------------------------
    def average_loss(self, per_example):
        """Sum of this replica's per-example losses divided by the *global* batch size
        (`tf.nn.compute_average_loss`), float32; summed over replicas it is the global mean."""
        per_example = tf.cast(per_example, tf.float32)
        if per_example.shape.rank != 1:
            raise ValueError(
                "StepContext.average_loss: expected one value per example, shape (batch,), got "
                f"shape {per_example.shape}. Reduce the other axes first (e.g. the mean over "
                "pixels)."
            )
        return tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch_size)

    def regularization_loss(self, *models):
        """The models' `losses` (weight regularisers, activity losses) divided by the number of
        replicas, so their gradient is counted once after the cross-replica sum; 0 without."""
        losses = [tf.cast(v, tf.float32) for m in models for v in m.losses]
        if not losses:
            return tf.constant(0.0, tf.float32)
        return tf.nn.scale_regularization_loss(tf.add_n(losses))

    # -- optimisation ------------------------------------------------------------------------
    def minimize(self, tape, loss, variables, optimizer):
        """Gradients of `loss` (recorded on `tape`) applied to `variables` by `optimizer`.

        With a `keras.optimizers.LossScaleOptimizer` the backward pass starts from the current
        loss scale (`output_gradients`, the same as differentiating `loss * scale`); the
        optimizer unscales after its cross-replica sum. Keras decides to skip a step from one
        replica's local gradients (before the all-reduce), so a non-finite gradient on another
        replica would reach the weights, or, under collectives, replicas would take different
        branches and hang. Here every replica first learns, through one scalar all-reduce,
        whether any replica's gradients are non-finite, and then all feed non-finite gradients:
        every replica makes the same skip / apply decision, the one Keras would make on the
        summed gradients.

        Returns:
            The gradients as computed on this replica (scaled under loss scaling).
        """
        variables = list(variables)
        scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        clipper = _clipping_optimizer(optimizer)
        if scaled:
            scale = optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
            grads = tape.gradient(
                loss, variables, output_gradients=tf.cast(scale, loss.dtype) * tf.ones_like(loss)
            )
        else:
            scale = None
            grads = tape.gradient(loss, variables)
        if clipper is not None and self.num_replicas > 1:
            grads = self._clip_summed(grads, clipper, scale)
        elif scaled and self.num_replicas > 1:
            bad = 1.0 - tf.cast(_all_finite(grads), tf.float32)
            bad = self._replica_context.all_reduce(tf.distribute.ReduceOp.SUM, bad)
            factor = tf.where(bad > 0.0, float("nan"), 1.0)
            grads = [_scale_gradient(g, factor) for g in grads]
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return grads

    def _clip_summed(self, grads, clipper, scale):
        """Clip the *summed* gradients, as one device would.

        Keras clips (`clipnorm`, `global_clipnorm`, `clipvalue`) before its cross-replica sum,
        i.e. each replica's partial gradient. Here the gradients are summed first, unscaled,
        clipped, rescaled and handed on divided by the number of replicas: the optimizer's own
        clip is then a no-op (every value is 1/N of an already clipped one) and its sum gives
        back the clipped total. Identical on all replicas, so skip decisions agree too. Costs
        a second all-reduce, only when clipping with several replicas.
        """
        dense = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        present = [i for i, g in enumerate(dense) if g is not None]
        summed = self._replica_context.all_reduce(
            tf.distribute.ReduceOp.SUM, [dense[i] for i in present]
        )
        if scale is not None:
            summed = [g / tf.cast(scale, g.dtype) for g in summed]
        clipped = clipper._clip_gradients(summed)
        if scale is not None:
            clipped = [g * tf.cast(scale, g.dtype) for g in clipped]
        out = list(grads)
        for i, g in zip(present, clipped, strict=True):
            out[i] = g / self.num_replicas
        return out

    # -- noise -------------------------------------------------------------------------------
    @staticmethod
    def seed(base_seed, counter, salt=0):
        """A stateless seed pair from a task seed, a step counter (e.g. `optimizer.iterations`)
        and a salt telling draws of one step apart: identical on every replica and after a
        restore, different every step."""
        pair = tf.stack([tf.constant(int(base_seed), tf.int64), tf.constant(int(salt), tf.int64)])
        return tf.random.experimental.stateless_fold_in(pair, tf.cast(counter, tf.int64))

    def _global_shape(self, shape):
        if not isinstance(shape, tf.Tensor):
            shape = [int(d) for d in shape]
        shape = tf.cast(tf.reshape(tf.convert_to_tensor(shape, tf.int32), [-1]), tf.int32)
        return tf.concat([tf.reshape(tf.cast(self.global_batch_size, tf.int32), [1]), shape], 0)

    def _local_rows(self, full):
        begin = tf.cast(self.row_offset, tf.int32)
        return full[begin : begin + tf.cast(self.local_batch_size, tf.int32)]

    def normal(self, shape, seed, dtype="float32"):
        """Standard normal noise `(local_batch,) + shape` for this replica: drawn for the whole
        global batch from `seed` and sliced at `row_offset`, so N replicas together draw exactly
        the rows one device draws, and no two replicas share a row."""
        full = tf.random.stateless_normal(
            self._global_shape(shape),
            seed=seed,
            dtype=dtype,
        )
        return self._local_rows(full)

    def uniform(self, shape, seed, dtype="float32"):
        """Uniform [0, 1) noise for this replica's rows, drawn like `normal`."""
        full = tf.random.stateless_uniform(
            self._global_shape(shape),
            seed=seed,
            dtype=dtype,
        )
        return self._local_rows(full)

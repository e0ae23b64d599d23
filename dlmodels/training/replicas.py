"""Per-replica state Keras 3 keeps apart under tf.distribute, and how the Trainer joins it.

Two kinds of Keras 3 state are created with aggregation "none", so every replica holds its own
copy and only replica 0's copy is saved or exported:

- `BatchNormalization` moving mean and variance: each replica normalises with its own batch
  moments and averages its own statistics, so replicas drift apart and evaluation depends on
  the replica. `synchronized_batch_norm` makes every BN layer all-reduce the batch moments
  while the Trainer's steps are traced, so the moments are those of the global batch (as on one
  device) and the moving statistics are identical everywhere. It uses `synced_moments`: two
  passes like `tf.nn.moments` (an all-reduce of [sum, count] for the mean, one of the squared
  deviations for the variance), where Keras' `synchronized=True` issues three all-reduces, sums
  a tensor of ones as large as the activations to count them and takes E[x^2] - E[x]^2.
- `keras.random.SeedGenerator` states: every replica draws the same dropout / stochastic depth
  masks. `fold_seeds_per_replica` adds the replica id to each state's key on each replica once,
  so the replicas draw independent masks (with one replica nothing changes).
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

SEED_FOLD_PRIME = 1_000_003
"""Replica r adds `r * SEED_FOLD_PRIME` to the key (first) element of every seed state."""


def layers_of(models):
    """Every layer inside `models` (the models themselves and nested blocks included), each
    once, in Keras' own traversal order."""
    seen = set()
    for model in models:
        for layer in model._flatten_layers(include_self=True, recursive=True):
            if id(layer) not in seen:
                seen.add(id(layer))
                yield layer


def batch_norm_layers(models):
    """Every `keras.layers.BatchNormalization` inside `models`, nested blocks included."""
    return [
        layer for layer in layers_of(models) if isinstance(layer, keras.layers.BatchNormalization)
    ]


def synced_moments(x, axes):
    """Mean and variance of `x` over `axes` across all replicas of the current replica context,
    with one all-reduce and no cancellation: each replica takes its own count, mean and sum of
    squared deviations M2 (two passes over its data, like `tf.nn.moments`) and writes them into
    its row of a [replicas, 1 + 2 * channels] table; one all-reduce (a sum of tables that are
    zero outside each replica's row) gives every replica all rows, and the rows are combined
    with the parallel-variance formula (Chan, Golub and LeVeque, "Updating Formulae and a
    Pairwise Algorithm for Computing Sample Variances", 1979): mean = sum(n_r m_r) / N,
    M2 = sum(M2_r) + sum(n_r (m_r - mean)^2). (Keras' `synchronized=True` uses E[x^2] - E[x]^2,
    three all-reduces and a reduction over a tensor of ones as large as the activations; in
    float32 that difference cancels to 0 when the mean is large against the spread, e.g.
    1000 + N(0, 0.01^2) gives variance 0.) 16-bit inputs are computed in float32, and the
    results clipped and cast back, as Keras' `ops.moments` does. Outside a replica context (or
    with one replica) it is `tf.nn.moments`.

    Args:
        x: a tensor.
        axes: the axes reduced (the others are kept, e.g. the channels).

    Returns:
        (mean, variance), with the reduced axes dropped.
    """
    axes = [a % x.shape.rank for a in axes]
    dtype = x.dtype
    if dtype in (tf.float16, tf.bfloat16):
        x = tf.cast(x, tf.float32)
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        mean, variance = tf.nn.moments(x, axes)
    else:
        local_sum = tf.reduce_sum(x, axis=axes, keepdims=True)
        kept_shape = tf.shape(local_sum)
        # int64 product: exact past 2**24 elements per replica.
        count = tf.cast(tf.reduce_prod(tf.cast(tf.gather(tf.shape(x), axes), tf.int64)), x.dtype)
        local_mean = tf.math.divide_no_nan(local_sum, count)  # 0 for an empty replica batch
        # d/dx sum((x - m)^2) through m is 0 (the deviations sum to 0), as in tf.nn.moments.
        local_m2 = tf.reduce_sum(
            tf.square(x - tf.stop_gradient(local_mean)), axis=axes, keepdims=True
        )
        row = tf.concat([[count], tf.reshape(local_mean, [-1]), tf.reshape(local_m2, [-1])], 0)
        mine = tf.one_hot(ctx.replica_id_in_sync_group, ctx.num_replicas_in_sync, dtype=x.dtype)
        table = ctx.all_reduce(tf.distribute.ReduceOp.SUM, mine[:, None] * row[None, :])
        counts, stats = table[:, :1], table[:, 1:]
        means, m2s = tf.split(stats, 2, axis=1)
        total_count = tf.reduce_sum(counts)
        mean = tf.math.divide_no_nan(tf.reduce_sum(counts * means, 0), total_count)
        m2 = tf.reduce_sum(m2s, 0) + tf.reduce_sum(counts * tf.square(means - mean), 0)
        mean = tf.reshape(mean, kept_shape)
        variance = tf.reshape(tf.math.divide_no_nan(m2, total_count), kept_shape)
        mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
    if dtype in (tf.float16, tf.bfloat16):
        mean = tf.cast(tf.clip_by_value(mean, tf.float16.min, tf.float16.max), dtype)
        variance = tf.cast(tf.clip_by_value(variance, tf.float16.min, tf.float16.max), dtype)
    return mean, variance


def _synced_moments_method(layer):
    """A `_moments(inputs, mask)` for one BatchNormalization layer: `synced_moments` without a
    mask; with a mask, the layer's own (Keras, `synchronized=True`) computation."""
    original = type(layer)._moments

    def _moments(inputs, mask):
        if mask is not None:
            return original(layer, inputs, mask)
        return synced_moments(inputs, layer._reduction_axes)

    return _moments


@contextlib.contextmanager
def synchronized_batch_norm(models, enabled=True):
    """Run every BatchNormalization in `models` with synchronized batch moments inside the block.

    Keras reads the layer when a step is traced, so wrapping every call of a `tf.function` step
    makes all its traces all-reduce the batch moments across replicas (`synced_moments`, one
    all-reduce per layer; masked inputs and subclasses with their own `_moments` go through
    Keras' `synchronized=True`). The previous
    state is restored on exit, so saved configs (`get_config`) do not change.

    Args:
        models: Keras models (or layers) to walk.
        enabled: when False, do nothing.

    Yields:
        The BatchNormalization layers switched (empty when disabled).
    """
    layers = batch_norm_layers(models) if enabled else []
    previous = [layer.synchronized for layer in layers]
    overridden = []
    try:
        for layer in layers:
            layer.synchronized = True
        for layer in layers:
            # Layers with their own moments (a subclass' `_moments`) keep Keras' synchronized
            # version of them.
            own = type(layer)._moments is not keras.layers.BatchNormalization._moments
            if "_moments" in vars(layer) or own:
                continue
            object.__setattr__(layer, "_moments", _synced_moments_method(layer))
            overridden.append(layer)
        yield layers
    finally:
        for layer in overridden:
            object.__delattr__(layer, "_moments")
        for layer, flag in zip(layers, previous, strict=True):
            layer.synchronized = flag


def seed_state_variables(models):
    """The state variables of every `keras.random.SeedGenerator` the models' layers own (found
    through the layers' seed generators and, for generators they do not register, by the
    `seed_generator_state` variable name)."""
    found, seen = [], set()

    def add(variable):
        key = id(getattr(variable, "value", variable))
        if key not in seen:
            seen.add(key)
            found.append(variable)

    for layer in layers_of(models):
        for generator in getattr(layer, "_seed_generators", None) or ():
            add(generator.state)
    for model in models:
        for variable in model.variables:
            if "seed_generator_state" in variable.path:
                add(variable)
    return found


def fold_seeds_per_replica(strategy, models):
    """Give each replica its own random stream: replica r adds `r * SEED_FOLD_PRIME` to the key
    of every seed-generator state in `models`, on its own copy (aggregation "none" allows a
    per-replica assign in replica context). Replica 0 is unchanged, so checkpoints (which save
    replica 0's copy) hold the unfolded state; fold again after every restore.

    Args:
        strategy: the strategy the models were built under.
        models: Keras models whose seed generators to fold.

    Returns:
        The number of seed states folded (0 with one replica).
    """
    variables = seed_state_variables(models)
    if strategy.num_replicas_in_sync == 1 or not variables:
        return 0

    def fold():
        rid = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.int64)
        for variable in variables:
            state = variable.value
            state.assign(state + tf.cast(tf.stack([rid * SEED_FOLD_PRIME, 0 * rid]), state.dtype))

    strategy.run(tf.function(fold))
    return len(variables)

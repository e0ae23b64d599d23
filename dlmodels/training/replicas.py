"""Per-replica state Keras 3 keeps apart under tf.distribute, and how the Trainer joins it.

Two kinds of Keras 3 state are created with aggregation "none", so every replica holds its own
copy and only replica 0's copy is saved or exported:

- `BatchNormalization` moving mean and variance: each replica normalises with its own batch
  moments and averages its own statistics, so replicas drift apart and evaluation depends on
  the replica. `synchronized_batch_norm` makes every BN layer all-reduce the batch moments
  (Keras' `synchronized=True`) while the Trainer's steps are traced, so the moments are those of
  the global batch (as on one device) and the moving statistics are identical everywhere.
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


def _layers(models):
    seen = set()
    for model in models:
        for layer in model._flatten_layers(include_self=True, recursive=True):
            if id(layer) not in seen:
                seen.add(id(layer))
                yield layer


def batch_norm_layers(models):
    """Every `keras.layers.BatchNormalization` inside `models`, nested blocks included."""
    return [
        layer for layer in _layers(models) if isinstance(layer, keras.layers.BatchNormalization)
    ]


@contextlib.contextmanager
def synchronized_batch_norm(models, enabled=True):
    """Run every BatchNormalization in `models` with `synchronized=True` inside the block.

    Keras reads the flag when a step is traced, so wrapping every call of a `tf.function` step
    makes all its traces all-reduce the batch moments across replicas. The previous flags are
    restored on exit, so saved configs (`get_config`) do not change.

    Args:
        models: Keras models (or layers) to walk.
        enabled: when False, do nothing.

    Yields:
        The BatchNormalization layers switched (empty when disabled).
    """
    layers = batch_norm_layers(models) if enabled else []
    previous = [layer.synchronized for layer in layers]
    try:
        for layer in layers:
            layer.synchronized = True
        yield layers
    finally:
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

    for layer in _layers(models):
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

"""The reparameterisation trick as a layer: `z = mu + exp(0.5 * log_var) * eps`."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="dlmodels")
class Sampling(keras.layers.Layer):
    """Draw `z ~ N(mu, diag(exp(log_var)))` as `mu + exp(0.5 * log_var) * eps`, `eps ~ N(0, I)`.

    The reparameterisation trick of Kingma & Welling 2014 ("Auto-Encoding Variational Bayes",
    ICLR): the noise is an input of a deterministic function of `mu` and `log_var`, so gradients
    of a loss on `z` reach both. The noise comes from the layer's `keras.random.SeedGenerator`;
    under several replicas the dlmodels `Trainer` folds the replica id into it, so replicas draw
    different noise. (The `VAETask` draws its own noise through the step context instead, which
    is exact under any number of replicas.)

    At inference (`training=False`) the layer returns `mu` when `mean_at_inference` is True (the
    default: deterministic reconstructions and exports); with False it samples there too.

    Args:
        mean_at_inference: return `mu` when not training.
        seed: seed of the noise stream (None: from Keras' global seed).

    Call args:
        inputs: `[mu, log_var]`, two tensors of the same shape.
        training: whether to sample (True) or, with `mean_at_inference`, return `mu`.

    Returns:
        `z`, shaped like `mu`.
    """

    def __init__(self, mean_at_inference=True, seed=None, **kwargs):
        super().__init__(**kwargs)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"Sampling: `seed`={seed!r} must be an int or None (e.g. seed=0).")
        self.mean_at_inference = bool(mean_at_inference)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _split(self, inputs):
        if not isinstance(inputs, list | tuple) or len(inputs) != 2:
            raise ValueError(
                "Sampling: call it on [mu, log_var] (two tensors of the same shape), got "
                f"{type(inputs).__name__}."
            )
        mu, log_var = inputs
        if tuple(mu.shape[1:]) != tuple(log_var.shape[1:]):
            raise ValueError(
                f"Sampling: mu {tuple(mu.shape)} and log_var {tuple(log_var.shape)} must have "
                "the same shape."
            )
        return mu, log_var

    def call(self, inputs, training=None):
        mu, log_var = self._split(inputs)
        if not training and self.mean_at_inference:
            return mu
        eps = keras.random.normal(ops.shape(mu), dtype=self.compute_dtype, seed=self.seed_generator)
        return mu + ops.exp(0.5 * ops.cast(log_var, mu.dtype)) * ops.cast(eps, mu.dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        return {
            **super().get_config(),
            "mean_at_inference": self.mean_at_inference,
            "seed": self.seed,
        }

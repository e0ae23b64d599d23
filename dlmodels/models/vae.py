"""Variational auto-encoder (Kingma & Welling 2014) with functional encoder / decoder for export."""

from __future__ import annotations

import keras
import numpy as np

from dlmodels._validation import check_choice, check_positive_int
from dlmodels.errors import UserError
from dlmodels.layers.sampling import Sampling
from dlmodels.models.registry import register

ARCHITECTURES = ("dense", "conv")
LIKELIHOODS = ("bernoulli", "gaussian")


def check_image_shape(input_shape, owner):
    """(H, W, C) of positive ints, or a ValueError naming the argument."""
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(
            f"{owner}: `input_shape`={input_shape!r} must be (height, width, channels) of "
            "positive ints, e.g. (8, 8, 1) for the digits."
        )
    return shape


def check_images(x, input_shape, owner):
    """`x` as float32 `(N,) + input_shape`, or a ValueError saying what was expected."""
    x = np.asarray(x, dtype="float32")
    if x.ndim == len(input_shape):
        x = x[None]
    if x.ndim != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape):
        raise UserError(
            f"{owner}: images of shape {x.shape} do not match the model's input "
            f"{tuple(input_shape)}; pass an array of shape (N, {', '.join(map(str, input_shape))})."
        )
    return x


def _dense_encoder(x, hidden):
    x = keras.layers.Flatten(name="flatten")(x)
    for i, units in enumerate(hidden):
        x = keras.layers.Dense(units, activation="relu", name=f"enc_dense{i + 1}")(x)
    return x


def _conv_encoder(x, filters):
    for i, f in enumerate(filters):
        x = keras.layers.Conv2D(
            f, 3, strides=2, padding="same", activation="relu", name=f"enc_conv{i + 1}"
        )(x)
    return keras.layers.Flatten(name="flatten")(x)


@register(
    "vae",
    task="generative",
    paper="Kingma & Welling 2014, Auto-Encoding Variational Bayes (ICLR)",
)
@keras.saving.register_keras_serializable(package="dlmodels")
class VAE(keras.Model):
    """Variational auto-encoder (Kingma & Welling 2014, "Auto-Encoding Variational Bayes",
    ICLR; `beta` > 1 is the beta-VAE of Higgins et al. 2017).

    A diagonal Gaussian encoder `q(z|x)` gives `(mu, log_var)`; `Sampling` draws
    `z = mu + exp(0.5 log_var) eps` (the reparameterisation trick); the decoder gives the
    likelihood's parameters: Bernoulli logits (pixels in [0, 1]) or a unit-variance Gaussian
    mean. The training objective, the negative ELBO, is `VAETask` (`vae.task()`), which draws
    epsilon for the global batch so training under tf.distribute equals one device.

    For export the model exposes two functional sub-models without random ops: `encoder`
    (`image -> [mu, log_var]`) and `decoder` (`z -> logits` or mean). Calling the VAE itself
    encodes, samples (training) or takes the mean (inference) and decodes.

    Args:
        input_shape: image shape (H, W, C); "conv" needs H and W divisible by
            2 ** len(filters).
        latent_dim: size of z (>= 1).
        architecture: "dense" (MLP, `hidden_units`) or "conv" (strided convolutions, `filters`,
            mirrored by transposed convolutions).
        hidden_units: widths of the dense encoder's layers (decoder: reversed).
        filters: filters of the conv encoder's layers (decoder: reversed).
        beta: weight of the KL term used by `task()` (>= 0).
        likelihood: "bernoulli" (decoder returns logits) or "gaussian" (returns the mean).
        seed: seed of the `Sampling` layer and the default of `task()` / `sample()`.
        name: model name.

    Raises:
        ValueError: `latent_dim` <= 0, a bad shape, architecture or likelihood.
    """

    def __init__(
        self,
        input_shape=(8, 8, 1),
        latent_dim=8,
        architecture="dense",
        hidden_units=(256, 128),
        filters=(32, 64),
        beta=1.0,
        likelihood="bernoulli",
        seed=0,
        name="vae",
        **kwargs,
    ):
        owner = "VAE"
        shape = check_image_shape(input_shape, owner)
        latent_dim = check_positive_int("latent_dim", latent_dim, owner=owner)
        architecture = check_choice("architecture", architecture, ARCHITECTURES, owner=owner)
        likelihood = check_choice("likelihood", likelihood, LIKELIHOODS, owner=owner)
        hidden_units = tuple(
            check_positive_int("hidden_units", u, owner=owner) for u in hidden_units
        )
        filters = tuple(check_positive_int("filters", f, owner=owner) for f in filters)
        if isinstance(beta, bool) or not isinstance(beta, int | float) or beta < 0:
            raise UserError(f"VAE: `beta`={beta!r} must be a number >= 0 (e.g. beta=1.0).")
        factor = 2 ** len(filters)
        if architecture == "conv" and (not filters or shape[0] % factor or shape[1] % factor):
            raise UserError(
                f"VAE: architecture='conv' with filters={filters} halves the image "
                f"{len(filters)} times, so height and width must be divisible by {factor}; got "
                f"input_shape={shape}. Pad the images or use fewer filters."
            )
        encoder, decoder = self._build_parts(
            shape, latent_dim, architecture, hidden_units, filters, likelihood, name
        )
        image = keras.Input(shape, name="image")
        mu, log_var = encoder(image)
        sampling = Sampling(seed=seed, name="sampling")
        outputs = decoder(sampling([mu, log_var]))
        super().__init__(inputs=image, outputs=outputs, name=name, **kwargs)
        self.encoder, self.decoder, self.sampling = encoder, decoder, sampling
        self.image_shape = shape
        self.latent_dim = latent_dim
        self.architecture = architecture
        self.hidden_units = hidden_units
        self.filters = filters
        self.beta = float(beta)
        self.likelihood = likelihood
        self.seed = seed

    @staticmethod
    def _build_parts(shape, latent_dim, architecture, hidden_units, filters, likelihood, name):
        image = keras.Input(shape, name="image")
        if architecture == "dense":
            h = _dense_encoder(image, hidden_units)
        else:
            h = _conv_encoder(image, filters)
        mu = keras.layers.Dense(latent_dim, name="mu", dtype="float32")(h)
        log_var = keras.layers.Dense(latent_dim, name="log_var", dtype="float32")(h)
        encoder = keras.Model(image, [mu, log_var], name=f"{name}_encoder")

        z = keras.Input((latent_dim,), name="z")
        out_name = "logits" if likelihood == "bernoulli" else "mean"
        if architecture == "dense":
            h = z
            for i, units in enumerate(reversed(hidden_units)):
                h = keras.layers.Dense(units, activation="relu", name=f"dec_dense{i + 1}")(h)
            h = keras.layers.Dense(int(np.prod(shape)), name="dec_out", dtype="float32")(h)
            out = keras.layers.Reshape(shape, name=out_name, dtype="float32")(h)
        else:
            factor = 2 ** len(filters)
            base = (shape[0] // factor, shape[1] // factor, filters[-1])
            h = keras.layers.Dense(int(np.prod(base)), activation="relu", name="dec_dense")(z)
            h = keras.layers.Reshape(base, name="dec_reshape")(h)
            for i, f in enumerate(reversed(filters[:-1])):
                h = keras.layers.Conv2DTranspose(
                    f, 3, strides=2, padding="same", activation="relu", name=f"dec_deconv{i + 1}"
                )(h)
            out = keras.layers.Conv2DTranspose(
                shape[-1], 3, strides=2, padding="same", name=out_name, dtype="float32"
            )(h)
        decoder = keras.Model(z, out, name=f"{name}_decoder")
        return encoder, decoder

    # -- training ----------------------------------------------------------------------------
    def task(self, optimizer=None, seed=None):
        """A `dlmodels.training.VAETask` for this VAE (its beta and likelihood): the negative
        ELBO averaged over the global batch, for `Trainer(vae.task(...), strategy=...)`."""
        from dlmodels.training import VAETask

        return VAETask(
            self.encoder,
            self.decoder,
            optimizer=optimizer,
            beta=self.beta,
            likelihood=self.likelihood,
            seed=self.seed if seed is None else seed,
        )

    # -- inference ---------------------------------------------------------------------------
    def _mean_image(self, out):
        out = np.asarray(out, dtype="float32")
        if self.likelihood == "bernoulli":
            return 1.0 / (1.0 + np.exp(-out))
        return out

    def encode(self, x, batch_size=256):
        """`(mu, log_var)` numpy arrays for images `(N, H, W, C)`."""
        x = check_images(x, self.image_shape, "VAE.encode")
        mu, log_var = self.encoder.predict(x, batch_size=batch_size, verbose=0)
        return np.asarray(mu), np.asarray(log_var)

    def decode(self, z, batch_size=256):
        """Mean images (Bernoulli: sigmoid of the logits) for latents `(N, latent_dim)`."""
        z = np.asarray(z, dtype="float32")
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise UserError(f"VAE.decode: z has shape {z.shape}; expected (N, {self.latent_dim}).")
        return self._mean_image(self.decoder.predict(z, batch_size=batch_size, verbose=0))

    def reconstruct(self, x, batch_size=256):
        """Mean reconstructions of images `(N, H, W, C)`: decode the posterior mean."""
        mu, _ = self.encode(x, batch_size)
        return self.decode(mu, batch_size)

    def sample(self, n, seed=None):
        """`n` images decoded from prior draws `z ~ N(0, I)` (numpy, seeded)."""
        n = check_positive_int("n", n, owner="VAE.sample")
        rng = np.random.default_rng(self.seed if seed is None else seed)
        return self.decode(rng.standard_normal((n, self.latent_dim)).astype("float32"))

    def get_config(self):
        return {
            "input_shape": list(self.image_shape),
            "latent_dim": self.latent_dim,
            "architecture": self.architecture,
            "hidden_units": list(self.hidden_units),
            "filters": list(self.filters),
            "beta": self.beta,
            "likelihood": self.likelihood,
            "seed": self.seed,
            "name": self.name,
            "trainable": self.trainable,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

"""Conditional GAN (Mirza & Osindero 2014) with DCGAN-style generator and discriminator."""

from __future__ import annotations

import keras
import numpy as np

from dlmodels._validation import check_choice, check_positive_int
from dlmodels.errors import UserError
from dlmodels.models.registry import register
from dlmodels.models.vae import check_image_shape

CONDITIONINGS = ("projection", "label_map")
GAN_LOSSES = ("non_saturating", "minimax", "wgan_gp")
NORMS = ("batch", "layer", None)


def check_labels(labels, num_classes, owner):
    """Labels as int32 `(N,)` in [0, num_classes), or a ValueError naming the bad values."""
    labels = np.asarray(labels)
    if labels.ndim == 0:
        labels = labels[None]
    if labels.ndim != 1 or not (
        np.issubdtype(labels.dtype, np.integer)
        or (np.issubdtype(labels.dtype, np.floating) and np.all(np.mod(labels, 1) == 0))
    ):
        raise UserError(
            f"{owner}: `labels` must be a 1-D array of integer class ids, got shape "
            f"{labels.shape} dtype {labels.dtype}."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = sorted({int(v) for v in labels if v < 0 or v >= num_classes})[:5]
        raise UserError(
            f"{owner}: labels {bad} lie outside [0, {num_classes}); the model has "
            f"{num_classes} classes, so pass class ids 0..{num_classes - 1}."
        )
    return labels.astype("int32")


def _norm(kind, name):
    if kind == "batch":
        return keras.layers.BatchNormalization(momentum=0.9, name=name)
    if kind == "layer":
        return keras.layers.LayerNormalization(name=name)
    return None


@register(
    "cgan",
    task="generative",
    paper="Mirza & Osindero 2014, Conditional Generative Adversarial Nets (arXiv:1411.1784)",
)
@keras.saving.register_keras_serializable(package="dlmodels")
class ConditionalGAN(keras.Model):
    """Conditional GAN (Mirza & Osindero 2014, "Conditional Generative Adversarial Nets",
    arXiv:1411.1784) with DCGAN-style convolutional networks (Radford et al. 2016, ICLR).

    Generator: `z` concatenated with a learned label embedding, a dense projection to a
    `(H / 2**k, W / 2**k, filters[0])` map, then `k = len(filters)` stride-2 transposed
    convolutions with batch norm and ReLU; a sigmoid output gives images in [0, 1] (the range
    of `dlmodels.data.digits`). Discriminator: stride-2 convolutions with LeakyReLU(0.2), then
    one logit. Its label conditioning is "projection" (Miyato & Koyama 2018, "cGANs with
    Projection Discriminator", ICLR: `logit = w . h + embed(y) . h`) or "label_map" (the label
    embedded as an extra image channel, as in Mirza & Osindero). Losses (`loss`, used by
    `task()`): "non_saturating" and "minimax" (Goodfellow et al. 2014) or "wgan_gp" (Gulrajani
    et al. 2017, "Improved Training of Wasserstein GANs", NeurIPS: critic without batch norm).

    Calling the model runs the generator on `[z, labels]`. The functional `generator`
    (`[z, label] -> image`) holds no random op: it is what gets exported; `discriminator`
    (`[image, label] -> logit`) is used for training. Train with
    `Trainer(cgan.task(), strategy=...)`, which is exact under tf.distribute (global-batch
    averaging, latents drawn for the global batch, two optimizers).

    Args:
        input_shape: image shape (H, W, C); H and W divisible by 2 ** len(filters).
        num_classes: number of label classes.
        latent_dim: size of z.
        embedding_dim: size of the generator's label embedding.
        filters: generator filters from coarse to fine (the discriminator uses them reversed).
        conditioning: "projection" or "label_map" for the discriminator.
        loss: "non_saturating", "minimax" or "wgan_gp".
        discriminator_norm: "batch", "layer" or None (default: "batch", None for "wgan_gp").
        gp_weight: gradient-penalty weight for "wgan_gp".
        seed: default seed of `task()` and `sample()`.
        name: model name.

    Raises:
        ValueError: `latent_dim` <= 0, a bad shape, conditioning or loss.
    """

    def __init__(
        self,
        input_shape=(8, 8, 1),
        num_classes=10,
        latent_dim=32,
        embedding_dim=16,
        filters=(128, 64),
        conditioning="projection",
        loss="non_saturating",
        discriminator_norm="auto",
        gp_weight=10.0,
        seed=0,
        name="cgan",
        **kwargs,
    ):
        owner = "ConditionalGAN"
        shape = check_image_shape(input_shape, owner)
        num_classes = check_positive_int("num_classes", num_classes, owner=owner)
        latent_dim = check_positive_int("latent_dim", latent_dim, owner=owner)
        embedding_dim = check_positive_int("embedding_dim", embedding_dim, owner=owner)
        filters = tuple(check_positive_int("filters", f, owner=owner) for f in filters)
        conditioning = check_choice("conditioning", conditioning, CONDITIONINGS, owner=owner)
        loss = check_choice("loss", loss, GAN_LOSSES, owner=owner)
        if discriminator_norm == "auto":
            discriminator_norm = None if loss == "wgan_gp" else "batch"
        discriminator_norm = check_choice(
            "discriminator_norm", discriminator_norm, NORMS, owner=owner
        )
        if loss == "wgan_gp" and discriminator_norm == "batch":
            raise UserError(
                "ConditionalGAN: loss='wgan_gp' penalises the critic's gradient per example, "
                "which batch norm breaks (Gulrajani et al. 2017); use "
                "discriminator_norm='layer' or None."
            )
        factor = 2 ** len(filters)
        if not filters or shape[0] % factor or shape[1] % factor:
            raise UserError(
                f"ConditionalGAN: filters={filters} upsample {len(filters)} times, so height "
                f"and width must be divisible by {factor}; got input_shape={shape}."
            )
        generator = self._generator(shape, num_classes, latent_dim, embedding_dim, filters, name)
        discriminator = self._discriminator(
            shape, num_classes, filters, conditioning, discriminator_norm, name
        )
        z = keras.Input((latent_dim,), name="z")
        label = keras.Input((), dtype="int32", name="label")
        super().__init__(inputs=[z, label], outputs=generator([z, label]), name=name, **kwargs)
        self.generator, self.discriminator = generator, discriminator
        self.image_shape = shape
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.embedding_dim = embedding_dim
        self.filters = filters
        self.conditioning = conditioning
        self.gan_loss = loss
        self.discriminator_norm = discriminator_norm
        self.gp_weight = float(gp_weight)
        self.seed = seed

    @staticmethod
    def _generator(shape, num_classes, latent_dim, embedding_dim, filters, name):
        z = keras.Input((latent_dim,), name="z")
        label = keras.Input((), dtype="int32", name="label")
        embedded = keras.layers.Embedding(num_classes, embedding_dim, name="g_label_embedding")(
            label
        )
        h = keras.layers.Concatenate(name="g_concat")([z, embedded])
        factor = 2 ** len(filters)
        base = (shape[0] // factor, shape[1] // factor, filters[0])
        h = keras.layers.Dense(int(np.prod(base)), use_bias=False, name="g_project")(h)
        h = keras.layers.BatchNormalization(momentum=0.9, name="g_project_bn")(h)
        h = keras.layers.ReLU(name="g_project_relu")(h)
        h = keras.layers.Reshape(base, name="g_reshape")(h)
        for i, f in enumerate(filters[1:]):
            h = keras.layers.Conv2DTranspose(
                f, 4, strides=2, padding="same", use_bias=False, name=f"g_up{i + 1}"
            )(h)
            h = keras.layers.BatchNormalization(momentum=0.9, name=f"g_up{i + 1}_bn")(h)
            h = keras.layers.ReLU(name=f"g_up{i + 1}_relu")(h)
        h = keras.layers.Conv2DTranspose(
            shape[-1], 4, strides=2, padding="same", name="g_out", dtype="float32"
        )(h)
        image = keras.layers.Activation("sigmoid", name="image", dtype="float32")(h)
        return keras.Model([z, label], image, name=f"{name}_generator")

    @staticmethod
    def _discriminator(shape, num_classes, filters, conditioning, norm, name):
        image = keras.Input(shape, name="image")
        label = keras.Input((), dtype="int32", name="label")
        h = image
        if conditioning == "label_map":
            plane = keras.layers.Embedding(num_classes, shape[0] * shape[1], name="d_label_map")(
                label
            )
            plane = keras.layers.Reshape((shape[0], shape[1], 1), name="d_label_plane")(plane)
            h = keras.layers.Concatenate(name="d_concat")([h, plane])
        for i, f in enumerate(reversed(filters)):
            h = keras.layers.Conv2D(f, 3, strides=2, padding="same", name=f"d_conv{i + 1}")(h)
            layer = _norm(norm, f"d_conv{i + 1}_norm") if i > 0 else None
            if layer is not None:
                h = layer(h)
            h = keras.layers.LeakyReLU(0.2, name=f"d_conv{i + 1}_act")(h)
        h = keras.layers.Flatten(name="d_flatten")(h)
        logit = keras.layers.Dense(1, name="d_linear", dtype="float32")(h)
        if conditioning == "projection":
            embedded = keras.layers.Embedding(
                num_classes, int(h.shape[-1]), name="d_label_embedding"
            )(label)
            projection = keras.layers.Dot(axes=1, name="d_projection", dtype="float32")(
                [h, embedded]
            )
            logit = keras.layers.Add(name="logit", dtype="float32")([logit, projection])
        return keras.Model([image, label], logit, name=f"{name}_discriminator")

    # -- training ----------------------------------------------------------------------------
    def task(self, g_optimizer=None, d_optimizer=None, seed=None, d_steps=1):
        """A conditional `dlmodels.training.GANTask` for this model's generator and
        discriminator with its loss (and gradient penalty for "wgan_gp")."""
        from dlmodels.training import GANTask

        return GANTask(
            self.generator,
            self.discriminator,
            g_optimizer,
            d_optimizer,
            latent_dim=self.latent_dim,
            loss=self.gan_loss,
            conditional=True,
            gp_weight=self.gp_weight,
            d_steps=d_steps,
            seed=self.seed if seed is None else seed,
        )

    # -- inference ---------------------------------------------------------------------------
    def generate(self, z, labels, batch_size=256):
        """Images for latents `(N, latent_dim)` and labels `(N,)` (numpy)."""
        labels = check_labels(labels, self.num_classes, "ConditionalGAN.generate")
        z = np.asarray(z, dtype="float32")
        if z.ndim != 2 or z.shape != (len(labels), self.latent_dim):
            raise UserError(
                f"ConditionalGAN.generate: z has shape {z.shape}; expected "
                f"({len(labels)}, {self.latent_dim}) for {len(labels)} labels."
            )
        return np.asarray(self.generator.predict([z, labels], batch_size=batch_size, verbose=0))

    def sample(self, labels, seed=None):
        """Images for class ids `labels` (an int or a sequence), with `z ~ N(0, I)` drawn in
        numpy (seeded): the generator itself draws nothing."""
        labels = check_labels(labels, self.num_classes, "ConditionalGAN.sample")
        rng = np.random.default_rng(self.seed if seed is None else seed)
        z = rng.standard_normal((len(labels), self.latent_dim)).astype("float32")
        return self.generate(z, labels)

    def get_config(self):
        return {
            "input_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "latent_dim": self.latent_dim,
            "embedding_dim": self.embedding_dim,
            "filters": list(self.filters),
            "conditioning": self.conditioning,
            "loss": self.gan_loss,
            "discriminator_norm": self.discriminator_norm,
            "gp_weight": self.gp_weight,
            "seed": self.seed,
            "name": self.name,
            "trainable": self.trainable,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

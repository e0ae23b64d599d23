"""A tiny functional segmenter and calibration-like images for the export and bench tests."""

from __future__ import annotations

import keras
import numpy as np

from dlmodels.layers import ConvNormAct

IMAGE_SHAPE = (16, 16, 3)
NUM_CLASSES = 3


def _randomize_norm_stats(model, seed):
    """Fresh BatchNorm layers are the identity (mean 0, var 1, gamma 1, beta 0), which would hide
    a wrongly exported normalization; give them non-trivial statistics."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        shape = tuple(v.shape)
        if v.path.endswith("moving_variance"):
            v.assign(rng.uniform(0.5, 1.5, shape).astype("float32"))
        elif v.path.endswith("moving_mean"):
            v.assign(rng.normal(0, 0.1, shape).astype("float32"))
        elif v.path.endswith("gamma"):
            v.assign(rng.uniform(0.8, 1.2, shape).astype("float32"))
        elif v.path.endswith("beta"):
            v.assign(rng.normal(0, 0.1, shape).astype("float32"))


def tiny_segmenter(seed=0, *, filters=16, second_head=False, name="tiny"):
    """16x16x3 `image` -> a few ConvNormAct -> 1x1 conv to 3 classes named `logits`
    (optionally a second, classification head `label`)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input(IMAGE_SHAPE, name="image")
    x = ConvNormAct(filters, 3, name="stem")(inp)
    x = ConvNormAct(filters, 3, strides=2, name="down")(x)
    x = ConvNormAct(filters, 3, name="mid")(x)
    x = keras.layers.UpSampling2D(2, interpolation="bilinear", name="up")(x)
    x = ConvNormAct(filters, 3, name="head")(x)
    logits = keras.layers.Conv2D(NUM_CLASSES, 1, name="logits")(x)
    outputs = [logits]
    if second_head:
        pooled = keras.layers.GlobalAveragePooling2D(name="pool")(x)
        outputs.append(keras.layers.Dense(4, name="label")(pooled))
    model = keras.Model(inp, outputs if second_head else logits, name=name)
    _randomize_norm_stats(model, seed)
    return model


def images(n, seed=0):
    """Calibration-like inputs: smooth blobs in [0, 1] like the shapes data, not white noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : IMAGE_SHAPE[0], 0 : IMAGE_SHAPE[1]] / IMAGE_SHAPE[0]
    out = np.empty((n, *IMAGE_SHAPE), dtype="float32")
    for i in range(n):
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.4)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
        color = rng.uniform(0, 1, 3)
        out[i] = 0.1 * rng.uniform(0, 1, IMAGE_SHAPE) + mask[..., None] * color
    return out

"""Synthetic shapes for generative models: one white shape on black per image, with its class.

The second data set of the VAE and the conditional GAN next to `dlmodels.data.digits`. The
segmentation set (`dlmodels.data.shapes`) draws 1..4 overlapping shapes in random colours on a
noisy, coloured background, which gives no single class per image; here every image holds
exactly ONE shape, drawn by the same rasteriser (`shapes._draw_shape`: same size, aspect and
placement rules), so its label is unambiguous:

- images: float32 `(N, H, W, 1)` in [0, 1], a grayscale silhouette (1 inside, 0 outside),
  anti-aliased by `supersample`-fold supersampling (edge pixels hold the covered fraction),
  like the 8x8 digits' [0, 1] intensities; no background colour, gradient or noise;
- labels: int32 `(N,)`, 0 circle, 1 rectangle, 2 triangle (`CLASS_NAMES`), uniform at random.

Image `i` of a split depends only on (seed, split, i), so smaller sets are prefixes of larger
ones. Splits come from their own random streams (disjoint from each other and from the
segmentation set's). Default sizes: train 2000, validation 200, test 400. The default 16x16
is divisible by 4, as the conv VAE and the cGAN (two stride-2 stages) need.
"""

from __future__ import annotations

import numpy as np

from dlmodels._validation import check_choice, check_positive_int, normalize_tuple
from dlmodels.data import shapes
from dlmodels.data.digits import _batched_dataset
from dlmodels.errors import UserError

CLASS_NAMES = ("circle", "rectangle", "triangle")
NUM_CLASSES = len(CLASS_NAMES)
SPLITS = ("train", "validation", "test")
SPLIT_SIZES = {"train": 2000, "validation": 200, "test": 400}
# Streams apart from shapes' (0 raw, 1..3 splits): no image shares its random draws with them.
_SPLIT_STREAM = {"train": 11, "validation": 12, "test": 13}
OWNER = "shapes_generative"


def _render(num_samples, image_size, seed, stream, supersample):
    height, width = image_size
    big_h, big_w = height * supersample, width * supersample
    yy, xx = np.meshgrid(
        np.arange(big_h, dtype=np.float32) + 0.5,
        np.arange(big_w, dtype=np.float32) + 0.5,
        indexing="ij",
    )
    images = np.empty((num_samples, height, width, 1), np.float32)
    labels = np.empty(num_samples, np.int32)
    for i in range(num_samples):
        rng = np.random.default_rng([seed, stream, i])
        kind = int(rng.integers(1, shapes.NUM_CLASSES))  # 1 circle, 2 rectangle, 3 triangle
        mask = shapes._draw_shape(kind, rng, yy, xx, big_h, big_w)
        while not mask.any():  # pragma: no cover - a shape smaller than a pixel; redraw it
            mask = shapes._draw_shape(kind, rng, yy, xx, big_h, big_w)
        coverage = mask.reshape(height, supersample, width, supersample).mean(axis=(1, 3))
        images[i, ..., 0] = coverage
        labels[i] = kind - 1
    return images, labels


def load(
    split: str = "train",
    *,
    image_size=16,
    num_samples: int | None = None,
    seed: int = 0,
    supersample: int = 4,
):
    """Single-shape images and their class ids for a split, deterministic per seed.

    Args:
        split: "train" (2000 images by default), "validation" (200) or "test" (400).
        image_size: `(height, width)` or an int (default 16).
        num_samples: images to generate, default the split size; image `i` is the same whatever
            `num_samples` is.
        seed: base seed; each split draws from its own stream of it.
        supersample: anti-aliasing factor (1: hard 0/1 pixels).

    Returns:
        `(x, y)`: x float32 `(N, H, W, 1)` in [0, 1], y int32 `(N,)` in 0..2 (`CLASS_NAMES`).
    """
    check_choice("split", split, SPLITS, owner=f"{OWNER}.load")
    size = normalize_tuple("image_size", image_size, 2, owner=OWNER)
    supersample = check_positive_int("supersample", supersample, owner=OWNER)
    if num_samples is None:
        num_samples = SPLIT_SIZES[split]
    num_samples = check_positive_int("num_samples", num_samples, owner=OWNER)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise UserError(f"{OWNER}: `seed`={seed!r} must be a non-negative integer.")
    return _render(num_samples, size, int(seed), _SPLIT_STREAM[split], supersample)


def dataset(
    split="train",
    *,
    batch_size=64,
    image_size=16,
    num_samples=None,
    seed=0,
    shuffle=None,
    drop_remainder=False,
    repeat=False,
):
    """A `tf.data.Dataset` of `(images, labels)` batches (global batch size), the same layout
    as `digits.dataset`, so the generative trainers take either.

    Args:
        split, image_size, num_samples, seed: as in `load`.
        batch_size: global batch size.
        shuffle: reshuffle every epoch with `seed` (default: True for "train" only).
        drop_remainder: drop the last partial batch (static batch shapes).
        repeat: repeat forever (use with `steps_per_epoch`).
    """
    batch_size = check_positive_int("batch_size", batch_size, owner=f"{OWNER}.dataset")
    x, y = load(split, image_size=image_size, num_samples=num_samples, seed=seed)
    return _batched_dataset(
        x,
        y,
        split,
        batch_size,
        shuffle=shuffle,
        repeat=repeat,
        seed=seed,
        drop_remainder=drop_remainder,
    )

"""Synthetic shapes: a seeded semantic segmentation data set that needs no download.

Each image has a random background colour, sometimes a smooth linear gradient, and gaussian
pixel noise; on it 1..4 circles, axis-aligned rectangles and triangles of random size, colour
and position are drawn, later shapes on top of earlier ones (they may overlap and occlude).
Colours are drawn independently of the class, so a model has to recognise the *shape* of a
region to label it; the only colour constraint is a minimum contrast to the background so every
labelled pixel is visible. Labels: 0 background, 1 circle, 2 rectangle, 3 triangle.

Rasterisation is pure numpy (vectorised masks on a pixel-centre grid): 2,000 images of 96x96
take about 2 s on one core. Image `i` of a split depends only on (seed, split, i), so
`load("train", num_samples=100)` is the first 100 images of the default train split.

Split sizes by default: train 2000, validation 200, test 200. The splits come from disjoint
random streams (no image is shared between splits).
"""

from __future__ import annotations

import numpy as np

from dlmodels._validation import check_choice, check_positive_int, normalize_tuple

CLASS_NAMES = ("background", "circle", "rectangle", "triangle")
NUM_CLASSES = len(CLASS_NAMES)
SPLITS = ("train", "validation", "test")
SPLIT_SIZES = {"train": 2000, "validation": 200, "test": 200}
# Mixed into each image's seed so the three splits draw from disjoint streams.
_SPLIT_STREAM = {"train": 1, "validation": 2, "test": 3}
# A raw `generate` call uses stream 0, distinct from every split.
_RAW_STREAM = 0
_MIN_CONTRAST = 0.3


def _check_image_size(image_size) -> tuple[int, int]:
    return normalize_tuple("image_size", image_size, 2, owner="shapes")


def _centre(rng, extent, height, width):
    """A centre keeping a shape of half-size `extent` inside the image, so its outline (the only
    cue to its class) is visible; on images too small for that, anywhere."""
    lo_y, lo_x = min(extent, height / 2), min(extent, width / 2)
    return rng.uniform(lo_y, height - lo_y), rng.uniform(lo_x, width - lo_x)


def _draw_shape(kind, rng, yy, xx, height, width):
    """Boolean mask of one shape of class `kind` (1 circle, 2 rectangle, 3 triangle)."""
    short = min(height, width)
    if kind == 1:
        r = rng.uniform(0.1, 0.22) * short
        cy, cx = _centre(rng, r, height, width)
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if kind == 2:
        # Aspect ratios stay within 1:3 so a rectangle never degenerates into a line.
        h = rng.uniform(0.18, 0.4) * short
        w = float(np.clip(h * rng.uniform(0.5, 2.0), 0.15 * short, 0.5 * short))
        cy, cx = _centre(rng, max(h, w) / 2, height, width)
        return (np.abs(yy - cy) <= h / 2) & (np.abs(xx - cx) <= w / 2)
    # Triangle: three vertices around a centre with jittered angles, random rotation.
    r = rng.uniform(0.16, 0.3) * short
    cy, cx = _centre(rng, r, height, width)
    base = rng.uniform(0, 2 * np.pi)
    angles = base + np.arange(3) * (2 * np.pi / 3) + rng.uniform(-0.35, 0.35, 3)
    vy, vx = cy + r * np.sin(angles), cx + r * np.cos(angles)
    # Point-in-triangle: the three edge functions share a sign (vertices are counter-clockwise
    # in angle order, so "all >= 0" suffices).
    inside = np.ones_like(yy, dtype=bool)
    for i in range(3):
        j = (i + 1) % 3
        edge = (vx[j] - vx[i]) * (yy - vy[i]) - (vy[j] - vy[i]) * (xx - vx[i])
        inside &= edge >= 0
    return inside


def _shape_colour(rng, background):
    """A colour with L-inf distance >= _MIN_CONTRAST to the background colour."""
    for _ in range(20):
        colour = rng.uniform(0, 1, 3)
        if np.max(np.abs(colour - background)) >= _MIN_CONTRAST:
            return colour
    # Fall back to the farthest corner of the colour cube, always far enough.
    return np.where(background < 0.5, 1.0, 0.0)


def _generate(num_samples, image_size, seed, stream, max_shapes, min_shapes, noise):
    height, width = image_size
    yy, xx = np.meshgrid(
        np.arange(height, dtype=np.float32) + 0.5,
        np.arange(width, dtype=np.float32) + 0.5,
        indexing="ij",
    )
    ramp_y = (yy / height - 0.5)[..., None]
    ramp_x = (xx / width - 0.5)[..., None]
    images = np.empty((num_samples, height, width, 3), np.float32)
    masks = np.zeros((num_samples, height, width), np.int32)
    for i in range(num_samples):
        rng = np.random.default_rng([seed, stream, i])
        background = rng.uniform(0, 1, 3)
        gradient = rng.uniform() < 0.5
        gy, gx = rng.uniform(-0.3, 0.3, (2, 3))
        # Paint shape indices first and colours once at the end: a 2-D int mask write per shape
        # is far cheaper than writing three float channels.
        mask, top = masks[i], np.zeros((height, width), np.intp)
        palette = [background]
        for k in range(rng.integers(min_shapes, max_shapes + 1)):
            kind = int(rng.integers(1, NUM_CLASSES))
            region = _draw_shape(kind, rng, yy, xx, height, width)
            palette.append(_shape_colour(rng, background))
            top[region] = k + 1
            mask[region] = kind
        image = np.asarray(palette, np.float32)[top]
        if gradient:
            # A smooth illumination gradient: the background is no flat colour to threshold.
            image += ramp_y * gy.astype(np.float32) + ramp_x * gx.astype(np.float32)
        if noise:
            image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(noise)
        images[i] = image
    np.clip(images, 0.0, 1.0, out=images)
    return images, masks


def generate(
    num_samples: int,
    image_size=(96, 96),
    *,
    seed: int = 0,
    max_shapes: int = 4,
    min_shapes: int = 1,
    noise: float = 0.05,
):
    """Generate `num_samples` images with their segmentation masks, deterministically per seed.

    Args:
        num_samples: number of images (>= 1).
        image_size: `(height, width)` or an int for square images; any size >= 1.
        seed: integer seed; the same seed (and arguments) gives identical arrays.
        max_shapes: most shapes per image.
        min_shapes: fewest shapes per image (0 allows background-only images).
        noise: standard deviation of the gaussian pixel noise (0 disables it).

    Returns:
        `(images, masks)`: float32 `(N, H, W, 3)` in [0, 1] and int32 `(N, H, W)` with values in
        `0..NUM_CLASSES-1`.
    """
    return _generate_checked(
        num_samples, image_size, seed, _RAW_STREAM, max_shapes, min_shapes, noise
    )


def _generate_checked(num_samples, image_size, seed, stream, max_shapes, min_shapes, noise):
    num_samples = check_positive_int("num_samples", num_samples, owner="shapes")
    image_size = _check_image_size(image_size)
    max_shapes = check_positive_int("max_shapes", max_shapes, owner="shapes")
    if (
        isinstance(min_shapes, bool)
        or not isinstance(min_shapes, int)
        or not (0 <= min_shapes <= max_shapes)
    ):
        raise ValueError(
            f"shapes: `min_shapes`={min_shapes!r} must be an integer in "
            f"[0, max_shapes={max_shapes}]. Lower min_shapes or raise max_shapes."
        )
    if not isinstance(noise, int | float) or noise < 0:
        raise ValueError(f"shapes: `noise`={noise!r} must be a number >= 0 (e.g. noise=0.05).")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"shapes: `seed`={seed!r} must be a non-negative integer.")
    return _generate(num_samples, image_size, int(seed), stream, max_shapes, min_shapes, noise)


def load(split: str, *, image_size=(96, 96), num_samples: int | None = None, seed: int = 0):
    """Return `(images, masks)` numpy arrays for a split.

    Args:
        split: "train" (2000 images by default), "validation" (200) or "test" (200).
        image_size: `(height, width)` or an int.
        num_samples: images to generate, default the split size above. Image `i` is the same
            whatever `num_samples` is, so smaller sets are prefixes of larger ones.
        seed: base seed; each split draws from its own stream of it, so splits never overlap.
    """
    check_choice("split", split, SPLITS, owner="shapes.load")
    if num_samples is None:
        num_samples = SPLIT_SIZES[split]
    return _generate_checked(num_samples, image_size, seed, _SPLIT_STREAM[split], 4, 1, 0.05)


def _flip(item, seeds):
    import tensorflow as tf

    image, mask = item
    # Stateless ops seeded per element: flips stay reproducible under a parallel map, where
    # stateful random ops would be consumed in a nondeterministic order.
    flip_lr, flip_ud = tf.unstack(tf.random.stateless_uniform([2], seed=seeds) < 0.5)
    image = tf.where(flip_lr, image[:, ::-1], image)
    mask = tf.where(flip_lr, mask[:, ::-1], mask)
    image = tf.where(flip_ud, image[::-1], image)
    mask = tf.where(flip_ud, mask[::-1], mask)
    return image, mask


def dataset(
    split: str,
    *,
    batch_size: int,
    image_size=(96, 96),
    num_samples: int | None = None,
    seed: int = 0,
    shuffle: bool | None = None,
    augment: bool = False,
    repeat: bool = False,
    drop_remainder: bool | None = None,
):
    """A `tf.data.Dataset` of `(images, masks)` batches for a split, ready for tf.distribute.

    Batches are float32 `(B, H, W, 3)` and int32 `(B, H, W)`. With `drop_remainder` (default for
    "train") the batch dimension is static, which TPUs need. Auto-sharding is set to DATA: the
    arrays live in memory (there are no files to shard), so under MultiWorkerMirroredStrategy
    every worker builds the same pipeline and keeps its share of the batches.

    Args:
        split: "train", "validation" or "test".
        batch_size: the *global* batch size (`strategy.experimental_distribute_dataset` splits
            it across replicas).
        image_size, num_samples, seed: as in `load`.
        shuffle: default True for "train", False otherwise.
        augment: random horizontal and vertical flips of image and mask together.
        repeat: repeat forever (then give the trainer `steps_per_epoch`).
        drop_remainder: default True for "train", False otherwise.
    """
    import tensorflow as tf

    batch_size = check_positive_int("batch_size", batch_size, owner="shapes.dataset")
    images, masks = load(split, image_size=image_size, num_samples=num_samples, seed=seed)
    is_train = split == "train"
    shuffle = is_train if shuffle is None else shuffle
    drop_remainder = is_train if drop_remainder is None else drop_remainder
    ds = tf.data.Dataset.from_tensor_slices((images, masks))
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if augment:
        # A seeded stream of seed pairs, redrawn every epoch, deterministic for `seed`.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(_flip, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)

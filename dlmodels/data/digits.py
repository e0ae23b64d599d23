"""Real handwritten digits: scikit-learn's `load_digits` (1,797 images of 8x8, ten classes).

The images ship inside scikit-learn (UCI "Optical Recognition of Handwritten Digits", Alpaydin
& Kaynak 1998), so nothing is downloaded. Pixels (0..16 in the original) are scaled to [0, 1]
and shaped `(N, 8, 8, 1)` float32; labels are int32 class ids 0..9.

The train / test split is stratified and seeded: `load("train")` and `load("test")` with the same
`seed` and `test_fraction` are disjoint, cover every image, and are identical on every call.
"""

from __future__ import annotations

import numpy as np

from dlmodels._validation import check_choice, check_positive_int
from dlmodels.errors import UserError

SPLITS = ("train", "test", "all")
IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
MAX_PIXEL = 16.0


def _raw():
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn is in the tf / dev extras
        raise UserError(
            "dlmodels.data.digits needs scikit-learn: pip install 'dlmodels[tf]'"
        ) from err
    bunch = load_digits()
    x = (bunch.images.astype("float32") / MAX_PIXEL).reshape(-1, *IMAGE_SHAPE)
    return x, bunch.target.astype("int32")


def split_indices(labels, test_fraction=0.2, seed=0):
    """(train, test) index arrays: a stratified, seeded split (each class split on its own)."""
    if not 0.0 < float(test_fraction) < 1.0:
        raise UserError(f"digits: `test_fraction`={test_fraction!r} must lie in (0, 1), e.g. 0.2.")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = max(1, round(len(idx) * float(test_fraction)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load(split="train", *, test_fraction=0.2, seed=0, num_samples=None):
    """Digits of one split as numpy arrays.

    Args:
        split: "train", "test" or "all".
        test_fraction: share of each class held out for "test".
        seed: seed of the split.
        num_samples: keep only the first this many (in index order), or None for all.

    Returns:
        `(x, y)`: x `(N, 8, 8, 1)` float32 in [0, 1], y `(N,)` int32 in 0..9.
    """
    check_choice("split", split, SPLITS, owner="digits.load")
    x, y = _raw()
    if split != "all":
        train, test = split_indices(y, test_fraction, seed)
        keep = train if split == "train" else test
        x, y = x[keep], y[keep]
    if num_samples is not None:
        n = check_positive_int("num_samples", num_samples, owner="digits.load")
        x, y = x[:n], y[:n]
    return x, y


def dataset(
    split="train",
    *,
    batch_size=64,
    shuffle=None,
    seed=0,
    test_fraction=0.2,
    num_samples=None,
    drop_remainder=False,
    repeat=False,
):
    """A `tf.data.Dataset` of `(images, labels)` batches (global batch size: the Trainer's
    `experimental_distribute_dataset` splits each batch across replicas).

    Args:
        split, test_fraction, num_samples: as in `load`.
        batch_size: global batch size.
        shuffle: reshuffle every epoch with `seed` (default: True for "train" only); the order
            is deterministic for a given seed.
        seed: seed of the split and of the shuffle.
        drop_remainder: drop the last partial batch (static batch shapes).
        repeat: repeat forever (use with `steps_per_epoch`).
    """
    batch_size = check_positive_int("batch_size", batch_size, owner="digits.dataset")
    x, y = load(split, test_fraction=test_fraction, seed=seed, num_samples=num_samples)
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


def _batched_dataset(x, y, split, batch_size, *, shuffle, repeat, seed, drop_remainder):
    """`(x, y)` as a batched, prefetched `tf.data.Dataset`; shuffled for "train" by default."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle if shuffle is not None else split == "train":
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)

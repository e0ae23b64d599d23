"""Digits: real 8x8 images from scikit-learn, scaled, split reproducibly, batched by tf.data."""

import numpy as np
import pytest

from dlmodels.data import digits


def test_load_scales_and_splits_reproducibly():
    x, y = digits.load("train")
    xt, yt = digits.load("test")
    xa, ya = digits.load("all")
    assert x.shape[1:] == (8, 8, 1) and x.dtype == np.float32 and y.dtype == np.int32
    assert len(x) + len(xt) == len(xa) == 1797
    assert xa.min() == 0.0 and xa.max() == 1.0
    # Stratified: every class in both splits, ~20% of each held out.
    counts_test, counts_all = np.bincount(yt, minlength=10), np.bincount(ya, minlength=10)
    np.testing.assert_allclose(counts_test / counts_all, 0.2, atol=0.01)
    # Disjoint and covering: the split indices partition the data set.
    train, test = digits.split_indices(ya)
    assert not set(train) & set(test) and len(set(train) | set(test)) == 1797
    # Reproducible for a seed, different for another.
    x2, y2 = digits.load("train")
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    _, y3 = digits.load("test", seed=1)
    assert not np.array_equal(np.sort(digits.split_indices(ya, seed=1)[1]), np.sort(test))
    assert len(y3) == len(yt)
    x5, _ = digits.load("train", num_samples=5)
    np.testing.assert_array_equal(x5, x[:5])


def test_dataset_batches_and_shuffles_deterministically():
    ds = digits.dataset("train", batch_size=100, seed=3)
    first = [b[1].numpy() for b in ds]
    again = [b[1].numpy() for b in digits.dataset("train", batch_size=100, seed=3)]
    assert sum(len(b) for b in first) == 1438
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
    test = next(iter(digits.dataset("test", batch_size=8)))
    np.testing.assert_array_equal(test[1].numpy(), digits.load("test")[1][:8])  # unshuffled
    dropped = digits.dataset("test", batch_size=100, drop_remainder=True)
    assert all(b[0].shape[0] == 100 for b in dropped)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        digits.load("validation")
    with pytest.raises(ValueError, match="test_fraction"):
        digits.load("train", test_fraction=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        digits.dataset(batch_size=0)

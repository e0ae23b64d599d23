"""Single-shape images for the generative models: shapes, ranges, labels, split determinism."""

import numpy as np
import pytest

from dlmodels.data import shapes, shapes_generative
from dlmodels.errors import UserError


def test_images_and_labels_have_the_documented_shapes_and_ranges():
    x, y = shapes_generative.load("train", num_samples=300)
    assert x.shape == (300, 16, 16, 1) and x.dtype == np.float32
    assert y.shape == (300,) and y.dtype == np.int32
    assert x.min() >= 0.0 and x.max() <= 1.0
    # Every image holds a visible shape with a fully covered interior, and soft edges.
    assert (x.reshape(300, -1).max(axis=1) == 1.0).all()
    assert ((x > 0) & (x < 1)).any()
    # All three classes, roughly balanced.
    counts = np.bincount(y, minlength=shapes_generative.NUM_CLASSES)
    assert len(counts) == 3 and counts.min() > 60, counts
    wide, _ = shapes_generative.load("test", image_size=(8, 12), num_samples=2, supersample=1)
    assert wide.shape == (2, 8, 12, 1) and set(np.unique(wide)) <= {0.0, 1.0}


def test_label_is_the_class_of_the_one_shape_drawn():
    """How much of its bounding box a shape fills tells the classes apart: an axis-aligned
    rectangle all of it, a circle pi / 4, a triangle at most a half."""
    x, y = shapes_generative.load("train", image_size=48, num_samples=150, supersample=1)
    extent = []
    for image in x[..., 0] > 0.5:
        rows, cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
        box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        extent.append(image.sum() / box)
    extent = np.asarray(extent)
    assert set(np.unique(y)) == {0, 1, 2}
    assert ((extent[y == 0] > 0.7) & (extent[y == 0] < 0.9)).all(), extent[y == 0]
    assert (extent[y == 1] == 1.0).all(), extent[y == 1]
    assert (extent[y == 2] < 0.65).all(), extent[y == 2]
    assert shapes.CLASS_NAMES[1:] == shapes_generative.CLASS_NAMES


def test_splits_are_deterministic_prefixes_and_disjoint():
    a, ya = shapes_generative.load("validation", num_samples=20, seed=3)
    b, yb = shapes_generative.load("validation", num_samples=50, seed=3)
    np.testing.assert_array_equal(a, b[:20])
    np.testing.assert_array_equal(ya, yb[:20])
    c, _ = shapes_generative.load("validation", num_samples=20, seed=4)
    t, _ = shapes_generative.load("train", num_samples=20, seed=3)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, t)
    assert len(shapes_generative.load("test")[0]) == shapes_generative.SPLIT_SIZES["test"]


def test_dataset_batches_and_bad_arguments():
    ds = shapes_generative.dataset("train", batch_size=8, num_samples=20, drop_remainder=True)
    batches = list(ds)
    assert len(batches) == 2
    images, labels = batches[0]
    assert tuple(images.shape) == (8, 16, 16, 1) and tuple(labels.shape) == (8,)
    with pytest.raises(UserError, match="split"):
        shapes_generative.load("dev")
    with pytest.raises(UserError, match="seed"):
        shapes_generative.load("train", seed=-1)

"""Synthetic shapes: determinism, split disjointness, content, ranges and the tf.data pipeline."""

import numpy as np
import pytest
import tensorflow as tf

from dlmodels.data import shapes


def test_generate_is_deterministic_per_seed_and_seeds_differ():
    a_img, a_mask = shapes.generate(6, (24, 40), seed=7)
    b_img, b_mask = shapes.generate(6, (24, 40), seed=7)
    c_img, c_mask = shapes.generate(6, (24, 40), seed=8)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_mask, c_mask)


def test_shapes_dtypes_and_ranges_for_non_square_sizes():
    images, masks = shapes.generate(5, (20, 33), seed=1)
    assert images.shape == (5, 20, 33, 3) and images.dtype == np.float32
    assert masks.shape == (5, 20, 33) and masks.dtype == np.int32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert set(np.unique(masks)) <= set(range(shapes.NUM_CLASSES))
    square, _ = shapes.generate(2, 16)
    assert square.shape == (2, 16, 16, 3)


def test_every_class_present_and_shapes_are_visible():
    images, masks = shapes.generate(40, (48, 48), seed=0, noise=0.0)
    counts = np.bincount(masks.ravel(), minlength=shapes.NUM_CLASSES)
    assert (counts > 0).all(), counts
    # Background dominates but shapes cover a real share of the pixels.
    assert 0.05 < counts[1:].sum() / counts.sum() < 0.5
    # Each image has at least one shape (min_shapes=1), and shape pixels differ from the
    # background colour (contrast constraint), so the label is visible in the image.
    assert all((m > 0).any() for m in masks)
    for image, mask in zip(images[:10], masks[:10], strict=True):
        bg = np.median(image[mask == 0], axis=0)
        fg = image[mask > 0]
        assert np.abs(fg - bg).max(axis=-1).mean() > 0.2


def test_min_shapes_zero_and_max_shapes_bound():
    _, masks = shapes.generate(30, (16, 16), seed=3, min_shapes=0, max_shapes=1)
    assert any((m == 0).all() for m in masks)
    assert all(len(np.unique(m)) <= 2 for m in masks)


def test_colours_do_not_give_away_the_class():
    images, masks = shapes.generate(200, (32, 32), seed=5, noise=0.0)
    means = {c: images[masks == c].mean(axis=0) for c in (1, 2, 3)}
    for c in (1, 2, 3):
        np.testing.assert_allclose(means[c], means[1], atol=0.08)


def test_splits_are_disjoint_and_prefix_stable():
    train, _ = shapes.load("train", image_size=16, num_samples=50)
    val, _ = shapes.load("validation", image_size=16, num_samples=50)
    test, _ = shapes.load("test", image_size=16, num_samples=50)
    keys = [{img.tobytes() for img in split} for split in (train, val, test)]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    small, _ = shapes.load("train", image_size=16, num_samples=10)
    np.testing.assert_array_equal(small, train[:10])
    assert shapes.SPLIT_SIZES == {"train": 2000, "validation": 200, "test": 200}
    assert shapes.CLASS_NAMES == ("background", "circle", "rectangle", "triangle")


def test_load_default_size():
    images, masks = shapes.load("validation", image_size=8)
    assert images.shape == (200, 8, 8, 3) and masks.shape == (200, 8, 8)


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: shapes.load("training"), "'training'"),
        (lambda: shapes.load("train", num_samples=0), "num_samples"),
        (lambda: shapes.generate(-1), "num_samples"),
        (lambda: shapes.generate(2, (0, 8)), "image_size"),
        (lambda: shapes.generate(2, (8, 8, 8)), "image_size"),
        (lambda: shapes.generate(2, min_shapes=5, max_shapes=4), "min_shapes"),
        (lambda: shapes.generate(2, noise=-1), "noise"),
        (lambda: shapes.dataset("train", batch_size=0), "batch_size"),
    ],
)
def test_errors_name_the_argument(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()


def test_unknown_split_lists_allowed():
    with pytest.raises(ValueError, match="'train', 'validation', 'test'"):
        shapes.load("dev")


def test_dataset_batches_and_options():
    ds = shapes.dataset("train", batch_size=4, image_size=(16, 24), num_samples=10, augment=True)
    assert ds.element_spec[0].shape.as_list() == [4, 16, 24, 3]
    assert ds.element_spec[1].shape.as_list() == [4, 16, 24]
    assert ds.element_spec[0].dtype == tf.float32 and ds.element_spec[1].dtype == tf.int32
    assert len(list(ds)) == 2  # 10 // 4, remainder dropped for train
    policy = ds.options().experimental_distribute.auto_shard_policy
    assert policy == tf.data.experimental.AutoShardPolicy.DATA

    val = shapes.dataset("validation", batch_size=4, image_size=16, num_samples=10)
    batches = list(val)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    _, masks = shapes.load("validation", image_size=16, num_samples=10)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), masks)

    rep = shapes.dataset("test", batch_size=3, image_size=8, num_samples=4, repeat=True)
    assert len(list(rep.take(5))) == 5


def test_augmentation_flips_image_and_mask_together():
    images, masks = shapes.load("train", image_size=(12, 20), num_samples=8)
    ds = shapes.dataset(
        "train", batch_size=8, image_size=(12, 20), num_samples=8, augment=True, shuffle=False
    )
    aug_images, aug_masks = next(iter(ds))
    again = next(
        iter(
            shapes.dataset(
                "train",
                batch_size=8,
                image_size=(12, 20),
                num_samples=8,
                augment=True,
                shuffle=False,
            )
        )
    )
    np.testing.assert_array_equal(again[1], aug_masks)  # reproducible for a seed
    assert not np.array_equal(aug_masks, masks)  # something flipped
    for img, mask, a_img, a_mask in zip(images, masks, aug_images, aug_masks, strict=True):
        candidates = [(img, mask), (img[:, ::-1], mask[:, ::-1]), (img[::-1], mask[::-1])]
        candidates.append((img[::-1, ::-1], mask[::-1, ::-1]))
        assert any(
            np.allclose(a_img, c_img) and np.array_equal(a_mask, c_mask)
            for c_img, c_mask in candidates
        )

"""The user's own image folders: exact decoding, resize semantics, reproducible splits, tf.data
batches as the Trainer takes them, and a UserError naming the file for every broken input."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dlmodels.data import folders, shapes
from dlmodels.errors import UserError

H, W = 20, 24


def _rgb(rng, h=H, w=W):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _mask(rng, labels=(0, 1, 2), h=H, w=W):
    return rng.choice(np.asarray(labels, np.uint8), (h, w))


def _seg_folder(root, n=12, *, seed=0, labels=(0, 1, 2), ignore=None, gray=False):
    """`n` random 20x24 images (PNG, image 3 as JPEG) and masks; returns what was written."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    images, masks = [], []
    for i in range(n):
        img = rng.integers(0, 256, (H, W), dtype=np.uint8) if gray else _rgb(rng)
        mask = _mask(rng, labels)
        if ignore is not None:
            mask[0, : i + 1] = ignore  # a void border strip
        suffix = ".jpg" if i == 3 else ".png"
        Image.fromarray(img).save(root / "images" / f"img{i:02d}{suffix}")
        Image.fromarray(mask).save(root / "masks" / f"img{i:02d}.png")
        if suffix == ".jpg":  # JPEG is lossy: the reference is what the decoder gives back
            img = np.asarray(Image.open(root / "images" / f"img{i:02d}{suffix}"))
        images.append(img)
        masks.append(mask)
    return np.stack(images), np.stack(masks)


def _cls_folder(root, counts=(("dog", 4), ("cat", 5), ("bird", 3)), seed=0):
    rng = np.random.default_rng(seed)
    written = {}
    for name, k in counts:
        (root / name).mkdir(parents=True)
        for i in range(k):
            img = _rgb(rng)
            Image.fromarray(img).save(root / name / f"{name}{i}.png")
            written[f"{name}/{name}{i}.png"] = img
    return written


def test_segmentation_folder_round_trips_exactly(tmp_path):
    images, masks = _seg_folder(tmp_path)
    data = folders.load_segmentation_folder(tmp_path)
    assert folders.detect_layout(tmp_path) == "segmentation"
    assert data.task == "segmentation" and data.images.dtype == np.float32
    assert data.labels.dtype == np.int32 and data.labels.shape == (12, H, W)
    # PNG pixels come back exactly as v / 255; masks exactly as written.
    np.testing.assert_array_equal(data.images, images.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(data.labels, masks)
    assert data.files[3] == "images/img03.jpg" and data.files[0] == "images/img00.png"
    assert data.num_classes == 3 and data.class_names == ("0", "1", "2")
    assert data.image_size == (H, W) and data.input_shape == (H, W, 3)
    assert "12 images 20x24x3" in data.summary() and "10/1/1" in data.summary()


def test_grayscale_16_bit_and_channel_conversion(tmp_path):
    images, _ = _seg_folder(tmp_path / "g", n=4, gray=True)
    data = folders.load_folder(tmp_path / "g")
    assert data.channels == 1 and data.images.shape == (4, H, W, 1)
    png = [i for i in range(4) if i != 3]  # image 3 is a JPEG
    np.testing.assert_array_equal(data.images[png, ..., 0], images[png] / np.float32(255))
    rgb = folders.load_folder(tmp_path / "g", channels=3)
    np.testing.assert_array_equal(rgb.images, np.repeat(data.images, 3, axis=-1))
    # 16-bit grayscale: v / 65535.
    deep = np.asarray([[0, 1000], [40000, 65535]], np.uint16)
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "b").mkdir()
    Image.fromarray(deep).save(tmp_path / "d" / "a" / "x.png")
    Image.fromarray(deep[::-1]).save(tmp_path / "d" / "b" / "y.png")
    cls = folders.load_folder(tmp_path / "d", fractions=(0.5, 0.5, 0.0))
    np.testing.assert_array_equal(cls.images[0, ..., 0], deep.astype(np.float32) / 65535)


def test_resize_images_bilinear_masks_nearest(tmp_path):
    images, masks = _seg_folder(tmp_path, n=4, labels=(0, 2, 5))
    for size in [(32, 32), (10, 12), (13, 7)]:
        data = folders.load_segmentation_folder(tmp_path, image_size=size)
        assert data.images.shape == (4, *size, 3) and data.labels.shape == (4, *size)
        # Masks: nearest neighbour, the same pixels TensorFlow's nearest resize picks, so only
        # labels that were there appear (no 1, 3 or 4 between 0, 2 and 5).
        ref = tf.image.resize(masks[..., None], size, method="nearest").numpy()[..., 0]
        np.testing.assert_array_equal(data.labels, ref)
        assert set(np.unique(data.labels)) <= {0, 2, 5}
        # Images: bilinear, antialiased when shrinking, as tf.image.resize(antialias=True).
        ref = tf.image.resize(images / np.float32(255), size, antialias=True).numpy()
        np.testing.assert_allclose(data.images, ref, atol=1e-6)
    assert data.num_classes == 6  # inferred: max label + 1


def test_split_indices_are_disjoint_covering_stable_and_seeded():
    for n in (1, 2, 5, 12, 100, 101):
        fractions = (1.0, 0.0, 0.0) if n < 3 else (0.8, 0.1, 0.1)
        parts = folders.split_indices(n, fractions, seed=3)
        joined = np.concatenate(parts)
        assert len(joined) == n and set(joined) == set(range(n))  # disjoint and covering
        again = folders.split_indices(n, fractions, seed=3)
        for a, b in zip(parts, again, strict=True):
            np.testing.assert_array_equal(a, b)
    # Sizes: largest remainder, and no positive split left empty.
    assert [len(p) for p in folders.split_indices(12)] == [10, 1, 1]
    assert [len(p) for p in folders.split_indices(100)] == [80, 10, 10]
    assert [len(p) for p in folders.split_indices(5)] == [3, 1, 1]
    assert [len(p) for p in folders.split_indices(10, (0.9, 0.1, 0.0))] == [9, 1, 0]
    # The default seed is 0; another seed gives another split.
    np.testing.assert_array_equal(
        folders.split_indices(100, seed=0)[1], folders.split_indices(100)[1]
    )
    assert not np.array_equal(folders.split_indices(100, seed=1)[1], folders.split_indices(100)[1])
    # Stratified: each class cut on its own, whatever the seed (class 0: 50 -> 40/5/5,
    # class 1: 10 -> 8/1/1, class 2: 5 -> 4/1/0 by largest remainder, ties to the earlier split).
    labels = np.repeat([0, 1, 2], [50, 10, 5])
    for seed in range(4):
        parts = folders.split_indices(65, seed=seed, labels=labels)
        counts = [np.bincount(labels[p], minlength=3).tolist() for p in parts]
        assert counts == [[40, 8, 4], [5, 1, 1], [5, 1, 0]]
        assert sorted(np.concatenate(parts)) == list(range(65))
    for bad in [(0.8, 0.1), (0.0, 0.5, 0.5), (1.2, -0.2, 0.0), "x"]:
        with pytest.raises(UserError, match="`fractions`="):
            folders.split_indices(10, bad)
    with pytest.raises(UserError, match="2 samples cannot fill 3 splits"):
        folders.split_indices(2)


def test_folder_splits_are_the_split_indices_and_stable(tmp_path):
    _seg_folder(tmp_path)
    data = folders.load_segmentation_folder(tmp_path, seed=5)
    expected = folders.split_indices(12, (0.8, 0.1, 0.1), 5)
    for name, idx in zip(folders.SPLITS, expected, strict=True):
        np.testing.assert_array_equal(data.splits[name], idx)
        x, y = data.arrays(name)
        np.testing.assert_array_equal(x, data.images[idx])
        np.testing.assert_array_equal(y, data.labels[idx])
    again = folders.load_segmentation_folder(tmp_path, seed=5)
    np.testing.assert_array_equal(again.arrays("validation")[0], data.arrays("validation")[0])
    other = folders.load_segmentation_folder(tmp_path, seed=6)
    assert not all(np.array_equal(other.splits[s], data.splits[s]) for s in folders.SPLITS)


def test_dataset_matches_shapes_dataset_and_flips_image_and_mask_together(tmp_path):
    _seg_folder(tmp_path, n=20)
    data = folders.load_segmentation_folder(tmp_path, fractions=(0.5, 0.25, 0.25))
    train = data.dataset("train", batch_size=4, augment=True)
    ref = shapes.dataset("train", batch_size=4, image_size=(H, W), num_samples=8)
    assert train.element_spec == ref.element_spec  # static batch, float32 images, int32 masks
    val = data.dataset("validation", batch_size=4)
    assert val.element_spec[0].shape.as_list() == [None, H, W, 3]  # keeps the last partial batch
    # Unshuffled validation batches are the split's arrays in order.
    xv, yv = data.arrays("validation")
    batches = list(val.as_numpy_iterator())
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), xv)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), yv)
    # Flips: every augmented sample is its image unflipped or mirrored, with the mask mirrored
    # the same way; both occur.
    x, y = data.arrays("train")
    flipped = data.dataset("train", batch_size=10, augment=True, shuffle=False)
    ax, ay = next(iter(flipped.as_numpy_iterator()))
    mirrored = [np.array_equal(ax[i], x[i, :, ::-1]) for i in range(10)]
    for i in range(10):
        if mirrored[i]:
            np.testing.assert_array_equal(ay[i], y[i, :, ::-1])
        else:
            np.testing.assert_array_equal(ax[i], x[i])
            np.testing.assert_array_equal(ay[i], y[i])
    assert 0 < sum(mirrored) < 10
    # The same seed gives the same shuffled, augmented epoch.
    a = [b[1] for b in data.dataset("train", batch_size=5, augment=True).as_numpy_iterator()]
    b = [b[1] for b in data.dataset("train", batch_size=5, augment=True).as_numpy_iterator()]
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
    with pytest.raises(UserError, match="has 10 images, fewer than batch_size=16"):
        data.dataset("train", batch_size=16)


def test_classification_folder(tmp_path):
    written = _cls_folder(tmp_path)
    assert folders.detect_layout(tmp_path) == "classification"
    data = folders.load_folder(tmp_path, num_classes=3)
    assert data.task == "classification" and data.class_names == ("bird", "cat", "dog")
    assert data.files[0] == "bird/bird0.png" and len(data.files) == 12
    expected_labels = [data.class_names.index(f.split("/")[0]) for f in data.files]
    np.testing.assert_array_equal(data.labels, expected_labels)
    assert data.labels.dtype == np.int32
    for i, f in enumerate(data.files):
        np.testing.assert_array_equal(data.images[i], written[f] / np.float32(255))
    # Stratified: every class has a training image; the split covers every image once.
    assert set(data.labels[data.splits["train"]]) == {0, 1, 2}
    assert sorted(np.concatenate(list(data.splits.values()))) == list(range(12))
    ds = data.dataset("train", batch_size=2, augment=True)
    assert ds.element_spec[1].shape.as_list() == [2] and ds.element_spec[1].dtype == tf.int32
    with pytest.raises(UserError, match=r"has 3 class folders .* but num_classes=4"):
        folders.load_folder(tmp_path, num_classes=4)
    with pytest.raises(UserError, match=r"ignore_index .255. applies to segmentation"):
        folders.load_folder(tmp_path, ignore_index=255)


def test_ignore_index_and_label_range(tmp_path):
    _, masks = _seg_folder(tmp_path, n=4, ignore=255)
    data = folders.load_segmentation_folder(tmp_path, ignore_index=255)
    assert data.num_classes == 3 and data.ignore_index == 255  # 255 is no class
    np.testing.assert_array_equal(data.labels, masks)
    assert "(ignore 255)" in data.summary()
    with pytest.raises(UserError, match="pass ignore_index=255 if 255 marks pixels to ignore"):
        folders.load_segmentation_folder(tmp_path)
    with pytest.raises(
        UserError,
        match=r"mask masks/img00.png holds the value 2, outside the labels 0..1 "
        r"\(num_classes=2\) or the ignore value 255",
    ):
        folders.load_segmentation_folder(tmp_path, num_classes=2, ignore_index=255)


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _broken(tmp_path, case):
    """A segmentation folder of 3 good pairs, broken in one way; returns loader kwargs."""
    rng = np.random.default_rng(0)
    root = tmp_path / case
    for i in range(3):
        _write(root / "images" / f"p{i}.png", _rgb(rng))
        _write(root / "masks" / f"p{i}.png", _mask(rng))
    if case == "no mask":
        _write(root / "images" / "lonely.png", _rgb(rng))
    elif case == "no image":
        _write(root / "masks" / "orphan.png", _mask(rng))
    elif case == "mask size":
        _write(root / "masks" / "p1.png", _mask(rng, h=H, w=W + 1))
    elif case == "unreadable":
        (root / "images" / "p2.png").write_bytes(b"not a png at all")
    elif case == "mixed channels":
        _write(root / "images" / "p1.png", rng.integers(0, 256, (H, W), dtype=np.uint8))
    elif case == "mixed sizes":
        _write(root / "images" / "p2.png", _rgb(rng, h=H + 2))
        _write(root / "masks" / "p2.png", _mask(rng, h=H + 2))
    elif case == "colour mask":
        _write(root / "masks" / "p0.png", _rgb(rng))
    elif case == "jpeg mask":
        (root / "masks" / "p0.png").unlink()
        _write(root / "masks" / "p0.jpg", _mask(rng))
    elif case == "empty":
        for p in (root / "images").iterdir():
            p.unlink()
    elif case == "only background":
        for i in range(3):
            _write(root / "masks" / f"p{i}.png", np.zeros((H, W), np.uint8))
    return root


@pytest.mark.parametrize(
    "case, match",
    [
        ("no mask", r"1 images in .*images have no mask .*: lonely.png"),
        ("no image", r"1 masks in .*masks have no image .*: orphan.png"),
        ("mask size", r"mask masks/p1.png is 20x25 \(HxW\) but its image images/p1.png is 20x24"),
        ("unreadable", r"cannot read image .*p2.png"),
        ("mixed channels", r"images/p1.png is grayscale \(1 channel\), images/p0.png is colour"),
        ("mixed sizes", r"images/p0.png is 20x24, images/p2.png is 22x24 .*Pass image_size"),
        ("colour mask", r"mask .*p0.png has mode 'RGB' \(3 channels\)"),
        ("jpeg mask", r"mask .*p0.jpg is .jpg \(lossy"),
        ("empty", r"no images .* in .*empty/images"),
        ("only background", r"holds only label 0"),
    ],
)
def test_segmentation_errors_name_the_file(tmp_path, case, match):
    root = _broken(tmp_path, case)
    with pytest.raises(UserError, match=match):
        folders.load_segmentation_folder(root)


def test_mixed_sizes_and_channels_load_when_resized_and_converted(tmp_path):
    root = _broken(tmp_path, "mixed sizes")
    data = folders.load_segmentation_folder(root, image_size=16)
    assert data.images.shape == (3, 16, 16, 3)
    root = _broken(tmp_path, "mixed channels")
    assert folders.load_segmentation_folder(root, channels=3).channels == 3


def test_layout_and_classification_errors(tmp_path):
    with pytest.raises(UserError, match=r"does not exist.*Expected one of two layouts"):
        folders.detect_layout(tmp_path / "nowhere")
    (tmp_path / "seg" / "images").mkdir(parents=True)
    with pytest.raises(UserError, match="has images/ but no masks/"):
        folders.detect_layout(tmp_path / "seg")
    _write(tmp_path / "flat" / "a.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(UserError, match=r"neither layout. It holds 1 loose images \(a.png\)"):
        folders.load_folder(tmp_path / "flat")
    _cls_folder(tmp_path / "cls", counts=(("cat", 2), ("dog", 2)))
    (tmp_path / "cls" / "zebra").mkdir()
    with pytest.raises(UserError, match=r"class folders without images .*: zebra"):
        folders.load_classification_folder(tmp_path / "cls")
    with pytest.raises(UserError, match="no class sub-folders"):
        folders.load_classification_folder(tmp_path / "flat")
    _cls_folder(tmp_path / "one", counts=(("cat", 3),))
    with pytest.raises(UserError, match=r"one class folder \(cat\); classification needs"):
        folders.load_classification_folder(tmp_path / "one")
    with pytest.raises(UserError, match="`channels`=2 must be 1"):
        folders.load_classification_folder(tmp_path / "one", channels=2)


def test_trainer_fits_on_folder_data_with_ignore_index(tmp_path):
    """One epoch of a tiny U-Net through the Trainer on folder batches with void pixels."""
    import dlmodels.models as registry
    from dlmodels.training import Trainer

    _seg_folder(tmp_path, n=8, ignore=255)
    data = folders.load_segmentation_folder(
        tmp_path, image_size=16, ignore_index=255, fractions=(0.5, 0.5, 0.0)
    )
    model = registry.get(
        "unet", input_shape=data.input_shape, num_classes=data.num_classes, depth=1, base_filters=4
    )
    trainer = Trainer(model, task=data.task, ignore_index=data.ignore_index, progress=False)
    history = trainer.fit(
        data.dataset("train", batch_size=2, augment=True), data.dataset("validation", batch_size=2)
    )
    losses = [v for k, vs in history.items() if "loss" in k for v in np.ravel(vs)]
    assert losses and np.all(np.isfinite(losses))


def test_classification_split_is_stratified_by_largest_remainder(tmp_path):
    """Each class is cut on its own: bird 3, cat 5, dog 4 at (0.5, 0.25, 0.25) gives per class
    train 1 / 3 / 2 (3 * 0.5 = 1.5 loses its half to the larger 0.75 remainders; 5 * 0.5 = 2.5
    keeps it), validation 1 / 1 / 1 and test 1 / 1 / 1, for every seed."""
    _cls_folder(tmp_path)
    for seed in (0, 1):
        data = folders.load_classification_folder(tmp_path, fractions=(0.5, 0.25, 0.25), seed=seed)
        per_class = {
            s: np.bincount(data.arrays(s)[1], minlength=3).tolist() for s in folders.SPLITS
        }
        assert per_class == {"train": [1, 3, 2], "validation": [1, 1, 1], "test": [1, 1, 1]}
        expected = folders.split_indices(12, (0.5, 0.25, 0.25), seed, labels=data.labels)
        for name, idx in zip(folders.SPLITS, expected, strict=True):
            np.testing.assert_array_equal(data.splits[name], idx)

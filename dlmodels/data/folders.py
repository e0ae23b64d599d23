"""The user's own images: segmentation and classification folders, split reproducibly.

Two layouts are read (`detect_layout` tells which one a directory holds):

- segmentation: `DIR/images/` and `DIR/masks/` with matching file stems (`images/cat1.jpg` goes
  with `masks/cat1.png`). A mask is a single-channel PNG (mode L or P, 8 or 16 bit) whose pixel
  values are class indices 0..K-1, optionally with an ignore value (e.g. 255 for "void" as in
  PASCAL VOC) for pixels that count nowhere.
- classification: one sub-folder per class (`DIR/cat/*.png`, `DIR/dog/*.jpg`), as
  `keras.utils.image_dataset_from_directory` reads it: class names are the sorted folder names,
  labels their indices.

Images (PNG, JPEG, BMP, GIF, TIFF, WebP) are decoded with Pillow to float32 in [0, 1] (8-bit
values / 255, 16-bit / 65535), grayscale as 1 channel and colour as 3 (alpha is dropped). With
`image_size` every image is resized to it, images bilinearly (antialiased when shrinking) and
masks by nearest neighbour so they keep only the labels they hold; without it all images must
share one size. Every problem with the files is a `UserError` naming the file and what is wrong.

Everything is read into memory once (N x H x W x C float32); the split into train / validation
/ test is a seeded permutation (`split_indices`), the same on every call for a seed.

    data = load_folder("my_data/", image_size=(128, 128))
    model = dlmodels.models.get("unet", input_shape=data.input_shape, num_classes=data.num_classes)
    train_ds = data.dataset("train", batch_size=16, augment=True)
    Trainer(model, task=data.task, ...).fit(train_ds, data.dataset("validation", batch_size=16))
    x_test, y_test = data.arrays("test")
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from dlmodels._validation import check_choice, check_positive_int, normalize_tuple
from dlmodels.errors import UserError

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Lossy formats smear class indices at region borders into values no class has.
_LOSSY_SUFFIXES = (".jpg", ".jpeg", ".webp")
_GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N")
_COLOUR_MODES = ("RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")
_MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")
_LAYOUTS = (
    "Expected one of two layouts: segmentation, DIR/images/ and DIR/masks/ with matching file "
    "names (masks: single-channel PNGs of class indices); or classification, one sub-folder of "
    "images per class (DIR/cat/*.png, DIR/dog/*.png)."
)
_SHOWN = 5  # file names listed in one error message


def _listing(names) -> str:
    names = list(names)
    shown = ", ".join(str(n) for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


# --------------------------------------------------------------------------------------- splits


def _check_fractions(fractions, owner) -> tuple[float, ...]:
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        values = ()
    if (
        not values
        or any(not np.isfinite(v) or v < 0 for v in values)
        or abs(sum(values) - 1.0) > 1e-6
        or values[0] <= 0
    ):
        raise UserError(
            f"{owner}: `fractions`={fractions!r} must be non-negative numbers summing to 1 with a "
            "positive first (train) share, e.g. (0.8, 0.1, 0.1) or (0.9, 0.1, 0.0)."
        )
    return values


def _counts(n: int, fractions: tuple[float, ...]) -> np.ndarray:
    """Split sizes summing to n: floor of n * fraction, the rest to the largest remainders
    (earlier splits first on ties)."""
    exact = n * np.asarray(fractions)
    counts = np.floor(exact).astype(int)
    order = sorted(range(len(fractions)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - counts.sum()]:
        counts[i] += 1
    return counts


def split_indices(n: int, fractions=DEFAULT_FRACTIONS, seed: int = 0, *, labels=None):
    """Disjoint index arrays, one per fraction, that together cover `range(n)`.

    A seeded permutation of `0..n-1` cut into parts of `n * fraction` (rounded by largest
    remainder); each part is returned sorted. The same `(n, fractions, seed)` always gives the
    same parts. Without `labels`, every positive fraction gets at least one index (taken from
    the largest part), so a small data set still has a validation sample. With `labels`
    (classification) the split is stratified: each class is cut on its own, so every class keeps
    its share in every part.

    Args:
        n: number of samples (>= 1).
        fractions: shares of the parts, non-negative, summing to 1, the first positive
            (default train 0.8, validation 0.1, test 0.1).
        seed: seed of the permutation.
        labels: optional int array of length `n` to stratify by.

    Returns:
        A tuple of int64 index arrays, one per fraction.

    Raises:
        UserError: bad fractions, or fewer samples than positive fractions (without labels).
    """
    n = check_positive_int("n", n, owner="split_indices")
    fractions = _check_fractions(fractions, "split_indices")
    rng = np.random.default_rng(seed)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise UserError(f"split_indices: `labels` has shape {labels.shape}, expected ({n},).")
        parts = [[] for _ in fractions]
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            members = members[rng.permutation(len(members))]
            bounds = np.cumsum(_counts(len(members), fractions))[:-1]
            for part, chunk in zip(parts, np.split(members, bounds), strict=True):
                part.append(chunk)
        return tuple(np.sort(np.concatenate(p)).astype(np.int64) for p in parts)
    counts = _counts(n, fractions)
    positive = [i for i, f in enumerate(fractions) if f > 0]
    if n < len(positive):
        raise UserError(
            f"split_indices: {n} samples cannot fill {len(positive)} splits with fractions "
            f"{fractions}; add samples or give the empty splits a fraction of 0."
        )
    for i in positive:
        if counts[i] == 0:
            counts[int(np.argmax(counts))] -= 1
            counts[i] = 1
    perm = rng.permutation(n)
    return tuple(np.sort(p).astype(np.int64) for p in np.split(perm, np.cumsum(counts)[:-1]))


# ---------------------------------------------------------------------------------- the result


@dataclasses.dataclass
class FolderData:
    """Images and labels read from a folder, with a reproducible train / validation / test split.

    Attributes:
        task: "segmentation" or "classification" (the Trainer's task names).
        images: float32 (N, H, W, C) in [0, 1], every image of the folder in file order.
        labels: int32 masks (N, H, W) for segmentation, class ids (N,) for classification.
        files: the image paths relative to `root`, in the order of `images`.
        class_names: segmentation: "0".."K-1"; classification: the sorted folder names.
        image_size: (H, W) of `images`.
        channels: C, 1 (grayscale) or 3 (colour).
        ignore_index: the mask value excluded from loss and metrics, or None.
        splits: {"train" | "validation" | "test": sorted indices into `images`}.
        seed, fractions: what made the split.
        root: the folder read.
    """

    task: str
    images: np.ndarray
    labels: np.ndarray
    files: tuple
    class_names: tuple
    image_size: tuple
    channels: int
    ignore_index: int | None
    splits: dict
    seed: int
    fractions: tuple
    root: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple:
        """(H, W, C): the `input_shape` a model for these images takes."""
        return (*self.image_size, self.channels)

    def arrays(self, split: str):
        """`(images, labels)` of one split ("train", "validation" or "test") as numpy arrays."""
        check_choice("split", split, SPLITS, owner="FolderData.arrays")
        idx = self.splits[split]
        return self.images[idx], self.labels[idx]

    def summary(self) -> str:
        """One line for a log: what was read and how it was split."""
        h, w = self.image_size
        sizes = "/".join(str(len(self.splits[s])) for s in SPLITS)
        ignore = "" if self.ignore_index is None else f" (ignore {self.ignore_index})"
        return (
            f"{self.task}: {len(self.images)} images {h}x{w}x{self.channels} from {self.root}, "
            f"{self.num_classes} classes{ignore}, train/validation/test {sizes} (seed {self.seed})"
        )

    def dataset(
        self,
        split: str,
        *,
        batch_size: int,
        shuffle: bool | None = None,
        augment: bool = False,
        vertical_flip: bool = False,
        repeat: bool = False,
        drop_remainder: bool | None = None,
        seed: int | None = None,
    ):
        """A `tf.data.Dataset` of `(images, labels)` batches of one split, as `shapes.dataset`
        gives the Trainer: float32 (B, H, W, C) in [0, 1] and int32 (B, H, W) masks or (B,)
        class ids. Auto-sharding is DATA (the arrays are in memory, no files to shard).

        Args:
            split: "train", "validation" or "test".
            batch_size: the global batch size.
            shuffle: reshuffle every epoch (default: True for "train" only).
            augment: random horizontal flips (of image and mask together), seeded per element.
            vertical_flip: with `augment`, also random vertical flips (aerial or microscope
                images; not for street scenes or faces).
            repeat: repeat forever (then give the Trainer `steps_per_epoch`).
            drop_remainder: drop the last partial batch so batch shapes are static (default:
                True for "train", as `shapes.dataset` and TPUs want).
            seed: seed of the shuffle and the flips (default: the split's seed).

        Raises:
            UserError: the split is empty, or has fewer samples than `batch_size` while
                `drop_remainder` would leave no batch.
        """
        import tensorflow as tf

        check_choice("split", split, SPLITS, owner="FolderData.dataset")
        batch_size = check_positive_int("batch_size", batch_size, owner="FolderData.dataset")
        images, labels = self.arrays(split)
        is_train = split == "train"
        shuffle = is_train if shuffle is None else shuffle
        drop_remainder = is_train if drop_remainder is None else drop_remainder
        seed = self.seed if seed is None else seed
        if len(images) == 0:
            raise UserError(
                f"the {split!r} split of {self.root} is empty (fractions {self.fractions}); "
                "give it a positive fraction or add images."
            )
        if drop_remainder and len(images) < batch_size:
            raise UserError(
                f"the {split!r} split of {self.root} has {len(images)} images, fewer than "
                f"batch_size={batch_size}, so no full batch is left; lower the batch size to "
                f"<= {len(images)} or add images."
            )
        ds = tf.data.Dataset.from_tensor_slices((images, labels))
        if shuffle:
            ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()
        if augment:
            seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
            flip = _flipper(self.task == "segmentation", vertical_flip)
            ds = tf.data.Dataset.zip((ds, seeds)).map(flip, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        return ds.with_options(options)


def _flipper(flip_labels: bool, vertical: bool):
    import tensorflow as tf

    def flip(item, seeds):
        image, label = item
        # Stateless draws seeded per element: reproducible under a parallel map.
        draws = tf.random.stateless_uniform([2], seed=seeds) < 0.5
        image = tf.where(draws[0], image[:, ::-1], image)
        if flip_labels:
            label = tf.where(draws[0], label[:, ::-1], label)
        if vertical:
            image = tf.where(draws[1], image[::-1], image)
            if flip_labels:
                label = tf.where(draws[1], label[::-1], label)
        return image, label

    return flip


# ------------------------------------------------------------------------------------- layouts


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _existing_dir(path, owner) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{owner}: {path} does not exist. {_LAYOUTS}")
    if not path.is_dir():
        raise UserError(f"{owner}: {path} is a file, not a folder. {_LAYOUTS}")
    return path


def detect_layout(path: str | os.PathLike) -> str:
    """ "segmentation" (the folder has images/ and masks/) or "classification" (sub-folders of
    images, one per class).

    Raises:
        UserError: the path is missing or a file, has images/ without masks/ (or the reverse),
            or holds neither layout; the message describes both layouts.
    """
    path = _existing_dir(path, "detect_layout")
    has_images, has_masks = (path / "images").is_dir(), (path / "masks").is_dir()
    if has_images and has_masks:
        return "segmentation"
    if has_images or has_masks:
        found, missing = ("images", "masks") if has_images else ("masks", "images")
        raise UserError(
            f"{path} has {found}/ but no {missing}/: a segmentation folder needs both. {_LAYOUTS}"
        )
    if any(_image_files(sub) for sub in _subfolders(path)):
        return "classification"
    loose = _image_files(path)
    hint = (
        f" It holds {len(loose)} loose images ({_listing(p.name for p in loose)}): move them into "
        "one sub-folder per class, or into images/ with their masks in masks/."
        if loose
        else ""
    )
    raise UserError(f"{path} holds neither layout.{hint} {_LAYOUTS}")


# ------------------------------------------------------------------------------------- decoding


def _open(path: Path, what: str):
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBomb
        raise UserError(
            f"cannot read {what} {path}: {type(err).__name__}: {err}. Re-save it as PNG or "
            "remove it."
        ) from err


def _native_channels(img, path: Path) -> int:
    if img.mode in _GRAY_MODES:
        return 1
    if img.mode in _COLOUR_MODES:
        return 3
    raise UserError(
        f"image {path} has Pillow mode {img.mode!r}, which is not supported; save it as 8-bit "
        "grayscale or RGB (or 16-bit grayscale) PNG or JPEG."
    )


def _image_array(img, channels: int) -> np.ndarray:
    """float32 (H, W, channels) in [0, 1]."""
    if img.mode in ("1", "LA", "La"):
        img = img.convert("L")
    if img.mode in _GRAY_MODES:
        scale = 255.0 if img.mode == "L" else 65535.0
        gray = np.asarray(img).astype(np.float32) / np.float32(scale)
        return np.repeat(gray[..., None], channels, axis=-1)
    rgb = img.convert("RGB")
    if channels == 1:
        # ITU-R 601 luma, as Pillow's convert("L") but without rounding to 8 bits.
        arr = np.asarray(rgb).astype(np.float32)
        gray = arr @ np.asarray([0.299, 0.587, 0.114], np.float32)
        return (gray / np.float32(255.0))[..., None]
    return np.asarray(rgb).astype(np.float32) / np.float32(255.0)


def _resize_image(array: np.ndarray, size) -> np.ndarray:
    """Bilinear resize of float32 (H, W, C) to `size` (H, W), per channel in float precision;
    Pillow widens the filter when shrinking (antialiasing), as `tf.image.resize(antialias=True)`."""
    from PIL import Image

    h, w = size
    if array.shape[:2] == (h, w):
        return array
    planes = [
        np.asarray(Image.fromarray(np.ascontiguousarray(array[..., c])).resize((w, h), 2))
        for c in range(array.shape[-1])
    ]
    return np.clip(np.stack(planes, axis=-1), 0.0, 1.0).astype(np.float32)


def _resize_mask(mask: np.ndarray, size) -> np.ndarray:
    """Nearest-neighbour resize of an int32 (H, W) mask: output pixel (i, j) takes input pixel
    (floor((i + 0.5) * H_in / H), floor((j + 0.5) * W_in / W)), so only existing labels appear."""
    h, w = size
    rows = np.minimum(((np.arange(h) + 0.5) * mask.shape[0] / h).astype(np.intp), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * mask.shape[1] / w).astype(np.intp), mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]


def _check_channels(channels, owner):
    if channels is None:
        return None
    if channels not in (1, 3) or isinstance(channels, bool):
        raise UserError(
            f"{owner}: `channels`={channels!r} must be 1 (grayscale), 3 (RGB) or None (as the "
            "files are; they must then agree)."
        )
    return channels


def _check_size(image_size, owner):
    return None if image_size is None else normalize_tuple("image_size", image_size, 2, owner=owner)


def _check_common(path, image_size, channels, fractions, owner):
    """The arguments both loaders take: `(root, image_size, channels, fractions)`, checked."""
    root = _existing_dir(path, owner)
    image_size = _check_size(image_size, owner)
    channels = _check_channels(channels, owner)
    fractions = _check_fractions(fractions, owner)
    if len(fractions) != len(SPLITS):
        raise UserError(f"{owner}: `fractions` needs 3 shares (train, validation, test).")
    return root, image_size, channels, fractions


def _folder_data(task, x, y, paths, class_names, *, root, channels, ignore_index, fractions, seed):
    """Split and assemble the `FolderData` both loaders return: the seeded split of
    `split_indices` (stratified by label for classification), files relative to `root`."""
    stratify = y if task == "classification" else None
    parts = split_indices(len(y), fractions, seed, labels=stratify)
    return FolderData(
        task=task,
        images=x,
        labels=y,
        files=tuple(str(p.relative_to(root)) for p in paths),
        class_names=tuple(class_names),
        image_size=tuple(x.shape[1:3]),
        channels=channels,
        ignore_index=ignore_index,
        splits=dict(zip(SPLITS, parts, strict=True)),
        seed=seed,
        fractions=fractions,
        root=str(root),
    )


def _decode_images(paths: list[Path], image_size, channels, root: Path, owner: str):
    """Open every image, check channel counts and sizes agree (unless converted / resized) and
    return float32 (N, H, W, C), the opened sizes as (H, W), and C."""
    opened = [_open(p, "image") for p in paths]
    native = [_native_channels(img, p) for img, p in zip(opened, paths, strict=True)]
    if channels is None:
        kinds = sorted(set(native))
        if len(kinds) > 1:
            gray = next(p for p, c in zip(paths, native, strict=True) if c == 1)
            colour = next(p for p, c in zip(paths, native, strict=True) if c == 3)
            raise UserError(
                f"{owner}: the images in {root} have mixed channel counts: "
                f"{gray.relative_to(root)} is grayscale (1 channel), {colour.relative_to(root)} "
                "is colour (3 channels). Pass channels=3 (or 1) to convert them all."
            )
        channels = kinds[0]
    sizes = [(img.height, img.width) for img in opened]
    if image_size is None and len(set(sizes)) > 1:
        first = paths[0]
        other = next(p for p, s in zip(paths, sizes, strict=True) if s != sizes[0])
        raise UserError(
            f"{owner}: the images in {root} have different sizes: {first.relative_to(root)} is "
            f"{sizes[0][0]}x{sizes[0][1]}, {other.relative_to(root)} is "
            f"{sizes[paths.index(other)][0]}x{sizes[paths.index(other)][1]} (HxW). Pass "
            "image_size=(H, W) to resize them all."
        )
    size = image_size or sizes[0]
    out = np.empty((len(paths), *size, channels), np.float32)
    for i, img in enumerate(opened):
        out[i] = _resize_image(_image_array(img, channels), size)
    return out, sizes, channels


# -------------------------------------------------------------------------------- segmentation


def _by_stem(folder: Path, what: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in _image_files(folder):
        if p.stem in found:
            raise UserError(
                f"{what} {found[p.stem].name} and {p.name} in {folder} share the name "
                f"{p.stem!r}; keep one file per name."
            )
        found[p.stem] = p
    return found


def _read_mask(path: Path) -> np.ndarray:
    if path.suffix.lower() in _LOSSY_SUFFIXES:
        raise UserError(
            f"mask {path} is {path.suffix} (lossy compression changes class indices at region "
            "borders); save masks as PNG."
        )
    img = _open(path, "mask")
    if img.mode not in _MASK_MODES:
        raise UserError(
            f"mask {path} has mode {img.mode!r} ({len(img.getbands())} channels); masks must be "
            "single-channel PNGs whose pixel values are class indices (mode L or P). Convert "
            "colour-coded masks to class indices first."
        )
    return np.asarray(img).astype(np.int32)


def load_segmentation_folder(
    path: str | os.PathLike,
    *,
    image_size=None,
    channels: int | None = None,
    num_classes: int | None = None,
    ignore_index: int | None = None,
    fractions=DEFAULT_FRACTIONS,
    seed: int = 0,
) -> FolderData:
    """Read `path/images/*` and the masks `path/masks/*.png` of the same names.

    Args:
        path: the folder holding images/ and masks/.
        image_size: (H, W) or an int to resize everything to (images bilinear, masks nearest);
            None requires all images to share one size.
        channels: 1 or 3 to convert every image to; None keeps the files' (which must agree).
        num_classes: K, the labels allowed being 0..K-1; None infers max label + 1 (the ignore
            value excluded).
        ignore_index: a mask value (e.g. 255) excluded from loss and metrics, or None.
        fractions: train / validation / test shares (see `split_indices`).
        seed: seed of the split (and the default seed of `FolderData.dataset`).

    Returns:
        A `FolderData` with task "segmentation".

    Raises:
        UserError: no images; an image without a mask or a mask without an image (named); a
            mask whose size differs from its image's (file and both sizes); a label outside
            0..K-1 that is not the ignore value (file, value, range); an unreadable file; mixed
            channel counts or sizes without `channels` / `image_size`; a colour or JPEG mask.
    """
    owner = "load_segmentation_folder"
    root, image_size, channels, fractions = _check_common(
        path, image_size, channels, fractions, owner
    )
    if num_classes is not None:
        num_classes = check_positive_int("num_classes", num_classes, owner=owner)
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
    ):
        raise UserError(
            f"{owner}: `ignore_index`={ignore_index!r} must be an int (e.g. 255) or None."
        )
    for sub in ("images", "masks"):
        if not (root / sub).is_dir():
            raise UserError(f"{owner}: {root} has no {sub}/ folder. {_LAYOUTS}")
    images = _by_stem(root / "images", "images")
    masks = _by_stem(root / "masks", "masks")
    if not images:
        raise UserError(
            f"{owner}: no images ({', '.join(IMAGE_SUFFIXES)}) in {root / 'images'}. {_LAYOUTS}"
        )
    lonely = sorted(set(images) - set(masks))
    if lonely:
        raise UserError(
            f"{owner}: {len(lonely)} images in {root / 'images'} have no mask of the same name "
            f"in {root / 'masks'}: {_listing(images[s].name for s in lonely)}. Add the masks "
            "(same file name, .png) or remove those images."
        )
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise UserError(
            f"{owner}: {len(orphans)} masks in {root / 'masks'} have no image of the same name "
            f"in {root / 'images'}: {_listing(masks[s].name for s in orphans)}. Rename or "
            "remove them."
        )
    stems = sorted(images)
    image_paths = [images[s] for s in stems]
    x, sizes, channels = _decode_images(image_paths, image_size, channels, root, owner)
    size = tuple(x.shape[1:3])
    y = np.empty((len(stems), *size), np.int32)
    present = np.zeros(0, np.int64)
    for i, s in enumerate(stems):
        mask = _read_mask(masks[s])
        if mask.shape != sizes[i]:
            raise UserError(
                f"{owner}: mask {masks[s].relative_to(root)} is {mask.shape[0]}x{mask.shape[1]} "
                f"(HxW) but its image {image_paths[i].relative_to(root)} is "
                f"{sizes[i][0]}x{sizes[i][1]}; a mask must have its image's size."
            )
        values = np.unique(mask)
        labels = values[values != ignore_index] if ignore_index is not None else values
        bad = labels[(labels < 0) | (labels >= (num_classes or np.iinfo(np.int32).max))]
        if len(bad):
            allowed = "labels >= 0" if num_classes is None else f"labels 0..{num_classes - 1}"
            allowed += f" (num_classes={num_classes})" if num_classes is not None else ""
            ignore = "" if ignore_index is None else f" or the ignore value {ignore_index}"
            raise UserError(
                f"{owner}: mask {masks[s].relative_to(root)} holds the value {int(bad[0])}, "
                f"outside the {allowed}{ignore}. Fix the mask, raise num_classes, or pass "
                "ignore_index for a void value."
            )
        present = np.union1d(present, labels)
        y[i] = _resize_mask(mask, size)
    if num_classes is None:
        if len(present) == 0:
            raise UserError(
                f"{owner}: every mask pixel in {root / 'masks'} is the ignore value "
                f"{ignore_index}; there is nothing to learn."
            )
        others = present[present != 255]
        if ignore_index is None and len(others) < len(present) and others.max(initial=0) < 254:
            # 255 far above every other label is PASCAL VOC's "void", not class 255.
            raise UserError(
                f"{owner}: the masks hold 255 besides the labels "
                f"{_listing(int(v) for v in others)}: pass ignore_index=255 if 255 marks pixels "
                "to ignore (void, borders), or num_classes=256 if it is a class."
            )
        num_classes = int(present.max()) + 1
        if num_classes < 2:
            raise UserError(
                f"{owner}: every mask in {root / 'masks'} holds only label 0; segmentation "
                "needs at least 2 classes (0 background, 1.. objects)."
            )
    names = [str(k) for k in range(num_classes)]
    return _folder_data(
        "segmentation", x, y, image_paths, names, root=root, channels=channels,
        ignore_index=ignore_index, fractions=fractions, seed=seed,
    )  # fmt: skip


# ------------------------------------------------------------------------------ classification


def load_classification_folder(
    path: str | os.PathLike,
    *,
    image_size=None,
    channels: int | None = None,
    fractions=DEFAULT_FRACTIONS,
    seed: int = 0,
) -> FolderData:
    """Read one sub-folder of images per class, like `keras.utils.image_dataset_from_directory`.

    Class names are the sorted sub-folder names and labels their indices. The split is
    stratified: each class is cut into train / validation / test on its own.

    Args:
        path: the folder holding one sub-folder per class.
        image_size, channels, fractions, seed: as in `load_segmentation_folder`.

    Returns:
        A `FolderData` with task "classification" and labels (N,) int32.

    Raises:
        UserError: no class folders, fewer than 2, an empty class folder (named), an unreadable
            file, mixed channel counts or sizes without `channels` / `image_size`.
    """
    owner = "load_classification_folder"
    root, image_size, channels, fractions = _check_common(
        path, image_size, channels, fractions, owner
    )
    classes = _subfolders(root)
    if not classes:
        raise UserError(f"{owner}: {root} has no class sub-folders. {_LAYOUTS}")
    empty = [c.name for c in classes if not _image_files(c)]
    if empty:
        raise UserError(
            f"{owner}: class folders without images ({', '.join(IMAGE_SUFFIXES)}) in {root}: "
            f"{_listing(empty)}. Add images or remove the folders."
        )
    if len(classes) < 2:
        raise UserError(
            f"{owner}: {root} has one class folder ({classes[0].name}); classification needs at "
            "least 2. For segmentation use images/ and masks/."
        )
    paths, labels = [], []
    for k, c in enumerate(classes):
        files = _image_files(c)
        paths += files
        labels += [k] * len(files)
    x, _, channels = _decode_images(paths, image_size, channels, root, owner)
    y = np.asarray(labels, np.int32)
    names = [c.name for c in classes]
    return _folder_data(
        "classification", x, y, paths, names, root=root, channels=channels, ignore_index=None,
        fractions=fractions, seed=seed,
    )  # fmt: skip


def load_folder(
    path: str | os.PathLike,
    *,
    image_size=None,
    channels: int | None = None,
    num_classes: int | None = None,
    ignore_index: int | None = None,
    fractions=DEFAULT_FRACTIONS,
    seed: int = 0,
) -> FolderData:
    """`detect_layout(path)`, then `load_segmentation_folder` or `load_classification_folder`.

    `num_classes` and `ignore_index` apply to segmentation; for a classification folder
    `num_classes`, when given, must equal the number of class folders and `ignore_index` must
    be None.
    """
    layout = detect_layout(path)
    if layout == "segmentation":
        return load_segmentation_folder(
            path,
            image_size=image_size,
            channels=channels,
            num_classes=num_classes,
            ignore_index=ignore_index,
            fractions=fractions,
            seed=seed,
        )
    if ignore_index is not None:
        raise UserError(
            f"{path} is a classification folder (one sub-folder per class); ignore_index "
            f"({ignore_index}) applies to segmentation masks only."
        )
    data = load_classification_folder(
        path, image_size=image_size, channels=channels, fractions=fractions, seed=seed
    )
    if num_classes is not None and num_classes != data.num_classes:
        raise UserError(
            f"{path} has {data.num_classes} class folders ({_listing(data.class_names)}) but "
            f"num_classes={num_classes}; drop num_classes or fix the folders."
        )
    return data

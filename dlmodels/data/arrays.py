"""User data for calibration and verification: `.npz` / `.npy` files and folders of images.

What `dlmodels export --data` reads. Arrays are matched to a model's inputs by name; images are
decoded and resized with TensorFlow (no extra image library) to the model's input size. With
`max_samples` only the samples used are read into memory: `.npy` files are memory-mapped, `.npz`
members are streamed row by row, and only the chosen image files are decoded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dlmodels.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
LABEL_KEYS = ("y", "labels")


def sample_indices(n: int, max_samples: int | None = None, seed: int | None = None) -> np.ndarray:
    """Which of `n` samples to use, in the order to use them.

    Without `seed`: the first `max_samples` (all when None), in file order. With `seed`: a
    seeded random permutation of all `n`, cut to `max_samples`, so a subset (and any split of it
    into calibration and verification parts) is not biased by how the file is sorted.
    """
    k = n if max_samples is None else min(n, max_samples)
    if seed is None:
        return np.arange(k)
    return np.random.default_rng(seed).permutation(n)[:k]


def load_arrays(
    path: str | os.PathLike,
    input_names: Sequence[str],
    *,
    input_shapes: Sequence[Sequence[int | None]] | None = None,
    image_size: tuple[int, int] | None = None,
    rescale: float = 1.0 / 255.0,
    max_samples: int | None = None,
    seed: int | None = None,
    ignore_index: int | None = None,
):
    """Read model inputs (and optional labels) from an `.npz`, a `.npy` or a folder of images.

    - `.npz`: one array per model input, named after the input; a single-input model may use
      `x` instead. Labels, when present, are the array `y` (or `labels`).
    - `.npy`: the one input of a single-input model; no labels.
    - a training folder (`dlmodels.data.folders`: `images/` + `masks/`, or one sub-folder per
      class): every image with its mask or class label, resized to the model's input size;
      `ignore_index` names the mask value that marks void pixels (e.g. 255).
    - a folder: the images in it (png, jpg, bmp, gif; sorted by name) for a single image input
      (batch, H, W, C); decoded with C channels, resized to the model's H x W when fixed (else to
      `image_size`, else every image must have the same size), multiplied by `rescale`.

    Args:
        path: the file or folder.
        input_names: the model's input names, in order.
        input_shapes: the model's input shapes with the batch axis (e.g. `(None, 32, 32, 3)`);
            needed for image folders.
        image_size: (H, W) for models with a dynamic spatial size.
        rescale: factor applied to decoded image pixels (0..255).
        max_samples: keep at most this many samples; only those are read into memory.
        seed: None keeps file order (the first `max_samples`); an int returns a seeded random
            subset in random order (see `sample_indices`), the same for inputs and labels.

    Returns:
        `(inputs, labels)`: inputs is {input name: array}; labels is an array or None.

    Raises:
        FileNotFoundError: `path` does not exist.
        UserError (a ValueError): naming what is missing or mismatched and what was expected.
    """
    path = Path(path)
    names = list(input_names)
    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist")
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise UserError(f"max_samples must be an int >= 1 or None, got {max_samples!r}")
    labels = None
    if path.is_dir() and _is_layout_folder(path):
        return _layout_folder_arrays(
            path, names, input_shapes, image_size, max_samples, seed, ignore_index
        )
    if path.is_dir():
        files = _image_files(path, names, input_shapes)
        idx = sample_indices(len(files), max_samples, seed)
        picked = [files[i] for i in idx]
        inputs = {names[0]: _load_images(path, picked, input_shapes, image_size, rescale)}
        return inputs, None
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            keys = list(data.files)
            if all(n in keys for n in names):
                members = {n: n for n in names}
            elif len(names) == 1 and "x" in keys:
                members = {names[0]: "x"}
            else:
                raise UserError(
                    f"{path} holds arrays {keys}; the model's inputs are {names}. Name one array "
                    "per input after the input"
                    + (" (or 'x' for a single input)" if len(names) == 1 else "")
                    + "; labels go in 'y'."
                )
            label_key = next((k for k in LABEL_KEYS if k in keys), None)
            wanted = {**members, **({_LABELS: label_key} if label_key else {})}
            counts = {k: _npz_count(data, path, m) for k, m in wanted.items()}
            _check_counts(path, counts)
            idx = sample_indices(next(iter(counts.values())), max_samples, seed)
            arrays = {k: _npz_rows(data, m, idx) for k, m in wanted.items()}
        labels = arrays.pop(_LABELS, None)
        return arrays, labels
    if path.suffix == ".npy":
        if len(names) != 1:
            raise UserError(
                f"{path} is one array but the model has inputs {names}; use an .npz with one "
                "array per input name."
            )
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        if mapped.ndim == 0:
            raise UserError(f"{path} holds a scalar; expected samples along the first axis")
        idx = sample_indices(len(mapped), max_samples, seed)
        return {names[0]: _take(mapped, idx)}, None
    raise UserError(
        f"--data {path}: expected an .npz or .npy file or a folder of images "
        f"({', '.join(IMAGE_SUFFIXES)})."
    )


_LABELS = "\0labels"


def _is_layout_folder(path: Path) -> bool:
    """A training folder (`dlmodels.data.folders`): images/ + masks/, or class sub-folders."""
    if (path / "images").is_dir() and (path / "masks").is_dir():
        return True
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    return bool(entries) and all(p.is_dir() for p in entries)


def _layout_folder_arrays(path, names, input_shapes, image_size, max_samples, seed, ignore_index):
    """Images and labels of a segmentation or classification folder, resized to the model's
    input size, every split together (calibration and verification draw from them)."""
    from dlmodels.data import folders

    if len(names) != 1:
        raise UserError(f"{path} is an image folder but the model has inputs {names}")
    shape = tuple(input_shapes[0]) if input_shapes else (None, None, None, None)
    size = tuple(shape[1:3]) if None not in shape[1:3] else image_size
    data = folders.load_folder(
        path,
        image_size=size,
        channels=shape[-1],
        ignore_index=ignore_index if (path / "masks").is_dir() else None,
    )
    idx = sample_indices(len(data.images), max_samples, seed)
    return {names[0]: data.images[idx]}, data.labels[idx]


def _check_counts(path: Path, counts: dict[str, int]) -> None:
    if len(set(counts.values())) != 1:
        shown = {("labels" if k == _LABELS else k): v for k, v in counts.items()}
        raise UserError(
            f"{path}: arrays have different numbers of samples {shown}; give the same count "
            "for every input and the labels."
        )


def _take(array, idx: np.ndarray) -> np.ndarray:
    """`array[idx]` reading rows in file order (a memory map pages in only those rows)."""
    order = np.argsort(idx, kind="stable")
    out = np.asarray(array[idx[order]])
    result = np.empty_like(out)
    result[order] = out
    return result


def _npy_header(f):
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        return fmt.read_array_header_1_0(f)
    if version == (2, 0):
        return fmt.read_array_header_2_0(f)
    return None


def _npz_count(data, path: Path, key: str) -> int:
    with data.zip.open(f"{key}.npy") as f:
        header = _npy_header(f)
    shape = header[0] if header is not None else np.shape(data[key])
    if not shape:
        raise UserError(f"{path}: array {key!r} is a scalar; expected samples on the first axis")
    return int(shape[0])


def _npz_rows(data, key: str, idx: np.ndarray) -> np.ndarray:
    """Rows `idx` of the .npz member `key`, streamed: only those rows are kept in memory."""
    with data.zip.open(f"{key}.npy") as f:
        header = _npy_header(f)
        if header is None or header[1] or header[2].hasobject:  # v3 header, Fortran, objects
            return np.asarray(data[key])[idx]
        shape, _, dtype = header
        row_shape = tuple(shape[1:])
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        start = f.tell()
        out = np.empty((len(idx), *row_shape), dtype=dtype)
        if len(idx) and np.array_equal(idx, np.arange(len(idx))):  # a prefix: one read
            buf = f.read(row_bytes * len(idx))
            out[...] = np.frombuffer(buf, dtype=dtype).reshape(out.shape)
            return out
        for j in np.argsort(idx, kind="stable"):  # forward seeks only: no re-decompression
            f.seek(start + int(idx[j]) * row_bytes)
            out[j] = np.frombuffer(f.read(row_bytes), dtype=dtype).reshape(row_shape)
        return out


def _image_files(folder: Path, names, input_shapes) -> list[Path]:
    if len(names) != 1:
        raise UserError(
            f"a folder of images feeds a single image input; the model has inputs {names}. "
            "Use an .npz with one array per input name."
        )
    shape = tuple(input_shapes[0]) if input_shapes else (None, None, None, 3)
    if len(shape) != 4:
        raise UserError(
            f"a folder of images needs an image input (batch, H, W, C); input {names[0]!r} has "
            f"shape {shape}. Use an .npz instead."
        )
    channels = shape[3] or 3
    if channels not in (1, 3, 4):
        raise UserError(
            f"input {names[0]!r} has {channels} channels; image files have 1, 3 or 4. Use an .npz."
        )
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the folder {folder}")
    return files


def _load_images(folder: Path, files, input_shapes, image_size, rescale) -> np.ndarray:
    import tensorflow as tf

    shape = tuple(input_shapes[0]) if input_shapes else (None, None, None, 3)
    channels = shape[3] or 3
    size = (shape[1], shape[2]) if shape[1] and shape[2] else image_size
    out = []
    for f in files:
        img = tf.io.decode_image(
            tf.io.read_file(str(f)), channels=channels, expand_animations=False
        )
        img = tf.cast(img, tf.float32)
        if size is not None:
            img = tf.image.resize(img, size, method="bilinear")
        out.append(img.numpy())
    sizes = {a.shape for a in out}
    if len(sizes) != 1:
        raise UserError(
            f"images in {folder} have different sizes {sorted(sizes)} and the model's input size "
            "is dynamic; give --image-size HxW to resize them."
        )
    return (np.stack(out) * rescale).astype(np.float32)

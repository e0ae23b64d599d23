"""User data for calibration and verification: `.npz` / `.npy` files and folders of images.

What `dlmodels export --data` reads. Arrays are matched to a model's inputs by name; images are
decoded and resized with TensorFlow (no extra image library) to the model's input size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
LABEL_KEYS = ("y", "labels")


def load_arrays(
    path: str | os.PathLike,
    input_names: Sequence[str],
    *,
    input_shapes: Sequence[Sequence[int | None]] | None = None,
    image_size: tuple[int, int] | None = None,
    rescale: float = 1.0 / 255.0,
    max_samples: int | None = None,
):
    """Read model inputs (and optional labels) from an `.npz`, a `.npy` or a folder of images.

    - `.npz`: one array per model input, named after the input; a single-input model may use
      `x` instead. Labels, when present, are the array `y` (or `labels`).
    - `.npy`: the one input of a single-input model; no labels.
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
        max_samples: keep at most this many samples.

    Returns:
        `(inputs, labels)`: inputs is {input name: array}; labels is an array or None.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: naming what is missing or mismatched and what was expected.
    """
    path = Path(path)
    names = list(input_names)
    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist")
    labels = None
    if path.is_dir():
        inputs = {names[0]: _load_images(path, names, input_shapes, image_size, rescale)}
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            keys = list(data.files)
            if all(n in keys for n in names):
                inputs = {n: data[n] for n in names}
            elif len(names) == 1 and "x" in keys:
                inputs = {names[0]: data["x"]}
            else:
                raise ValueError(
                    f"{path} holds arrays {keys}; the model's inputs are {names}. Name one array "
                    "per input after the input"
                    + (" (or 'x' for a single input)" if len(names) == 1 else "")
                    + "; labels go in 'y'."
                )
            label_key = next((k for k in LABEL_KEYS if k in keys), None)
            labels = data[label_key] if label_key else None
    elif path.suffix == ".npy":
        if len(names) != 1:
            raise ValueError(
                f"{path} is one array but the model has inputs {names}; use an .npz with one "
                "array per input name."
            )
        inputs = {names[0]: np.load(path, allow_pickle=False)}
    else:
        raise ValueError(
            f"--data {path}: expected an .npz or .npy file or a folder of images "
            f"({', '.join(IMAGE_SUFFIXES)})."
        )
    n = {len(v) for v in inputs.values()}
    if labels is not None:
        n.add(len(labels))
    if len(n) != 1:
        raise ValueError(
            f"{path}: arrays have different numbers of samples "
            f"{ {k: len(v) for k, v in inputs.items()} }"
            + (f", labels {len(labels)}" if labels is not None else "")
            + "; give the same count for every input and the labels."
        )
    if max_samples is not None:
        inputs = {k: v[:max_samples] for k, v in inputs.items()}
        labels = None if labels is None else labels[:max_samples]
    return inputs, labels


def _load_images(folder: Path, names, input_shapes, image_size, rescale) -> np.ndarray:
    import tensorflow as tf

    if len(names) != 1:
        raise ValueError(
            f"a folder of images feeds a single image input; the model has inputs {names}. "
            "Use an .npz with one array per input name."
        )
    shape = tuple(input_shapes[0]) if input_shapes else (None, None, None, 3)
    if len(shape) != 4:
        raise ValueError(
            f"a folder of images needs an image input (batch, H, W, C); input {names[0]!r} has "
            f"shape {shape}. Use an .npz instead."
        )
    channels = shape[3] or 3
    if channels not in (1, 3, 4):
        raise ValueError(
            f"input {names[0]!r} has {channels} channels; image files have 1, 3 or 4. Use an .npz."
        )
    size = (shape[1], shape[2]) if shape[1] and shape[2] else image_size
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the folder {folder}")
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
        raise ValueError(
            f"images in {folder} have different sizes {sorted(sizes)} and the model's input size "
            "is dynamic; give --image-size HxW to resize them."
        )
    return (np.stack(out) * rescale).astype(np.float32)

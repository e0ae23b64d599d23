"""`.keras` export: the native Keras archive (config + weights), written atomically."""

from __future__ import annotations

import os
from pathlib import Path

from dlmodels.errors import UserError
from dlmodels.export._atomic import atomic_path, check_target


def to_keras(model, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save `model` as a `.keras` archive at `path`, atomically.

    The archive is what `keras.saving.load_model(path, safe_mode=True)` reads back: the model's
    config plus its weights, no pickled code.

    Args:
        model: a Keras model.
        path: destination ending in `.keras`; parent directories are created.
        overwrite: replace an existing file. Without it an existing `path` raises
            FileExistsError before anything is written.

    Returns:
        The path written.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise UserError(
            f"to_keras writes the .keras format; the path must end in '.keras', got {str(path)!r}. "
            "Use to_saved_model or to_onnx for other formats."
        )
    check_target(path, overwrite=overwrite)
    with atomic_path(path, overwrite=overwrite) as tmp:
        model.save(tmp)
    return path

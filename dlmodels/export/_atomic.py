"""Atomic writes: an artifact is either the complete new version or untouched.

Exports take seconds to minutes and can fail half-way (an unsupported op, a full disk, Ctrl-C).
Writing straight onto the target would leave a truncated file that a model server happily
hot-reloads. Everything here writes into a hidden temp sibling in the same directory (so the final
rename never crosses filesystems) and only then swaps it onto the target.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def check_target(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """Return `path` as a Path; raise FileExistsError if it exists and `overwrite` is False.

    Called before any work so a refused export costs nothing and touches nothing.
    """
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise FileExistsError(
            f"{path} already exists; pass overwrite=True to replace it (the old version is "
            "replaced atomically only once the new one is complete)."
        )
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Move `tmp` onto `target`; a directory target is renamed away first, then deleted."""
    if not target.is_dir() or target.is_symlink():
        # os.replace is atomic for a file (or a missing target) on POSIX.
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)  # put the previous version back
        raise
    _remove(old)


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, *, overwrite: bool = False, directory: bool = False
) -> Iterator[Path]:
    """Yield a temp sibling of `path` to write into; on success swap it onto `path`.

    Args:
        path: the final file or directory.
        overwrite: replace an existing `path`; otherwise FileExistsError before anything runs.
        directory: the artifact is a directory (SavedModel): the temp path is an empty directory.
            For a file the temp path does not exist yet and keeps `path`'s suffix (Keras insists
            on `.keras`).

    On any exception the temp path is removed and an existing `path` is left as it was.
    """
    target = check_target(path, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(
            prefix=f".{target.stem}.tmp-", suffix=target.suffix, dir=target.parent
        )
        os.close(fd)
        tmp = Path(name)
        tmp.unlink()  # writers (Keras, onnx) want to create the file themselves
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"the export wrote nothing to the temporary path {tmp}")
        # The target may have appeared while we worked; honour overwrite=False to the end.
        check_target(target, overwrite=overwrite)
        _swap_into_place(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    """Write `data` to `path` atomically (temp sibling, fsync, rename)."""
    with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)

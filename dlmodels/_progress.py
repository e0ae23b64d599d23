"""Progress bars for long library steps (export, calibration, benchmarks), drawn with rich.

A bar is drawn only on an interactive terminal (stderr is a TTY) and never when the environment
sets ``DLMODELS_PROGRESS=0``; otherwise the helpers cost nothing and print nothing, so logs,
pipes, CI and tests stay clean. Bars are transient: they vanish when the step ends.

    with steps("calibrating", total=len(batches)) as advance:
        for batch in batches:
            ...
            advance()

    for fmt in track(formats, "exporting"):
        ...
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def enabled(stream=None) -> bool:
    """True when a bar would be drawn: stderr is a terminal and DLMODELS_PROGRESS is not 0."""
    if os.environ.get("DLMODELS_PROGRESS", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def steps(description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, note="")``: moves a bar of `total` steps (or a spinner when None)."""
    if not enabled():
        yield lambda n=1, note="": None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = [SpinnerColumn(), TextColumn("{task.description}")]
    if total is not None:
        columns += [BarColumn(), MofNCompleteColumn()]
    columns += [TimeElapsedColumn(), TextColumn("{task.fields[note]}")]
    # No stdout/stderr redirection: what the step prints stays on its own stream (a redirected
    # stdout would land on the terminal instead of the file or pipe it was sent to).
    with Progress(
        *columns,
        console=Console(stderr=True),
        transient=True,
        redirect_stdout=False,
        redirect_stderr=False,
    ) as progress:
        task = progress.add_task(description, total=total, note="")

        def advance(n: int = 1, note: str = "") -> None:
            progress.update(task, advance=n, note=note)

        yield advance


def track(iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate `iterable` with a bar (``total`` defaults to ``len(iterable)`` when it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with steps(description, total) as advance:
        for item in iterable:
            yield item
            advance()

"""Dynamic batching: requests for one model version merged into one onnxruntime run.

As in Triton's dynamic batcher, a request waits at most `max_queue_delay` for others to join it;
up to `max_batch_size` rows (the first axis) run together, and only requests whose inputs agree
on every non-batch size and dtype are merged (different shapes are never mixed: they wait for a
batch of their own). One batch per model version runs at a time; requests arriving meanwhile
queue up and form the next batch, so under load batches grow without any added delay.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np


class _Item:
    __slots__ = ("enqueued", "feeds", "future", "key", "rows")

    def __init__(self, feeds, rows, key, future):
        self.feeds = feeds
        self.rows = rows
        self.key = key
        self.future = future
        self.enqueued = time.perf_counter()


def batch_key(feeds: dict[str, np.ndarray]) -> tuple:
    """What must agree for requests to share a batch: per input, its dtype and non-batch shape."""
    return tuple((name, a.dtype.str, a.shape[1:]) for name, a in feeds.items())


class Activity:
    """Requests in the server now (`inflight`) and those of them already waiting for an
    inference (`waiting`): the difference is how many could still join a batch. When it is 0
    the batcher runs at once instead of waiting out `max_queue_delay` for nobody (a lone
    client at concurrency 1 pays no batching delay)."""

    __slots__ = ("inflight", "waiting")

    def __init__(self):
        self.inflight = 0
        self.waiting = 0

    def arriving(self) -> int:
        return self.inflight - self.waiting


class DynamicBatcher:
    """Merge concurrent requests into batches for `run(feeds) -> list of output arrays`.

    Args:
        run: runs one (merged) feed dict; blocking, called in `executor`.
        executor: where `run` is called (onnxruntime releases the GIL while it runs).
        max_batch_size: most rows per run.
        max_queue_delay: seconds a request waits for others to join its batch.
        activity: when given, the batcher stops waiting as soon as no other request is on its
            way (`activity.arriving() <= 0`); without it, it always waits (Triton's rule).
        inline: call `run` on the event loop itself (for models faster than a thread hand-off).
        on_batch: called with (rows, requests, queue seconds list, infer seconds) after each run.
        on_depth: called with the number of queued requests when it changes.
    """

    def __init__(
        self,
        run: Callable,
        executor: Executor,
        *,
        max_batch_size: int,
        max_queue_delay: float,
        activity: Activity | None = None,
        inline: bool = False,
        on_batch: Callable | None = None,
        on_depth: Callable | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_delay < 0:
            raise ValueError(f"max_queue_delay must be >= 0 seconds, got {max_queue_delay}")
        self._run = run
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay
        self._activity = activity
        self.inline = inline
        self._on_batch = on_batch
        self._on_depth = on_depth
        self._pending: collections.deque[_Item] = collections.deque()
        self._waiter: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self.batches = 0

    @property
    def depth(self) -> int:
        return len(self._pending)

    def submit(self, feeds: dict[str, np.ndarray], rows: int) -> asyncio.Future:
        """Queue a request (call from the event loop); the future gets its output list."""
        if self._closing:
            raise RuntimeError("batcher is closed")
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._task = loop.create_task(self._loop())
        future = loop.create_future()
        self._pending.append(_Item(feeds, rows, batch_key(feeds), future))
        self._wake()
        if self._on_depth:
            self._on_depth(len(self._pending))
        return future

    async def close(self) -> None:
        """Finish every queued request, then stop."""
        self._closing = True
        self._wake()
        if self._task is not None:
            await self._task

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        handle = loop.call_later(timeout, self._wake) if timeout is not None else None
        try:
            await self._waiter
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    def _select(self) -> tuple[list[_Item], int]:
        first = self._pending[0]
        chosen, rows = [], 0
        for item in self._pending:
            if item.key == first.key and rows + item.rows <= self.max_batch_size:
                chosen.append(item)
                rows += item.rows
                if rows == self.max_batch_size:
                    break
        return chosen, rows

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                await self._wait(None)
                continue
            deadline = self._pending[0].enqueued + self.max_queue_delay
            while True:
                chosen, rows = self._select()
                if rows >= self.max_batch_size or self._closing:
                    break
                if self._activity is not None and self._activity.arriving() <= 0:
                    break
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                await self._wait(remaining)
            for item in chosen:
                self._pending.remove(item)
            if self._on_depth:
                self._on_depth(len(self._pending))
            live = [i for i in chosen if not i.future.done()]  # drop cancelled requests
            if live:
                await self._execute(loop, live)

    async def _execute(self, loop, items: list[_Item]) -> None:
        start = time.perf_counter()
        try:  # any failure (merging included) goes to the requests, never kills the loop
            if len(items) == 1:
                feeds = items[0].feeds
            else:
                feeds = {n: np.concatenate([i.feeds[n] for i in items]) for n in items[0].feeds}
            if self.inline:
                outputs = self._run(feeds)
            else:
                outputs = await loop.run_in_executor(self._executor, self._run, feeds)
        except Exception as err:
            if len(items) == 1:
                if not items[0].future.done():
                    items[0].future.set_exception(err)
                return
            # One bad request (an index out of an embedding's range, say) must not fail the
            # others it was merged with: run each on its own, so only it gets the error.
            for item in items:
                try:
                    if self.inline:
                        part = self._run(item.feeds)
                    else:
                        part = await loop.run_in_executor(self._executor, self._run, item.feeds)
                except Exception as single:
                    if not item.future.done():
                        item.future.set_exception(single)
                else:
                    if not item.future.done():
                        item.future.set_result(part)
            return
        done = time.perf_counter()
        self.batches += 1
        offset = 0
        for item in items:
            # Views into the batch's outputs: no copy per request.
            part = [o[offset : offset + item.rows] for o in outputs]
            offset += item.rows
            if not item.future.done():
                item.future.set_result(part)
        if self._on_batch:
            rows = sum(i.rows for i in items)
            self._on_batch(rows, len(items), [start - i.enqueued for i in items], done - start)

"""The dynamic batcher: merges concurrent requests up to max_batch_size, splits the outputs
back to the right request, never mixes shapes, waits only while others can still join, and
drains its queue on close; with a real onnxruntime session the batched answers equal per-request
runs."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest

from serving.batcher import Activity, DynamicBatcher


class Recorder:
    """run(): doubles x and records every batch's shape."""

    def __init__(self):
        self.shapes = []

    def __call__(self, feeds):
        self.shapes.append(feeds["x"].shape)
        return [feeds["x"] * 2, feeds["x"].sum(axis=tuple(range(1, feeds["x"].ndim)))]


@pytest.fixture(scope="module")
def executor():
    with ThreadPoolExecutor(2) as ex:
        yield ex


def run(coro):
    return asyncio.run(coro)


def xs(n, shape=(3,), rows=1, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((rows, *shape)).astype("float32") for _ in range(n)]


def test_concurrent_requests_become_one_batch_and_split_back(executor):
    rec = Recorder()

    async def go():
        b = DynamicBatcher(rec, executor, max_batch_size=32, max_queue_delay=0.05)
        inputs = xs(6)
        outs = await asyncio.gather(*(b.submit({"x": x}, 1) for x in inputs))
        await b.close()
        return inputs, outs

    inputs, outs = run(go())
    assert rec.shapes == [(6, 3)]  # one run for six requests
    for x, (doubled, total) in zip(inputs, outs, strict=True):
        np.testing.assert_array_equal(doubled, x * 2)  # each request gets its own rows back
        np.testing.assert_array_equal(total, x.sum(axis=1))


def test_max_batch_size_and_multi_row_requests(executor):
    rec = Recorder()

    async def go():
        b = DynamicBatcher(rec, executor, max_batch_size=4, max_queue_delay=0.05)
        inputs = xs(3, rows=2) + xs(3, rows=1, seed=1)  # rows 2, 2, 2, 1, 1, 1
        rows = [2, 2, 2, 1, 1, 1]
        outs = await asyncio.gather(
            *(b.submit({"x": x}, r) for x, r in zip(inputs, rows, strict=True))
        )
        await b.close()
        return inputs, outs

    inputs, outs = run(go())
    assert [s[0] for s in rec.shapes] == [4, 4, 1]  # 2+2 | 2+1+1 | 1: never above 4 rows
    for x, (doubled, _) in zip(inputs, outs, strict=True):
        np.testing.assert_array_equal(doubled, x * 2)


def test_different_shapes_are_never_mixed(executor):
    rec = Recorder()

    async def go():
        b = DynamicBatcher(rec, executor, max_batch_size=32, max_queue_delay=0.05)
        a, c = xs(4, shape=(3,)), xs(4, shape=(5,), seed=2)
        d = [x.astype("float64") for x in xs(2, shape=(3,), seed=3)]
        inputs = [v for pair in zip(a, c, strict=True) for v in pair] + d
        outs = await asyncio.gather(*(b.submit({"x": x}, 1) for x in inputs))
        await b.close()
        return inputs, outs

    inputs, outs = run(go())
    assert sorted(rec.shapes) == [(2, 3), (4, 3), (4, 5)]  # float64 rows batch on their own
    for x, (doubled, _) in zip(inputs, outs, strict=True):
        assert doubled.dtype == x.dtype
        np.testing.assert_array_equal(doubled, x * 2)


@pytest.mark.parametrize("arriving", [0, 1])
def test_waits_only_while_another_request_can_join(executor, arriving):
    """With a 10 s delay: when nothing else is on its way the first request runs alone at
    once; when one more is announced (in flight, not yet queued) the batcher waits for it."""
    rec = Recorder()
    activity = Activity()

    async def go():
        b = DynamicBatcher(rec, executor, max_batch_size=8, max_queue_delay=10.0, activity=activity)
        activity.inflight = 1 + arriving
        activity.waiting = 1
        first = b.submit({"x": xs(1)[0]}, 1)
        await asyncio.sleep(0.2)
        activity.waiting = 2
        second = b.submit({"x": xs(1, seed=1)[0]}, 1)
        activity.inflight = 2
        await asyncio.gather(first, second)
        await b.close()

    run(go())
    assert rec.shapes == ([(1, 3), (1, 3)] if arriving == 0 else [(2, 3)])


def test_close_finishes_queued_requests_and_errors_reach_every_request(executor):
    def failing(feeds):
        raise RuntimeError("boom")

    async def go():
        rec = Recorder()
        b = DynamicBatcher(rec, executor, max_batch_size=2, max_queue_delay=1.0)
        futures = [b.submit({"x": x}, 1) for x in xs(5)]
        await b.close()  # does not wait out the delay, but answers all five
        assert all(f.done() for f in futures) and len(rec.shapes) == 3
        with pytest.raises(RuntimeError):
            b.submit({"x": xs(1)[0]}, 1)
        bad = DynamicBatcher(failing, executor, max_batch_size=4, max_queue_delay=0.01)
        results = await asyncio.gather(
            *(bad.submit({"x": x}, 1) for x in xs(3)), return_exceptions=True
        )
        await bad.close()
        return results

    results = run(go())
    assert [str(r) for r in results] == ["boom"] * 3


def test_batched_onnxruntime_equals_one_request_at_a_time(repo, executor):
    repo_dir, _ = repo
    sess = ort.InferenceSession(str(repo_dir / "unet" / "model.onnx"))
    rng = np.random.default_rng(5)
    inputs = [rng.uniform(0, 1, (n, 32, 32, 3)).astype("float32") for n in (1, 3, 1, 2, 1)]
    runs = []

    def infer(feeds):
        runs.append(len(feeds["image"]))
        return sess.run(None, feeds)

    async def go():
        b = DynamicBatcher(infer, executor, max_batch_size=16, max_queue_delay=0.05)
        outs = await asyncio.gather(*(b.submit({"image": x}, len(x)) for x in inputs))
        await b.close()
        return outs

    outs = run(go())
    assert runs == [8]
    for x, (logits,) in zip(inputs, outs, strict=True):
        (want,) = sess.run(None, {"image": x})
        assert logits.shape == want.shape
        np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


def test_one_bad_request_does_not_fail_the_batch_it_joined(executor):
    """A merged run that fails is retried request by request: only the culprit gets the error."""
    calls = []

    def picky(feeds):
        calls.append(len(feeds["x"]))
        if (feeds["x"] > 100).any():
            raise ValueError("value out of range")
        return [feeds["x"] * 2]

    async def go():
        b = DynamicBatcher(picky, executor, max_batch_size=8, max_queue_delay=0.05)
        inputs = xs(4)
        inputs[2] = inputs[2] + 1000
        results = await asyncio.gather(
            *(b.submit({"x": x}, 1) for x in inputs), return_exceptions=True
        )
        await b.close()
        return inputs, results

    inputs, results = run(go())
    assert calls == [4, 1, 1, 1, 1]  # the merged run, then one run per request
    assert isinstance(results[2], ValueError)
    for i in (0, 1, 3):
        np.testing.assert_array_equal(results[i][0], inputs[i] * 2)

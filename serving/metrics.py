"""Prometheus metrics of one server (its own registry, so several apps in one process, as in
the tests, never collide): requests, errors, latency histograms, per-stage time, batch sizes,
queue depth and loaded versions.

The metrics are plain Python numbers turned into Prometheus families only when /metrics is
scraped: prometheus_client's own metric objects take a lock and check their state on every
update, about 2 µs each, and an inference request makes about ten updates. Each metric is
updated from one thread (request and batch metrics on the event loop, load metrics in the
repository scan), so no lock is needed.

A server with several worker processes (`--workers N`) shares its metrics through files: each
worker writes a snapshot of its numbers (`share_dir/worker-PID.json`, written to a temporary
name and renamed into place) every `SNAPSHOT_INTERVAL_S` and when it stops, and a scrape of any
worker merges its own live numbers with the other workers' latest snapshots. Counters and
histograms are summed over the workers, including workers that died (the supervisor renames
their last snapshot to `retired-PID[-n].json`, never overwriting one: totals stay monotonic;
a scrape writes the snapshot of the numbers it reports before merging, so a later scrape
answered by another worker never reports less); gauges (queue depth,
in-flight requests, loaded versions) get a `worker` label (the worker's index, 0..N-1, kept by
a restarted worker) and come from live workers only; `dlmodels_worker_requests_total{worker}`
counts the requests each worker answered. The request path does not change: the merge happens
only on scrape, the snapshot is a few kB every half second. A single-process server (no
`share_dir`) writes no files and renders exactly as before.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.utils import floatToGoString

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.004,
    0.008,
    0.016,
    0.032,
    0.064,
    0.128,
    0.256,
    0.512,
    1.024,
    2.048,
    4.096,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

SNAPSHOT_INTERVAL_S = 0.5
"""How often a worker of a multi-worker server writes its metrics snapshot."""

UNKNOWN = "_unknown"
"""The `model` label of requests naming no loaded model (bounded label values under fuzzing)."""


class _Value:
    """One counter or gauge series."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class _Buckets:
    """One histogram series: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.sum += value


class _Metric:
    """A labelled metric (`labels(*values)` gives the series, as in prometheus_client); one
    without labels updates its single series directly (`inc`, `dec`, `set`)."""

    def __init__(self, kind: str, name: str, doc: str, labelnames=(), buckets=None):
        self.kind, self.name, self.doc = kind, name, doc
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(float(b) for b in buckets) if buckets else None
        self.series: dict[tuple[str, ...], _Value | _Buckets] = {}
        if not self.labelnames:  # its one series exists (and renders 0) from the start
            self.labels()

    def labels(self, *values: str):
        found = self.series.get(values)
        if found is None:
            if len(values) != len(self.labelnames):
                raise ValueError(
                    f"metric {self.name}: labels {values} do not match {self.labelnames}"
                )
            key = tuple(str(v) for v in values)
            found = self.series.get(key)
            if found is None:
                found = _Buckets(self.bounds) if self.kind == "histogram" else _Value()
                self.series[key] = found
        return found

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self.labels().dec(amount)

    def set(self, value: float) -> None:
        self.labels().set(value)

    def rows(self) -> list:
        """The series as plain lists: [labels, value] or, for a histogram, [labels, counts
        per bucket (not cumulative), sum]."""
        if self.kind == "histogram":
            return [[list(k), list(s.counts), s.sum] for k, s in list(self.series.items())]
        return [[list(k), s.value] for k, s in list(self.series.items())]

    def family(self, rows=None, labelnames=None):
        """The Prometheus family of this metric's own series, or of `rows` (as `rows()` gives
        them) labelled `labelnames`."""
        return _family(
            self.kind,
            self.name,
            self.doc,
            self.labelnames if labelnames is None else labelnames,
            self.bounds,
            self.rows() if rows is None else rows,
        )


def _family(kind, name, doc, labelnames, bounds, rows):
    labels = list(labelnames)
    if kind == "counter":
        fam = CounterMetricFamily(name, doc, labels=labels)
    elif kind == "gauge":
        fam = GaugeMetricFamily(name, doc, labels=labels)
    else:
        fam = HistogramMetricFamily(name, doc, labels=labels)
    for row in rows:
        if kind == "histogram":
            values, counts, total_sum = row
            total, buckets = 0, []
            for bound, count in zip((*bounds, float("inf")), counts, strict=True):
                total += count
                buckets.append((floatToGoString(bound), total))
            fam.add_metric(list(values), buckets, total_sum)
        else:
            fam.add_metric(list(row[0]), row[1])
    return fam


class _Collector:
    def __init__(self, metrics: list[_Metric]):
        self.metrics = metrics

    def collect(self):
        for m in self.metrics:
            yield m.family()


class _MergedCollector:
    """The metrics of every worker of a multi-worker server (see the module docstring)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        own = self.metrics.snapshot()
        # Publish the numbers this scrape reports before reading the others: a later scrape
        # answered by another worker then sees at least them, so no counter ever goes down
        # between two scrapes (live numbers here, a 0.5 s old snapshot there, would).
        with contextlib.suppress(OSError):
            self.metrics.write_snapshot(own)
        snaps = [(own, False), *self.metrics.read_others()]
        per_worker: dict[str, float] = {}
        for snap, _ in snaps:
            label = str(snap["worker"])
            answered = sum(row[1] for row in snap["metrics"].get("dlmodels_requests", ()))
            per_worker[label] = per_worker.get(label, 0.0) + answered
        for m in self.metrics.all:
            if m.kind == "gauge":  # live workers only, one series each
                rows = [
                    [[*labels, str(snap["worker"])], value]
                    for snap, retired in snaps
                    if not retired
                    for labels, value in snap["metrics"].get(m.name, ())
                ]
                yield m.family(rows, (*m.labelnames, "worker"))
                continue
            merged: dict[tuple, list] = {}
            for snap, _ in snaps:
                for row in snap["metrics"].get(m.name, ()):
                    key = tuple(row[0])
                    have = merged.get(key)
                    if have is None:
                        merged[key] = [list(row[0]), *row[1:]]  # rows are fresh lists
                    elif m.kind == "histogram":
                        have[1] = [a + b for a, b in zip(have[1], row[1], strict=True)]
                        have[2] += row[2]
                    else:
                        have[1] += row[1]
            yield m.family(list(merged.values()))
        fam = CounterMetricFamily(
            "dlmodels_worker_requests",
            "Requests answered by each worker process (its index; a restarted worker keeps it).",
            labels=["worker"],
        )
        for label in sorted(per_worker, key=int):
            fam.add_metric([label], per_worker[label])
        yield fam


class Metrics:
    """The server's metrics; `render()` is the /metrics body.

    Args:
        share_dir: the directory the workers of a multi-worker server share their snapshots
            in (None: a single-process server, nothing written).
        worker: this worker's index (its `worker` label).
        ident: this worker's snapshot file name part (default: the process id).
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, share_dir: str | None = None, worker: int = 0, ident: str | None = None):
        self.registry = CollectorRegistry()
        self.share_dir = share_dir
        self.worker = worker
        self.snapshot_name = f"worker-{ident or os.getpid()}.json"
        self.requests = _Metric(
            "counter",
            "dlmodels_requests",
            "Requests answered, by model, protocol and HTTP status code.",
            ["model", "protocol", "code"],
        )
        self.errors = _Metric(
            "counter",
            "dlmodels_request_errors",
            "Requests answered with a 4xx or 5xx status.",
            ["model", "protocol", "code"],
        )
        self.latency = _Metric(
            "histogram",
            "dlmodels_request_duration_seconds",
            "Time from the request's arrival to its response body being ready.",
            ["model", "protocol"],
            _LATENCY_BUCKETS,
        )
        self.stage = _Metric(
            "histogram",
            "dlmodels_stage_duration_seconds",
            "Where a request's time goes: read (body), decode (parse and validate), queue "
            "(waiting for a batch), infer (onnxruntime, the whole batch), encode (response).",
            ["model", "stage"],
            _LATENCY_BUCKETS,
        )
        self.batch_size = _Metric(
            "histogram",
            "dlmodels_batch_size",
            "Rows per onnxruntime run (1 request or several merged by the dynamic batcher).",
            ["model"],
            _BATCH_BUCKETS,
        )
        self.batch_requests = _Metric(
            "histogram",
            "dlmodels_batch_requests",
            "Requests merged into one onnxruntime run.",
            ["model"],
            _BATCH_BUCKETS,
        )
        self.queue_depth = _Metric(
            "gauge",
            "dlmodels_queue_depth",
            "Requests waiting for the dynamic batcher.",
            ["model"],
        )
        self.inflight = _Metric(
            "gauge", "dlmodels_inflight_requests", "Requests being handled now."
        )
        self.loaded = _Metric(
            "gauge",
            "dlmodels_model_versions_loaded",
            "Versions of each model ready to serve.",
            ["model"],
        )
        self.load_failures = _Metric(
            "counter",
            "dlmodels_model_load_failures",
            "Versions that failed to load (corrupt file, bad manifest).",
            ["model"],
        )

        self.all = [
            self.requests,
            self.errors,
            self.latency,
            self.stage,
            self.batch_size,
            self.batch_requests,
            self.queue_depth,
            self.inflight,
            self.loaded,
            self.load_failures,
        ]
        self.registry.register(
            _Collector(self.all) if share_dir is None else _MergedCollector(self)
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- multi-worker sharing -----------------------------------------------------------

    def snapshot(self) -> dict:
        """This process's numbers: {"worker": index, "pid": ..., "metrics": {name: rows}}."""
        return {
            "worker": self.worker,
            "pid": os.getpid(),
            "metrics": {m.name: m.rows() for m in self.all},
        }

    def write_snapshot(self, snap: dict | None = None) -> None:
        """Write `snap` (default `snapshot()`) to `share_dir` (a temporary name, then renamed
        into place, so a reader sees the previous snapshot or this one, never half of one)."""
        if self.share_dir is None:
            return
        path = os.path.join(self.share_dir, self.snapshot_name)
        tmp = os.path.join(self.share_dir, f".{self.snapshot_name}.tmp")
        with open(tmp, "w") as f:
            json.dump(snap or self.snapshot(), f, separators=(",", ":"))
        os.replace(tmp, path)

    def read_others(self) -> list[tuple[dict, bool]]:
        """The other workers' latest snapshots: (snapshot, retired) pairs, retired for a worker
        that is gone (its counters still count, its gauges no longer)."""
        for _ in range(3):  # a snapshot renamed (retired) between listing and reading: relist
            out, vanished = [], False
            for name in sorted(os.listdir(self.share_dir)):
                if name == self.snapshot_name or name.startswith(".") or not name.endswith(".json"):
                    continue
                try:
                    with open(os.path.join(self.share_dir, name)) as f:
                        snap = json.load(f)
                except FileNotFoundError:
                    vanished = True
                    continue
                except ValueError:  # not a snapshot of ours
                    continue
                out.append((snap, name.startswith("retired-")))
            if not vanished:
                break
        return out


def retire_snapshot(share_dir: str, pid: int) -> None:
    """Mark the snapshot of worker process `pid`, which has exited, as retired (its counters
    keep counting in every scrape, its gauges are dropped). A retired snapshot is never
    overwritten: a later worker given the same (reused) process id retires under a new name.
    Only the supervisor retires snapshots, so checking for a free name is race-free."""
    n, dst = 0, os.path.join(share_dir, f"retired-{pid}.json")
    while os.path.exists(dst):
        n += 1
        dst = os.path.join(share_dir, f"retired-{pid}-{n}.json")
    with contextlib.suppress(FileNotFoundError):
        os.replace(os.path.join(share_dir, f"worker-{pid}.json"), dst)

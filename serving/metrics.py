"""Prometheus metrics of one server (its own registry, so several apps in one process, as in
the tests, never collide): requests, errors, latency histograms, per-stage time, batch sizes,
queue depth and loaded versions.

The metrics are plain Python numbers turned into Prometheus families only when /metrics is
scraped: prometheus_client's own metric objects take a lock and check their state on every
update, about 2 µs each, and an inference request makes about ten updates. Each metric is
updated from one thread (request and batch metrics on the event loop, load metrics in the
repository scan), so no lock is needed.
"""

from __future__ import annotations

import bisect

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

    def family(self):
        labels = list(self.labelnames)
        if self.kind == "counter":
            fam = CounterMetricFamily(self.name, self.doc, labels=labels)
        elif self.kind == "gauge":
            fam = GaugeMetricFamily(self.name, self.doc, labels=labels)
        else:
            fam = HistogramMetricFamily(self.name, self.doc, labels=labels)
        for values, series in list(self.series.items()):
            if self.kind == "histogram":
                total, buckets = 0, []
                for bound, count in zip((*self.bounds, float("inf")), series.counts, strict=True):
                    total += count
                    buckets.append((floatToGoString(bound), total))
                fam.add_metric(list(values), buckets, series.sum)
            else:
                fam.add_metric(list(values), series.value)
        return fam


class _Collector:
    def __init__(self, metrics: list[_Metric]):
        self.metrics = metrics

    def collect(self):
        for m in self.metrics:
            yield m.family()


class Metrics:
    """The server's metrics; `render()` is the /metrics body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
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

        self.registry.register(
            _Collector(
                [
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
            )
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

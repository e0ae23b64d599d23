"""Prometheus metrics of one server (its own registry, so several apps in one process, as in
the tests, never collide): requests, errors, latency histograms, per-stage time, batch sizes,
queue depth and loaded versions."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# `*_created` series double the exposition for no use here.
disable_created_metrics()

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


class Metrics:
    """The server's metrics; `render()` is the /metrics body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "dlmodels_requests",
            "Requests answered, by model, protocol and HTTP status code.",
            ["model", "protocol", "code"],
            registry=r,
        )
        self.errors = Counter(
            "dlmodels_request_errors",
            "Requests answered with a 4xx or 5xx status.",
            ["model", "protocol", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "dlmodels_request_duration_seconds",
            "Time from the request's arrival to its response body being ready.",
            ["model", "protocol"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "dlmodels_stage_duration_seconds",
            "Where a request's time goes: read (body), decode (parse and validate), queue "
            "(waiting for a batch), infer (onnxruntime, the whole batch), encode (response).",
            ["model", "stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "dlmodels_batch_size",
            "Rows per onnxruntime run (1 request or several merged by the dynamic batcher).",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "dlmodels_batch_requests",
            "Requests merged into one onnxruntime run.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "dlmodels_queue_depth",
            "Requests waiting for the dynamic batcher.",
            ["model"],
            registry=r,
        )
        self.inflight = Gauge(
            "dlmodels_inflight_requests", "Requests being handled now.", registry=r
        )
        self.loaded = Gauge(
            "dlmodels_model_versions_loaded",
            "Versions of each model ready to serve.",
            ["model"],
            registry=r,
        )
        self.load_failures = Counter(
            "dlmodels_model_load_failures",
            "Versions that failed to load (corrupt file, bad manifest).",
            ["model"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

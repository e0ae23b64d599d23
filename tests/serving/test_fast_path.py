"""The lean request path: the pure ASGI fast path answers exactly as the FastAPI routes it
bypasses, a bearer token guards it, one accounting serves both protocols, the lean metrics
render exactly as prometheus_client's own, responses go out in one write, and the benchmark's
core placement."""

from __future__ import annotations

import asyncio
import contextlib
import shutil

import httpx
import numpy as np
import orjson
import prometheus_client
import pytest
from fastapi import FastAPI

from serving._http import CoalescingTransport
from serving.app import AppOptions, create_app
from serving.bench import plan_placement
from serving.metrics import Metrics, _Metric
from serving.repository import ServerSettings

LIMIT = 100_000


@contextlib.contextmanager
def _running(app):
    """send(method, path, body, headers, root_path) -> Response, the app's lifespan running
    and its models loaded."""
    loop = asyncio.new_event_loop()
    lifespan = app.router.lifespan_context(app)
    loop.run_until_complete(lifespan.__aenter__())
    clients = {
        root: httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, root_path=root), base_url="http://t"
        )
        for root in ("", "/r")
    }

    async def wait_ready():
        for _ in range(600):
            if app.state.ready["ready"]:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("app never became ready")

    loop.run_until_complete(wait_ready())

    def send(method, path, body=None, headers=None, root_path=""):
        return loop.run_until_complete(
            clients[root_path].request(method, path, content=body, headers=headers or {})
        )

    try:
        yield send
    finally:
        for c in clients.values():
            loop.run_until_complete(c.aclose())
        loop.run_until_complete(lifespan.__aexit__(None, None, None))
        loop.close()


@pytest.fixture(scope="module")
def app_run(repo):
    """(send, app), lifespan running (see `_running`)."""
    app = create_app(
        str(repo[0]),
        ServerSettings(threads=1, max_queue_delay_ms=0.5),
        AppOptions(max_body_bytes=LIMIT, poll_interval=0),
    )
    with _running(app) as send:
        yield send, app


def _binary_v2(x: np.ndarray) -> tuple[bytes, dict]:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    )
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def _requests(x):
    binary, headers = _binary_v2(x)
    json_v2 = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1, 32, 32, 3],
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
    )
    row = orjson.dumps({"instances": x.tolist()})
    return [
        ("/v2/models/classifier/infer", binary, headers),
        ("/v2/models/classifier/versions/1/infer", binary, headers),
        ("/v2/models/classifier/infer", json_v2, {}),
        ("/v1/models/classifier:predict", row, {}),
        ("/v1/models/classifier/versions/1:predict", row, {}),
        ("/v2/models/nope/infer", json_v2, {}),  # 404
        ("/v2/models/classifier/versions/7/infer", json_v2, {}),  # 404 version
        ("/v2/models/.hidden/infer", json_v2, {}),  # bad name
        ("/v1/models/a:b:predict", row, {}),  # bad name (':' is part of it)
        ("/v2/models/classifier/infer", b"", {}),  # empty body
        ("/v2/models/classifier/infer", b"{" * (LIMIT + 1), {}),  # 413
        ("/v2/models/classifier/infer", binary, {"Inference-Header-Content-Length": "9e9"}),
        ("/v2/models/classifier/infer", binary, {"Inference-Header-Content-Length": b"\xb2"}),
        ("/v2/models/classifier/infer", json_v2, {"Content-Encoding": "gzip"}),
        ("/v1/models/classifier:predict", row, {"Content-Encoding": "gzip"}),
        ("/v1/models/classifier:predict", b"[1,", {}),  # not JSON
    ]


def test_fast_path_answers_as_the_fastapi_routes(app_run, repo, monkeypatch):
    """Every request gets byte-identical answers (status, body, content type, binary header
    length) from the fast path and from the FastAPI route (taken when an ASGI root_path is
    set), the fast path never enters FastAPI, and outputs equal direct onnxruntime."""
    send, _ = app_run
    entered = {"n": 0}
    original = FastAPI.__call__

    async def counting(self, scope, receive, send_):
        if scope["type"] == "http":
            entered["n"] += 1
        await original(self, scope, receive, send_)

    monkeypatch.setattr(FastAPI, "__call__", counting)
    x = repo[1]["classifier"]["image"][:1]
    fields = ("content-type", "inference-header-content-length")
    statuses = []
    for path, body, headers in _requests(x):
        fast = send("POST", path, body, headers)
        assert entered["n"] == 0, path
        routed = send("POST", path, body, headers, root_path="/r")
        assert entered["n"] == 1, path
        entered["n"] = 0
        assert (fast.status_code, fast.content) == (routed.status_code, routed.content), path
        assert [fast.headers.get(h) for h in fields] == [routed.headers.get(h) for h in fields]
        if fast.status_code != 200:
            assert fast.json()["error"], path
        statuses.append(fast.status_code)
    assert statuses == [200] * 5 + [404, 404, 400, 400, 400, 413, 400, 400, 400, 400, 400]

    import onnxruntime as ort

    want = ort.InferenceSession(str(repo[0] / "classifier" / "model.onnx")).run(None, {"image": x})
    path, body, headers = _requests(x)[0]
    r = send("POST", path, body, headers)
    header_len = int(r.headers["inference-header-content-length"])
    got = np.frombuffer(r.content[header_len:], "<f4").reshape(want[0].shape)
    np.testing.assert_allclose(got, want[0], atol=1e-6)
    # GET on an inference path is not the fast path's: FastAPI answers 405 as before.
    assert send("GET", "/v2/models/classifier/infer").status_code == 405


def test_bearer_token_guards_the_fast_path(repo, tmp_path):
    """With a token, both inference routes answer 401 (with `WWW-Authenticate: Bearer`) to a
    missing or wrong token and 200 to the right one; /v2/health/* and /metrics stay open."""
    shutil.copytree(repo[0] / "classifier", tmp_path / "classifier")
    app = create_app(
        str(tmp_path),
        ServerSettings(threads=1, max_queue_delay_ms=0.5),
        AppOptions(auth_token="s3cret", poll_interval=0),
    )
    x = repo[1]["classifier"]["image"][:1]
    binary, binary_headers = _binary_v2(x)
    inference = [
        ("/v2/models/classifier/infer", binary, binary_headers),
        ("/v1/models/classifier:predict", orjson.dumps({"instances": x.tolist()}), {}),
    ]
    with _running(app) as send:
        for path, body, headers in inference:
            for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = send("POST", path, body, {**headers, **auth})
                assert r.status_code == 401, (path, auth)
                assert r.headers["www-authenticate"] == "Bearer"
                assert r.json() == {"error": "missing or wrong bearer token"}
            ok = send("POST", path, body, {**headers, "Authorization": "Bearer s3cret"})
            assert ok.status_code == 200, path
        for path in ("/v2/health/live", "/v2/health/ready", "/metrics"):
            assert send("GET", path).status_code == 200, path
        assert send("GET", "/v2/models/classifier").status_code == 401
        metrics = send("GET", "/metrics").text
    # Refused requests never reach the inference accounting.
    assert _metric(metrics, "dlmodels_requests_total") == 2


def _metric(text: str, prefix: str) -> float:
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(prefix))


def test_one_accounting_serves_both_protocols(app_run, repo):
    """Per protocol: a success and an error each count once by model, protocol and code;
    errors are counted as errors and give no stage times; latency counts both; nothing is
    left in flight."""
    send, _ = app_run
    x = repo[1]["classifier"]["image"][:1]
    row = orjson.dumps({"instances": x.tolist()})
    binary, headers = _binary_v2(x)
    before = send("GET", "/metrics").text
    assert send("POST", "/v1/models/classifier:predict", row).status_code == 200
    assert send("POST", "/v1/models/classifier:predict", b"{}").status_code == 400
    assert send("POST", "/v2/models/classifier/infer", binary, headers).status_code == 200
    assert send("POST", "/v2/models/classifier/infer", b"[").status_code == 400
    assert send("POST", "/v1/models/ghost:predict", row).status_code == 404
    after = send("GET", "/metrics").text

    def delta(prefix):
        return _metric(after, prefix) - _metric(before, prefix)

    for protocol in ("v1", "v2"):
        ok = f'{{code="200",model="classifier",protocol="{protocol}"}}'
        bad = f'{{code="400",model="classifier",protocol="{protocol}"}}'
        assert delta("dlmodels_requests_total" + ok) == 1
        assert delta("dlmodels_requests_total" + bad) == 1
        assert delta("dlmodels_request_errors_total" + bad) == 1
        assert delta("dlmodels_request_errors_total" + ok) == 0
        count = (
            f'dlmodels_request_duration_seconds_count{{model="classifier",protocol="{protocol}"}}'
        )
        assert delta(count) == 2
    missing = '{code="404",model="_unknown",protocol="v1"}'
    assert delta("dlmodels_request_errors_total" + missing) == 1
    for stage in ("read", "decode", "encode"):
        key = f'dlmodels_stage_duration_seconds_count{{model="classifier",stage="{stage}"}}'
        assert delta(key) == 2  # the two successes only
    assert _metric(after, "dlmodels_inflight_requests ") == 0


def test_lean_metrics_render_as_prometheus_client():
    """Before any update (an unlabelled metric's one series renders 0) and after the same
    updates (values on bucket bounds included: Prometheus buckets are `le`), the exposition
    is the one prometheus_client's own Counter / Gauge / Histogram give."""
    was_created = prometheus_client.metrics._use_created
    prometheus_client.disable_created_metrics()  # process-wide: restored below
    try:
        lean = Metrics()
        registry = prometheus_client.CollectorRegistry()
        ref = {}
        for name in vars(lean):
            m = getattr(lean, name)
            if not isinstance(m, _Metric):  # the registry, the --workers snapshot settings
                continue
            cls = {"counter": prometheus_client.Counter, "gauge": prometheus_client.Gauge}.get(
                m.kind, prometheus_client.Histogram
            )
            kw = {"buckets": m.bounds} if m.kind == "histogram" else {}
            ref[name] = cls(m.name, m.doc, list(m.labelnames), registry=registry, **kw)
        fresh = lean.render().decode()
        assert fresh == prometheus_client.generate_latest(registry).decode()
        assert "dlmodels_inflight_requests 0.0" in fresh
        for name, labels, op, args in _METRIC_UPDATES:
            getattr(getattr(lean, name).labels(*labels), op)(*args)
            getattr(ref[name].labels(*labels), op)(*args)
        for op in ("inc", "inc", "dec"):
            getattr(lean.inflight, op)()
            getattr(ref["inflight"], op)()
        text = lean.render().decode()
        assert text == prometheus_client.generate_latest(registry).decode()
    finally:
        if was_created:
            prometheus_client.enable_created_metrics()
    assert prometheus_client.metrics._use_created is was_created
    key = 'dlmodels_request_duration_seconds_bucket{le="0.001",model="cnn",protocol="v2"}'
    assert f"{key} 1.0" in text
    assert "dlmodels_inflight_requests 1.0" in text


_METRIC_UPDATES = [
    ("requests", ("cnn", "v2", "200"), "inc", ()),
    ("requests", ("cnn", "v2", "200"), "inc", ()),
    ("errors", ("_unknown", "v1", "404"), "inc", ()),
    ("latency", ("cnn", "v2"), "observe", (0.001,)),  # exactly a bound
    ("latency", ("cnn", "v2"), "observe", (0.0011,)),
    ("latency", ("cnn", "v1"), "observe", (10.0,)),  # beyond the last bound: +Inf
    ("stage", ("cnn", "queue"), "observe", (0.0,)),
    ("batch_size", ("cnn",), "observe", (16,)),
    ("batch_size", ("cnn",), "observe", (3,)),
    ("batch_requests", ("cnn",), "observe", (1,)),
    ("queue_depth", ("cnn",), "set", (4,)),
    ("queue_depth", ("cnn",), "set", (2,)),
    ("loaded", ("cnn",), "set", (1,)),
    ("load_failures", ("cnn",), "inc", ()),
]


def test_coalescing_transport_writes_a_response_once():
    """A header block waits for the body and leaves in the same write; alone it leaves on
    the next turn of the loop; a close flushes it first; other writes pass straight on."""

    class Recorder:
        def __init__(self):
            self.events = []

        def write(self, data):
            self.events.append(("write", data))

        def close(self):
            self.events.append(("close", None))

        def is_closing(self):
            return False

    async def scenario():
        loop = asyncio.get_running_loop()
        rec = Recorder()
        t = CoalescingTransport(rec, loop)
        t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        assert rec.events == []
        t.write(b"ok")
        assert rec.events == [("write", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")]
        t.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert rec.events[-1] == ("write", b"HTTP/1.1 100 Continue\r\n\r\n")
        t.write(b"chunk")
        assert rec.events[-1] == ("write", b"chunk")
        t.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        t.close()
        assert rec.events[-2:] == [("write", b"HTTP/1.1 204 No Content\r\n\r\n"), ("close", None)]
        assert t.is_closing() is False  # everything else is the transport's
        return len(rec.events)

    assert asyncio.run(scenario()) == 5


def test_plan_placement():
    """Pinned: the server (and the raw reference) on the first half of the cores rounded up,
    the client on the rest; with auto only from 4 cores."""
    eight = plan_placement(list(range(7, -1, -1)), "auto")
    assert eight["pinned"] and eight["server_cpus"] == [0, 1, 2, 3]
    assert eight["client_cpus"] == [4, 5, 6, 7]
    five = plan_placement([0, 2, 4, 6, 8], "auto")
    assert (five["server_cpus"], five["client_cpus"]) == ([0, 2, 4], [6, 8])
    two = plan_placement([0, 1], "auto")
    assert not two["pinned"] and two["server_cpus"] == two["client_cpus"] == [0, 1]
    forced = plan_placement([0, 1], "on")
    assert (forced["server_cpus"], forced["client_cpus"]) == ([0], [1])
    assert not plan_placement(list(range(8)), "off")["pinned"]
    assert not plan_placement([0], "on")["pinned"]
    with pytest.raises(ValueError, match="pin must be 'auto', 'on' or 'off', got 'yes'"):
        plan_placement([0, 1], "yes")

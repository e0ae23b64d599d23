"""`python -m serving --workers N`: several server processes on one port. The metrics merge
(counters and histograms summed over the workers' snapshots, gauges per worker), the real
server with two workers (both answer, answers equal onnxruntime's, /metrics from either worker
counts every request, a killed worker is restarted and its counts stay, SIGTERM drains the
request in flight and exits 0), and the option's validation."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import Metrics, retire_snapshot
from tests.serving._server import ServerProcess


def events_named(server: ServerProcess, name: str) -> list[dict]:
    return [e for e in server.events() if e.get("event") == name]


def wait_until(done, timeout: float = 60.0, every: float = 0.1) -> None:
    """Poll `done()` until it is true or `timeout` seconds passed (the caller then asserts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done():
        time.sleep(every)


def wait_for_events(server: ServerProcess, **counts: int) -> None:
    """Wait until the server has logged exactly `counts[name]` events of each `name`."""
    wait_until(lambda: all(len(events_named(server, n)) == k for n, k in counts.items()))


def samples(text: str) -> dict:
    """{(sample name, sorted label items): value} of a Prometheus text exposition."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def test_metrics_merge_sums_counters_and_histograms_and_labels_gauges(tmp_path):
    a, b = Metrics(str(tmp_path), 0, ident="a"), Metrics(str(tmp_path), 1, ident="b")
    lat_a, lat_b = [0.0003, 0.003, 0.003], [0.0007, 0.05, 3.0, 9.0, 0.001]
    for v in lat_a:
        a.requests.labels("m", "v2", "200").inc()
        a.latency.labels("m", "v2").observe(v)
    for v in lat_b:
        b.requests.labels("m", "v2", "200").inc()
        b.latency.labels("m", "v2").observe(v)
    b.requests.labels("m", "v1", "404").inc()
    a.inflight.set(1)
    b.inflight.set(2)
    a.loaded.labels("m").set(1)
    b.loaded.labels("m").set(1)
    b.write_snapshot()
    assert sorted(os.listdir(tmp_path)) == ["worker-b.json"]  # no temporary file left
    got = samples(a.render().decode())

    def req(protocol, code):
        labels = (("code", code), ("model", "m"), ("protocol", protocol))
        return got[("dlmodels_requests_total", labels)]

    assert req("v2", "200") == 8 and req("v1", "404") == 1
    lat = lat_a + lat_b
    labels = (("model", "m"), ("protocol", "v2"))
    assert got[("dlmodels_request_duration_seconds_count", labels)] == len(lat)
    assert got[("dlmodels_request_duration_seconds_sum", labels)] == pytest.approx(sum(lat))
    for le, want in [("0.0005", 1), ("0.001", 3), ("0.004", 5), ("4.096", 7), ("+Inf", 8)]:
        key = ("dlmodels_request_duration_seconds_bucket", (("le", le), *labels))
        assert got[key] == want == sum(v <= float(le) for v in lat), le
    assert got[("dlmodels_inflight_requests", (("worker", "0"),))] == 1
    assert got[("dlmodels_inflight_requests", (("worker", "1"),))] == 2
    assert got[("dlmodels_model_versions_loaded", (("model", "m"), ("worker", "1")))] == 1
    assert got[("dlmodels_worker_requests_total", (("worker", "0"),))] == 3
    assert got[("dlmodels_worker_requests_total", (("worker", "1"),))] == 6
    # Worker 1 died: its counts stay, its gauges go.
    retire_snapshot(str(tmp_path), "b")
    got = samples(a.render().decode())
    assert req("v2", "200") == 8 and req("v1", "404") == 1
    assert ("dlmodels_inflight_requests", (("worker", "1"),)) not in got
    assert got[("dlmodels_worker_requests_total", (("worker", "1"),))] == 6
    # A single-process server: no worker label, no files.
    single = Metrics()
    single.inflight.set(1)
    single.write_snapshot()
    text = single.render().decode()
    assert "dlmodels_inflight_requests 1.0" in text and "worker" not in text


def requests_total(m: Metrics) -> float:
    return samples(m.render().decode())[
        ("dlmodels_requests_total", (("code", "200"), ("model", "m"), ("protocol", "v2")))
    ]


def test_merged_counters_never_go_down_between_scrapes_of_different_workers(tmp_path):
    a, b = Metrics(str(tmp_path), 0, ident="a"), Metrics(str(tmp_path), 1, ident="b")
    a.requests.labels("m", "v2", "200").inc(5)
    b.requests.labels("m", "v2", "200").inc(1)
    a.write_snapshot()
    b.write_snapshot()
    b.requests.labels("m", "v2", "200").inc(2)  # not in b's periodic snapshot yet
    # A scrape answered by b reports 5 + 3; the next one, answered by a, must not report less
    # (a Prometheus counter that drops reads as a restart: rate() jumps).
    first = requests_total(b)
    assert first == 8
    assert requests_total(a) == 8


def test_retired_snapshots_survive_pid_reuse(tmp_path):
    observer = Metrics(str(tmp_path), 0, ident="obs")
    for n in (5, 2):  # two worker lives that got the same process id, both died
        w = Metrics(str(tmp_path), 1, ident="77")
        w.requests.labels("m", "v2", "200").inc(n)
        w.write_snapshot()
        retire_snapshot(str(tmp_path), "77")
    assert sorted(os.listdir(tmp_path)) == ["retired-77-1.json", "retired-77.json"]
    assert requests_total(observer) == 7


def test_workers_option_is_validated(tmp_path, capsys):
    from serving.__main__ import main, worker_threads

    with pytest.raises(SystemExit) as exit_:
        main(["--model-repository", str(tmp_path), "--workers", "0"])
    assert exit_.value.code == 2
    assert "--workers 0: must be >= 1" in capsys.readouterr().err
    # Threads per worker: as given, else every core for one process, cores // N for several.
    assert worker_threads(None, 1, cores=8) is None and worker_threads(3, 2, cores=8) == 3
    assert worker_threads(None, 2, cores=8) == 4 and worker_threads(None, 3, cores=2) == 1


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from tests.serving.conftest import export_models

    root = tmp_path_factory.mktemp("workers") / "repo"
    root.mkdir()
    return root, export_models(root, ("classifier",))["classifier"]["image"]


def test_two_workers_share_port_metrics_restart_and_shutdown(classifier):
    repo, x = classifier
    want = ort.InferenceSession(str(repo / "classifier" / "model.onnx")).run(None, {"image": x})[0]
    server = ServerProcess(repo, "--workers", "2", "--poll-interval", "0")
    url = server.url
    body = {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32"}]}
    body["inputs"][0]["data"] = x.ravel().tolist()
    sent, failures = 0, []

    def send(n):
        """n requests from 4 threads, a new connection each: the workers accept in turn."""
        nonlocal sent

        def one(_):
            return httpx.post(f"{url}/v2/models/classifier/infer", json=body, timeout=30)

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(one, range(n)))
        for r in answers:
            sent += 1
            if r.status_code != 200:
                failures.append(r.text)
                continue
            got = np.array(r.json()["outputs"][0]["data"], "float32").reshape(want.shape)
            np.testing.assert_allclose(got, want, atol=1e-6)

    def scrape():
        r = httpx.get(f"{url}/metrics")
        return r.headers["x-dlmodels-worker"], samples(r.text)

    def per_worker(got):
        return {
            dict(k[1])["worker"]: v
            for k, v in got.items()
            if k[0] == "dlmodels_worker_requests_total"
        }

    def settled():
        """Scrapes until both workers answered one and both counted every request."""
        seen = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(seen) < 2:
            worker, got = scrape()
            total = got.get(
                (
                    "dlmodels_requests_total",
                    (("code", "200"), ("model", "classifier"), ("protocol", "v2")),
                )
            )
            if total == sent:
                seen[worker] = got
            time.sleep(0.1)
        assert sorted(seen) == ["0", "1"], seen.keys()
        return seen

    try:
        for _ in range(10):
            send(10)
            counts = [per_worker(got) for got in settled().values()]
            if all(sorted(c) == ["0", "1"] and min(c.values()) > 0 for c in counts):
                break
        assert failures == []
        seen = settled()
        for got in seen.values():  # either worker reports the whole server
            counts = per_worker(got)
            assert sorted(counts) == ["0", "1"] and min(counts.values()) > 0, counts
            assert sum(counts.values()) == sent
            key = (
                "dlmodels_request_duration_seconds_count",
                (("model", "classifier"), ("protocol", "v2")),
            )
            assert got[key] == sent
        # Kill worker 0: it is restarted under the same index, its counts stay counted.
        pid = events_named(server, "worker_started")[0]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for_events(server, worker_started=3, server_ready=3)
        started = events_named(server, "worker_started")
        exited = events_named(server, "worker_exited")
        assert [(e["worker"], e["pid"], e["exitcode"]) for e in exited] == [
            (0, pid, -signal.SIGKILL)
        ]
        assert started[-1]["worker"] == 0 and started[-1]["pid"] != pid
        send(10)
        assert failures == []
        for got in settled().values():
            assert sum(per_worker(got).values()) == sent
            loaded = [k for k in got if k[0] == "dlmodels_model_versions_loaded"]
            assert sorted(dict(k[1])["worker"] for k in loaded) == ["0", "1"]

        # SIGTERM while a request is being received: it finishes, every worker stops, exit 0.
        raw = json.dumps(body).encode()
        result = {}

        release = threading.Event()

        def slow_body():  # the second half only once the server is shutting down
            yield raw[: len(raw) // 2]
            release.wait(60)
            yield raw[len(raw) // 2 :]

        def call():
            try:
                result["r"] = httpx.post(
                    f"{url}/v2/models/classifier/infer",
                    content=slow_body(),
                    headers={"Content-Type": "application/json", "Content-Length": str(len(raw))},
                    timeout=30,
                )
            except httpx.HTTPError as err:
                result["error"] = repr(err)

        t = threading.Thread(target=call)
        t.start()

        def inflight():
            got = scrape()[1]
            return sum(v for k, v in got.items() if k[0] == "dlmodels_inflight_requests")

        wait_until(lambda: inflight() == 1, every=0.05)
        assert inflight() == 1  # the request is in the server before the signal
        server.proc.send_signal(signal.SIGTERM)
        # Both workers have begun their graceful shutdown.
        wait_until(lambda: len(events_named(server, "Shutting down")) == 2, every=0.05)
        release.set()
        t.join()
        code = server.stop()
    finally:
        server.stop()
    assert "error" not in result, result
    assert result["r"].status_code == 200, result["r"].text
    out = np.array(result["r"].json()["outputs"][0]["data"], "float32").reshape(want.shape)
    np.testing.assert_allclose(out, want, atol=1e-6)
    assert code == 0, server.log()[-3000:]
    events = server.events()
    stopped = [e for e in events if e.get("event") == "server_stopped"]
    assert sorted(e.get("worker", -1) for e in stopped) == [-1, 0, 1]
    ready = [e for e in events if e.get("event") == "server_ready"]
    assert len(ready) == 3  # the workers (the restarted one too) run without TF / Keras
    assert not any(e["tensorflow_loaded"] or e["keras_loaded"] for e in ready)
    assert stopped[-1]["status"] == 0
    assert [e["exitcode"] for e in events if e.get("event") == "worker_stopped"] == [0, 0]
    # Each worker (the restarted one too) accepted connections only once warm: uvicorn
    # listens after its startup, and the first scan (server_ready) is part of that startup.
    workers = [e["pid"] for e in events if e.get("event") == "worker_started"]
    assert len(workers) == 3
    for pid in workers:
        mine = [e["event"] for e in events if e.get("pid") == pid and "worker" in e]
        assert mine.index("server_ready") < mine.index("Application startup complete."), pid
    start = next(e for e in events if e.get("event") == "workers_start")
    assert not os.path.exists(start["metrics_dir"])  # the snapshots are cleaned up


def test_workers_exit_when_their_supervisor_is_killed(classifier):
    repo, _ = classifier
    server = ServerProcess(repo, "--workers", "2", "--poll-interval", "0")
    try:
        pids = [e["pid"] for e in events_named(server, "worker_started")]
        assert len(pids) == 2
        # Both workers running their own code first: a worker whose parent dies while spawn is
        # still handing it its arguments just fails to start (no orphan, nothing to log).
        wait_until(lambda: {e["pid"] for e in events_named(server, "server_ready")} >= set(pids))
        assert {e["pid"] for e in events_named(server, "server_ready")} >= set(pids)
        server.proc.kill()  # SIGKILL: the supervisor cannot pass anything on
        server.proc.wait()
        wait_for_events(server, supervisor_gone=2, server_stopped=2)
        gone = events_named(server, "supervisor_gone")
        stopped = events_named(server, "server_stopped")
        assert sorted(e["pid"] for e in gone) == sorted(pids)
        assert sorted(e["pid"] for e in stopped) == sorted(pids)
        with pytest.raises(httpx.ConnectError):  # nobody serves the port any more
            httpx.get(f"{server.url}/v2/health/live", timeout=5)
    finally:
        server.stop()
        for pid in pids:  # never leave a worker behind, whatever failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_restart_budget_stops_fast_and_slow_crash_loops():
    from serving.__main__ import RestartBudget

    # Slow: worker 0 dies 30 s after each start (a long load), 40 s apart: never 7 deaths in
    # a minute, but the 4th short life in a row gives up.
    budget = RestartBudget(2)
    assert [budget.died(0, 30.0, 40.0 * i) for i in range(3)] == [None] * 3
    assert "worker 0 died 4 times in a row" in budget.died(0, 30.0, 120.0)
    # A life of a minute or more resets the count; other indices count on their own.
    budget = RestartBudget(2)
    for i, (index, uptime) in enumerate([(0, 5), (0, 5), (0, 5), (0, 61), (1, 5), (0, 5)]):
        assert budget.died(index, float(uptime), 100.0 * i) is None
    # Fast: more than 3N = 6 deaths in a minute, over both workers.
    budget = RestartBudget(2)
    assert [budget.died(i % 2, 1.0, float(i)) for i in range(6)] == [None] * 6
    assert "7 deaths in the last 60 s" in budget.died(0, 1.0, 6.0)


def test_bind_sockets_share_one_port_but_never_a_port_in_use():
    import socket

    from serving.__main__ import bind_sockets

    socks = bind_sockets("127.0.0.1", 0, 2)
    try:
        assert len({id(s) for s in socks}) == 2  # one socket per worker (Linux: SO_REUSEPORT)
        port = socks[0].getsockname()[1]
        assert socks[1].getsockname()[1] == port
        # Another multi-worker server on that port (its sockets have SO_REUSEPORT too): refused.
        with pytest.raises(OSError):
            bind_sockets("127.0.0.1", port, 2)
    finally:
        for s in socks:
            s.close()
    with socket.socket() as busy:  # any other listener: refused too
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(OSError):
            bind_sockets("127.0.0.1", busy.getsockname()[1], 2)

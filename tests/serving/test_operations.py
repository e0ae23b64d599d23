"""Operations on the real server: hot reload under load (a new version takes over with no
failed request; a corrupt version is refused with a logged error while the old one serves),
version policy, bearer token, body limit, graceful shutdown, and the load benchmark."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import keras
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as th

from tests.serving._server import ROOT, ServerProcess


def _clf(seed):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inp)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inp, keras.layers.Dense(3, name="logits")(x), name="clf")


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Two versions of a tiny classifier (different weights) exported to a staging area."""
    from dlmodels import export

    stage = tmp_path_factory.mktemp("stage")
    x = np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 3)).astype("float32")
    for v in (1, 2):
        export.write_repository(_clf(v), stage / str(v), samples=x, formats=("onnx",))
    return stage, x


def direct(path, x):
    return ort.InferenceSession(str(path)).run(None, {"image": x})[0]


def publish(src, dst):
    """Copy a version next to the repository, then rename it in: the server never sees half."""
    tmp = dst.parent / f".tmp-{dst.name}"
    shutil.copytree(src, tmp)
    os.rename(tmp, dst)


class Load:
    """Threads calling the unversioned model with tritonclient until stopped."""

    def __init__(self, url, x, threads=3):
        self.x, self.stop_flag = x, threading.Event()
        self.answers, self.failures = [], []
        self.threads = [threading.Thread(target=self._run, args=(url, i)) for i in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, url, index):
        client = th.InferenceServerClient(url.removeprefix("http://"))
        inp = th.InferInput("image", list(self.x.shape), "FP32")
        inp.set_data_from_numpy(self.x)
        while not self.stop_flag.is_set():
            try:
                r = client.infer("clf", [inp])
                version = r.get_response()["model_version"]
                self.answers.append((version, r.as_numpy("logits"), index))
            except Exception as err:
                self.failures.append(repr(err))
        client.close()

    def stop(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join()


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_hot_reload_under_load_and_corrupt_version(versions, tmp_path):
    stage, x = versions
    repo = tmp_path / "repo"
    (repo / "clf").mkdir(parents=True)
    publish(stage / "1", repo / "clf" / "1")
    want = {v: direct(stage / str(v) / "model.onnx", x) for v in (1, 2)}
    assert np.abs(want[1] - want[2]).max() > 1e-3  # the versions are distinguishable
    server = ServerProcess(repo, "--poll-interval", "0.2")
    load = Load(server.url, x)
    try:
        assert wait_for(lambda: len(load.answers) > 20)
        publish(stage / "2", repo / "clf" / "2")
        assert wait_for(lambda: any(v == "2" for v, _, _ in load.answers[-5:]))
        n2 = len(load.answers)
        # Version 3: a manifest whose model file is garbage.
        bad = tmp_path / "bad3"
        shutil.copytree(stage / "2", bad)
        (bad / "model.onnx").write_bytes(b"this is not an onnx file" * 10)
        os.rename(bad, repo / "clf" / "3")
        assert wait_for(lambda: any(e.get("event") == "model_load_failed" for e in server.events()))
        assert wait_for(lambda: len(load.answers) > n2 + 30)
    finally:
        load.stop()
    try:
        assert load.failures == []
        served = [v for v, _, _ in load.answers]
        assert served[0] == "1" and served[-1] == "2"
        for i in range(3):  # each client's requests are sequential: once 2, never 1 again
            mine = [v for v, _, t in load.answers if t == i]
            assert mine == sorted(mine) and mine[-1] == "2", i
        for v, out, _ in load.answers:
            np.testing.assert_array_equal(out, want[int(v)])
        loaded = [e for e in server.events() if e.get("event") == "model_loaded"]
        assert [e["version"] for e in loaded] == [1, 2] and all(e["inline"] for e in loaded)
        failed = [e for e in server.events() if e.get("event") == "model_load_failed"]
        assert len(failed) == 1 and failed[0]["version"] == 3 and failed[0]["level"] == "error"
        assert "model.onnx" in failed[0]["error"] or "onnx" in failed[0]["error"].lower()
        assert failed[0]["serving"] == [2]
        status = httpx.get(f"{server.url}/v1/models/clf").json()["model_version_status"]
        assert [s["version"] for s in status] == ["2"]
        index = httpx.post(f"{server.url}/v2/repository/index").json()
        assert {"name": "clf", "version": "3"}.items() <= index[-1].items()
        assert index[-1]["state"] == "UNAVAILABLE"
        r = httpx.get(f"{server.url}/v2/models/clf/versions/1/ready")
        assert r.status_code == 404  # retired by the latest:1 policy
        assert (
            'dlmodels_model_load_failures_total{model="clf"} 1.0'
            in httpx.get(f"{server.url}/metrics").text
        )
    finally:
        server.stop()

    # Version policy "all": both good versions answer by number; the corrupt one does not.
    server = ServerProcess(repo, "--version-policy", "all", "--poll-interval", "0")
    try:
        meta = httpx.get(f"{server.url}/v2/models/clf").json()
        assert meta["versions"] == ["1", "2"]
        for v in (1, 2):
            body = {
                "inputs": [
                    {
                        "name": "image",
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        "data": x.ravel().tolist(),
                    }
                ]
            }
            r = httpx.post(f"{server.url}/v2/models/clf/versions/{v}/infer", json=body)
            got = np.array(r.json()["outputs"][0]["data"], "float32").reshape(want[v].shape)
            np.testing.assert_allclose(got, want[v], atol=1e-6)
            assert r.json()["model_version"] == str(v)
        assert httpx.get(f"{server.url}/v2/models/clf/versions/3/ready").status_code == 404
    finally:
        server.stop()


def test_token_and_body_limit(versions, tmp_path):
    stage, x = versions
    repo = tmp_path / "repo"
    repo.mkdir()
    publish(stage / "1", repo / "clf")  # repo/NAME/manifest.json: served as version 1
    server = ServerProcess(
        repo,
        "--auth-token-env",
        "SERVING_TEST_TOKEN",
        "--max-body-mb",
        "0.01",
        "--no-dynamic-batching",  # and worker threads: the path without a batcher
        "--inline-below-ms",
        "0",
        env={"SERVING_TEST_TOKEN": "s3cret"},
    )
    try:
        url = server.url
        assert httpx.get(f"{url}/v2/health/live").status_code == 200  # probes need no token
        r = httpx.get(f"{url}/v2/models/clf")
        assert r.status_code == 401 and r.json() == {"error": "missing or wrong bearer token"}
        bad = httpx.get(f"{url}/v2/models/clf", headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{url}/v2/models/clf", headers=auth).json()["versions"] == ["1"]
        big = httpx.post(f"{url}/v1/models/clf:predict", content=b"x" * 20000, headers=auth)
        assert big.status_code == 413
        assert big.json()["error"] == (
            "request body of 20000 bytes exceeds the limit of 10485 bytes"
        )
        r = httpx.post(f"{url}/v1/models/clf:predict", json={"instances": x.tolist()}, headers=auth)
        np.testing.assert_allclose(
            r.json()["predictions"], direct(stage / "1" / "model.onnx", x), atol=1e-6
        )
        loaded = next(e for e in server.events() if e.get("event") == "model_loaded")
        assert loaded["dynamic_batching"] is False and loaded["inline"] is False
        text = httpx.get(f"{url}/metrics").text
        assert 'dlmodels_batch_size_sum{model="clf"} 2.0' in text  # one run of 2 rows
        assert 'dlmodels_stage_duration_seconds_count{model="clf",stage="queue"}' not in text
    finally:
        server.stop()


def test_graceful_shutdown_finishes_the_request_in_flight(versions, tmp_path):
    stage, x = versions
    repo = tmp_path / "repo"
    repo.mkdir()
    publish(stage / "1", repo / "clf")
    server = ServerProcess(repo)
    body = json.dumps({"instances": x.tolist()}).encode()
    half = len(body) // 2

    def slow_body():
        yield body[:half]
        time.sleep(1.5)  # SIGTERM arrives while the request is being received
        yield body[half:]

    result = {}

    def call():
        result["r"] = httpx.post(
            f"{server.url}/v1/models/clf:predict",
            content=slow_body(),
            headers={"Content-Type": "application/json", "Content-Length": str(len(body))},
            timeout=30,
        )

    t = threading.Thread(target=call)
    t.start()
    assert wait_for(  # the handler has started and waits for the rest of the body
        lambda: "dlmodels_inflight_requests 1.0" in httpx.get(f"{server.url}/metrics").text,
        timeout=30,
    )
    server.proc.send_signal(signal.SIGTERM)
    t.join()
    code = server.stop()
    assert result["r"].status_code == 200, result["r"].text
    np.testing.assert_allclose(
        result["r"].json()["predictions"], direct(stage / "1" / "model.onnx", x), atol=1e-6
    )
    assert code == 0
    assert any(e.get("event") == "server_stopped" for e in server.events())


def test_load_benchmark_runs_and_records_everything(repo, tmp_path):
    out = tmp_path / "serving.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.bench",
            "--repository",
            str(repo[0]),
            "--models",
            "classifier",
            "--duration",
            "1",
            "--concurrency",
            "2",
            "--encodings",
            "binary",
            "--clients",
            "tritonclient,lean",
            "--batching",
            "on",
            "--raw-seconds",
            "0.3",
            "--threads",
            "1",
            "--pin",
            "on",
            "--breakdown-seconds",
            "0.02",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    cell, lean = result["cells"]
    assert (cell["client"], lean["client"]) == ("tritonclient", "lean")
    # The lean client sends the same requests and checks every answer the same way.
    assert lean["failed"] == 0 and lean["ok"] == lean["requests"] > 0
    assert lean["requests_per_s"] == pytest.approx(lean["ok"] / lean["wall_s"])
    assert lean["onnxruntime_runs"] >= 1 and lean["client_cpu_ms_per_request"] > 0
    raw = cell["raw_b1_before"]["items_per_s"]
    assert cell["failed"] == 0 and cell["ok"] == cell["requests"] > 0
    assert cell["requests_per_s"] == pytest.approx(cell["ok"] / cell["wall_s"])
    assert cell["ratio_vs_raw_b1"] == pytest.approx(cell["requests_per_s"] / raw)
    start_raw = result["raw_onnxruntime"]["classifier"]["b1"]["items_per_s"]
    assert cell["ratio_vs_raw_b1_at_start"] == pytest.approx(cell["requests_per_s"] / start_raw)
    assert cell["p50_ms"] <= cell["p99_ms"]
    assert cell["server_cpu_ms_per_request"] > 0 and cell["client_cpu_ms_per_request"] > 0
    assert set(cell["stage_ms"]) == {"read", "decode", "queue", "infer", "encode"}
    assert cell["onnxruntime_runs"] >= 1 and cell["mean_batch_size"] >= 1
    assert len(result["loadavg_start"]) == 3 and result["machine"]["cpus"]
    assert result["settings"]["duration_s"] == 1 and result["settings"]["server_threads"] == 1
    assert "| classifier | on | binary | 2 | tritonclient |" in proc.stdout
    assert "| classifier | on | binary | 2 | lean |" in proc.stdout
    cpus = sorted(os.sched_getaffinity(0))
    placement = result["placement"]
    assert placement["pinned"] == (len(cpus) >= 2)
    assert sorted(placement["server_cpus"] + placement["client_cpus"]) == cpus
    # As observed during the cell, not only as planned.
    assert cell["server_cpus"] == placement["server_cpus"]
    assert cell["client_cpus"] == placement["client_cpus"]
    # Where the time goes: each stage, the in-process app, and (from the binary, batching-on
    # cell at the breakdown's concurrency, 2 here) the HTTP server's share of the CPU.
    where = result["where_the_time_goes"]["models"]["classifier"]
    assert where["concurrency"] == 2
    assert set(where["stage_us"]) >= {"pydantic_validation", "binary_decode_and_checks"}
    assert all(v >= 0 for v in where["stage_us"].values())
    assert where["http_server_cpu_us_per_request"] == pytest.approx(
        1e3 * cell["server_cpu_ms_per_request"] - where["asgi_app_cpu_us_per_request"]
    )


@pytest.mark.parametrize("binary", [True, False])
def test_lean_load_generator_checks_every_answer(server, repo, binary):
    """The lean client counts a request as ok only when its answer matches the expected output:
    right answers pass, a wrong expectation or an unknown model fails every request."""
    from serving.bench import drive, drive_lean

    x = {"image": repo[1]["classifier"]["image"][:1]}
    want = {"logits": direct(repo[0] / "classifier" / "model.onnx", x["image"])}
    kwargs = {"concurrency": 3, "seconds": 30, "binary": binary, "timeout": 30}
    ok = drive_lean(server.url, "classifier", x, want, max_requests=40, **kwargs)
    assert (ok["ok"], ok["failed"]) == (40, 0), ok["failure_examples"]
    # The same run through tritonclient.http agrees.
    assert drive(server.url, "classifier", x, want, max_requests=10, **kwargs)["ok"] == 10
    wrong = {"logits": want["logits"] + 0.01}
    bad = drive_lean(server.url, "classifier", x, wrong, max_requests=20, **kwargs)
    assert (bad["ok"], bad["failed"]) == (0, 20)
    assert bad["failure_examples"] == ["AssertionError: logits differs from raw onnxruntime"]
    missing = drive_lean(server.url, "no_such_model", x, want, max_requests=5, **kwargs)
    assert (missing["ok"], missing["failed"]) == (0, 5)
    assert all("HTTP 404" in e for e in missing["failure_examples"])

"""Load benchmark of the model server with the standard `tritonclient.http` client.

    python -m serving.bench --out benchmarks/results/serving.json --duration 30

For each model (a small CNN and a ResNet-50 at 224x224, random weights, exported once into a
temporary repository unless `--repository` names one), it measures raw in-process onnxruntime
throughput (batch 1, back to back, same threads as the server: the reference), then starts the
real server (`python -m serving`, localhost only) with dynamic batching on and off and drives it
with `tritonclient.http` threads (one client per thread) at each concurrency, with binary and
JSON tensors, for `--duration` seconds each (and at most `--max-requests`). Every response is
checked against the raw onnxruntime output of the same input. It records throughput, its ratio
to raw onnxruntime, p50/p90/p99 latency, failed requests, mean batch size and where the time
goes per request (server stages from /metrics: read, decode, queue, infer, encode; the rest of
the client-observed latency is client and HTTP), plus machine info, load average and every
setting, and the CPU time per request of the server process and of the client process next
to the CPU time per inference of raw onnxruntime (on a shared machine CPU time is steadier
than wall time). Importing this module imports no TensorFlow; only exporting the default
models (when no `--repository` is given) needs the full dlmodels install.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "small_cnn": {"input": (32, 32, 3)},
    "resnet50": {"input": (224, 224, 3)},
}


def export_models(root: Path, names: list[str]) -> None:
    """Build and export the benchmark models (needs TensorFlow; not imported otherwise)."""
    import keras

    import dlmodels
    from dlmodels import export

    for name in names:
        keras.utils.set_random_seed(0)
        if name == "small_cnn":
            inp = keras.Input((32, 32, 3), name="image")
            x = inp
            for i, f in enumerate((16, 32, 64)):
                x = keras.layers.Conv2D(f, 3, padding="same", activation="relu", name=f"c{i}")(x)
                x = keras.layers.MaxPooling2D(name=f"p{i}")(x)
            x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
            out = keras.layers.Dense(10, name="logits")(x)
            model = keras.Model(inp, out, name="small_cnn")
        elif name == "resnet50":
            model = dlmodels.models.ResNet50(input_shape=(224, 224, 3))
        else:
            raise ValueError(f"unknown benchmark model {name!r}; known: {list(MODELS)}")
        shape = MODELS[name]["input"]
        x = np.random.default_rng(0).uniform(0, 1, (2, *shape)).astype("float32")
        export.write_repository(model, root / name, samples=x, formats=("onnx",))


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("onnxruntime", "numpy", "fastapi", "uvicorn", "tritonclient", "orjson"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def raw_throughput(model, seconds: float, batch: int = 1) -> dict:
    """Back-to-back in-process onnxruntime runs of an `OnnxModel` (the reference): items/s
    and p50 latency."""
    feeds = example(model, batch, seed=1)
    for _ in range(3):
        model.session.run(None, feeds)
    times = []
    cpu0 = process_cpu_s()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t = time.perf_counter()
        model.session.run(None, feeds)
        times.append(time.perf_counter() - t)
    cpu = process_cpu_s() - cpu0
    total = sum(times)
    return {
        "batch": batch,
        "runs": len(times),
        "cpu_ms_per_item": 1e3 * cpu / (batch * len(times)),
        "items_per_s": batch * len(times) / total,
        "p50_ms": 1e3 * float(np.median(times)),
    }


def example(model, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every input of `model` (uniform [0, 1) floats, small integers)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in model.inputs:
        shape = spec.example_shape(batch)
        if spec.dtype.startswith("float"):
            feeds[spec.name] = rng.uniform(0, 1, shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.integers(0, 2, shape).astype(spec.dtype)
    return feeds


RAW_SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}
"""What `python -m serving` sets by default; the reference runs with it too."""

_METRIC = re.compile(r"^(dlmodels_\w+)\{([^}]*)\}\s+([0-9.eE+-]+)$")


def scrape(url: str) -> dict:
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        m = _METRIC.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            key = (m.group(1), labels.get("model"), labels.get("stage"))
            out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def server_breakdown(before: dict, after: dict, model: str) -> dict:
    def delta(name, stage=None):
        key = (name, model, stage)
        return after.get(key, 0.0) - before.get(key, 0.0)

    stages = {}
    for stage in ("read", "decode", "queue", "infer", "encode"):
        n = delta("dlmodels_stage_duration_seconds_count", stage)
        if n:
            stages[stage] = 1e3 * delta("dlmodels_stage_duration_seconds_sum", stage) / n
    runs = delta("dlmodels_batch_size_count")
    rows = delta("dlmodels_batch_size_sum")
    total = delta("dlmodels_request_duration_seconds_count")
    return {
        "stage_ms": stages,
        "server_ms": 1e3 * delta("dlmodels_request_duration_seconds_sum") / total
        if total
        else None,
        "onnxruntime_runs": int(runs),
        "mean_batch_size": rows / runs if runs else None,
    }


def _triton_io(feeds, expected, binary):
    """tritonclient's `InferInput`s for `feeds` and `InferRequestedOutput`s for the outputs
    named in `expected`, with binary tensor data or JSON."""
    import tritonclient.http as th

    from serving._common import NUMPY_TO_V2

    inputs = []
    for name, x in feeds.items():
        inp = th.InferInput(name, list(x.shape), NUMPY_TO_V2[x.dtype.name])
        inp.set_data_from_numpy(x, binary_data=binary)
        inputs.append(inp)
    return inputs, [th.InferRequestedOutput(n, binary_data=binary) for n in expected]


def _check_outputs(result, expected) -> None:
    """Raise unless every output of a tritonclient `InferResult` equals `expected` (output
    name -> array, from raw onnxruntime) within 1e-4."""
    for name, want in expected.items():
        got = result.as_numpy(name)
        if got is None or not np.allclose(got, want, atol=1e-4):
            raise AssertionError(f"{name} differs from raw onnxruntime")


def drive(url, model, feeds, expected, *, concurrency, seconds, binary, max_requests, timeout):
    """tritonclient.http threads (one client each) sending `feeds` until the time or count
    runs out; every answer is compared with `expected` (output name -> array)."""
    import tritonclient.http as th

    host = url.split("://", 1)[1]
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []
    count = [0]
    stop = time.perf_counter() + seconds

    def worker():
        client = th.InferenceServerClient(host, connection_timeout=timeout, network_timeout=timeout)
        inputs, out = _triton_io(feeds, expected, binary)
        local = []
        try:
            while time.perf_counter() < stop:
                with lock:
                    if count[0] >= max_requests:
                        break
                    count[0] += 1
                t = time.perf_counter()
                try:
                    _check_outputs(client.infer(model, inputs, outputs=out), expected)
                except Exception as err:  # counted, never raised: the run must finish
                    with lock:
                        failures.append(f"{type(err).__name__}: {err}"[:200])
                    continue
                local.append(time.perf_counter() - t)
        finally:
            client.close()
            with lock:
                latencies.extend(local)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return _summary(latencies, failures, wall)


def drive_lean(url, model, feeds, expected, *, concurrency, seconds, binary, max_requests, timeout):
    """A lean load generator with the same requests and checks as `drive`.

    `concurrency` keep-alive connections on one asyncio loop (uvloop when installed), each
    sending the exact body `tritonclient.http` builds for these inputs
    (`InferenceServerClient.generate_request_body`, with its Inference-Header-Content-Length
    header) and checking every answer like `drive` does: parsed with tritonclient's own
    `parse_response_body` and compared with `expected`, or byte-identical (body and header
    length) to an answer that was. Only the transport differs: no per-request thread
    switch, header dict or gevent machinery, so on a machine where the client shares the
    server's cores it leaves more of them to the server.
    """
    import asyncio
    from urllib.parse import urlsplit

    import tritonclient.http as th

    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or 80
    inputs, out = _triton_io(feeds, expected, binary)
    body, json_size = th.InferenceServerClient.generate_request_body(inputs, outputs=out)
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    if json_size is not None:
        head += f"Inference-Header-Content-Length: {json_size}\r\n"
    request = head.encode() + b"\r\n" + body
    latencies: list[float] = []
    failures: list[str] = []
    count = [0]

    verified: set[bytes] = set()

    def check(status: bytes, headers: dict, payload: bytes) -> None:
        if status != b"200":
            raise AssertionError(f"HTTP {status.decode()}: {payload[:120]!r}")
        hlen = headers.get(b"inference-header-content-length")
        key = hlen + b"|" + payload if hlen is not None else payload
        if key in verified:  # byte-identical to an answer already parsed and checked
            return
        r = th.InferenceServerClient.parse_response_body(
            payload, header_length=int(hlen) if hlen is not None else None
        )
        _check_outputs(r, expected)
        if len(verified) < 64:
            verified.add(key)

    async def connection(stop):
        reader = writer = None
        local = []
        try:
            while time.perf_counter() < stop and count[0] < max_requests:
                count[0] += 1
                t = time.perf_counter()
                try:
                    async with asyncio.timeout(timeout):
                        if writer is None:
                            reader, writer = await asyncio.open_connection(host, port)
                        writer.write(request)
                        raw = await reader.readuntil(b"\r\n\r\n")
                        lines = raw[:-4].split(b"\r\n")
                        status = lines[0].split(b" ", 2)[1]
                        headers = {}
                        for line in lines[1:]:
                            k, _, v = line.partition(b":")
                            headers[k.strip().lower()] = v.strip()
                        payload = await reader.readexactly(
                            int(headers.get(b"content-length", b"0"))
                        )
                    check(status, headers, payload)
                    if headers.get(b"connection", b"").lower() == b"close":
                        writer.close()
                        reader = writer = None
                except Exception as err:  # counted, never raised: the run must finish
                    failures.append(f"{type(err).__name__}: {err}"[:200])
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                    continue
                local.append(time.perf_counter() - t)
        finally:
            if writer is not None:
                writer.close()
            latencies.extend(local)

    async def main():
        stop = time.perf_counter() + seconds
        await asyncio.gather(*(connection(stop) for _ in range(concurrency)))

    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        loop_factory = None
    start = time.perf_counter()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())
    wall = time.perf_counter() - start
    return _summary(latencies, failures, wall)


def _summary(latencies: list[float], failures: list[str], wall: float) -> dict:
    lat = np.array(latencies) * 1e3 if latencies else np.array([np.nan])
    return {
        "requests": len(latencies) + len(failures),
        "ok": len(latencies),
        "failed": len(failures),
        "failure_examples": sorted(set(failures))[:5],
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)),
        "mean_ms": float(np.mean(lat)),
    }


CLIENTS = {"tritonclient": drive, "lean": drive_lean}
"""Load generators by name: the standard client (threads) and the lean asyncio one."""


def process_cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one when pid is None)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def server_cpu_s(pid: int) -> float:
    """CPU seconds of the server process and its children (the workers of `--workers N`)."""
    total = process_cpu_s(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return total
    return total + sum(process_cpu_s(int(c)) for c in children)


def plan_placement(cpus: list[int], pin: str) -> dict:
    """Which cores the server and the client (with the raw reference) get.

    `pin` "auto" pins when at least 4 cores are available, "on" whenever there are 2, "off"
    never. Pinned, the server gets the first half of the cores (rounded up) and the client
    process the rest: on a small machine a client sharing the server's cores takes the CPU
    the server would use, and the ratio then measures the client too.
    """
    if pin not in ("auto", "on", "off"):
        raise ValueError(f"pin must be 'auto', 'on' or 'off', got {pin!r}")
    cpus = sorted(cpus)
    if pin == "off" or len(cpus) < 2 or (pin == "auto" and len(cpus) < 4):
        why = "off" if pin == "off" else f"{len(cpus)} cores (pinning needs >= 4 with auto)"
        return {"pinned": False, "server_cpus": cpus, "client_cpus": cpus, "reason": why}
    half = (len(cpus) + 1) // 2
    return {
        "pinned": True,
        "server_cpus": cpus[:half],
        "client_cpus": cpus[half:],
        "reason": f"{len(cpus)} cores: server and raw reference on the first {half}, "
        "client on the rest",
    }


def _set_affinity(cpus: list[int]) -> None:
    """Pin this thread (threads it starts inherit it) to `cpus`, where the OS allows it."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


def _affinities(server_pid: int) -> dict:
    """The cores the server process and this (client) thread may run on now, as observed."""
    if not hasattr(os, "sched_getaffinity"):
        return {}
    return {
        "server_cpus": sorted(os.sched_getaffinity(server_pid)),
        "client_cpus": sorted(os.sched_getaffinity(0)),
    }


def request_breakdown(
    repo: Path, model: str, *, concurrency: int = 16, threads: int = 1, seconds: float = 0.3
) -> dict:
    """Where a binary KServe v2 request's server time goes, without HTTP: each stage of the
    server's request path timed on its own (CPU µs of this process, best of 5 rounds, batch 1:
    on a busy machine CPU time is steadier than wall time), and the whole
    app driven in-process through ASGI at `concurrency` (CPU µs per request, batching on).
    Repetitions are sized so each timing takes about `seconds`.
    The HTTP server's share (uvicorn, httptools, sockets) is the server process's CPU per
    request in a cell minus `asgi_app_cpu_us_per_request`."""
    import asyncio

    import orjson

    from serving import codec
    from serving.app import AppOptions, InferenceRequest, _validate, create_app
    from serving.repository import ServerSettings

    def best(fn, k=2000):
        out = []
        for _ in range(5):
            t = time.process_time()
            for _ in range(k):
                fn()
            out.append((time.process_time() - t) / k * 1e6)
        return min(out)

    async def abest(fn, k=500):
        out = []
        for _ in range(5):
            t = time.process_time()
            for _ in range(k):
                await fn()
            out.append((time.process_time() - t) / k * 1e6)
        return min(out)

    async def measure():
        app = create_app(str(repo), ServerSettings(threads=threads), AppOptions(poll_interval=0))
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        try:
            for _ in range(3000):
                if app.state.ready["ready"]:
                    break
                await asyncio.sleep(0.05)
            served = app.state.repository.get(model)
            (name,) = [s.name for s in served.inputs]
            x = example(served.model, 1, seed=3)[name]
            header = orjson.dumps(
                {
                    "inputs": [
                        {
                            "name": name,
                            "shape": list(x.shape),
                            "datatype": codec.v2_datatype(x.dtype),
                            "parameters": {"binary_data_size": x.nbytes},
                        }
                    ],
                    "outputs": [
                        {"name": o, "parameters": {"binary_data": True}}
                        for o in served.output_names
                    ],
                }
            )
            body, hlen = header + x.tobytes(), len(header)
            path = f"/v2/models/{model}/infer"
            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": path,
                "raw_path": path.encode(),
                "query_string": b"",
                "root_path": "",
                "headers": [
                    (b"host", b"127.0.0.1"),
                    (b"content-length", str(len(body)).encode()),
                    (b"inference-header-content-length", str(hlen).encode()),
                ],
                "client": ("127.0.0.1", 1),
                "server": ("127.0.0.1", 8000),
            }
            session = served.model.session
            t = time.perf_counter()
            session.run(None, {name: x})
            once = max(time.perf_counter() - t, 1e-6)
            k_run = max(3, min(2000, int(seconds / once)))
            n = concurrency * max(4, min(200, int(10 * seconds / once / concurrency)))
            codes = []

            async def one():
                messages = [{"type": "http.request", "body": body, "more_body": False}]

                async def receive():
                    return messages.pop() if messages else {"type": "http.disconnect"}

                async def send(message):
                    if message["type"] == "http.response.start":
                        codes.append(message["status"])

                await app(dict(scope), receive, send)

            async def worker(k):
                for _ in range(k):
                    await one()

            r = {"model": model, "concurrency": concurrency}
            r["asgi_app_us_c1"] = await abest(one, k_run)
            await asyncio.gather(*(worker(2) for _ in range(concurrency)))
            cpu0, t0 = time.process_time(), time.perf_counter()
            await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
            done = n // concurrency * concurrency
            r["asgi_app_cpu_us_per_request"] = 1e6 * (time.process_time() - cpu0) / done
            r["asgi_app_wall_us_per_request"] = 1e6 * (time.perf_counter() - t0) / done
            if set(codes) != {200}:
                raise RuntimeError(f"in-process requests answered {sorted(set(codes))}")
            stages = r["stage_us"] = {}
            stages["json_header_orjson"] = best(lambda: codec.loads(memoryview(body)[:hlen]))
            obj = codec.loads(memoryview(body)[:hlen])
            stages["pydantic_validation"] = best(lambda: _validate(InferenceRequest, obj))
            req = _validate(InferenceRequest, obj)
            stages["binary_decode_and_checks"] = best(
                lambda: codec.decode_v2(served, req, body, hlen)
            )
            feeds = codec.decode_v2(served, req, body, hlen)
            session = served.model.session
            stages["onnxruntime_run"] = best(lambda: session.run(served.output_names, feeds), k=300)
            with_batcher = await abest(lambda: served.infer(feeds), k=300)
            stages["batcher_handoff"] = max(with_batcher - stages["onnxruntime_run"], 0.0)
            outputs = await served.infer(feeds)
            stages["encode_response"] = best(
                lambda: codec.encode_v2(served, req, outputs, served.version)
            )
            m = app.state.metrics

            def account():  # what one request and its share of a batch record
                m.inflight.inc()
                m.inflight.dec()
                m.requests.labels(model, "v2", "200").inc()
                for stage in ("read", "decode", "encode", "queue", "infer"):
                    m.stage.labels(model, stage).observe(1e-4)
                m.latency.labels(model, "v2").observe(1e-3)
                m.queue_depth.labels(model).set(0)

            stages["metrics"] = best(account)
            named = sum(v for k, v in stages.items())
            stages["rest_of_app_path"] = max(r["asgi_app_us_c1"] - named, 0.0)
            return r
        finally:
            await lifespan.__aexit__(None, None, None)

    try:
        import uvloop

        return uvloop.run(measure())
    except ImportError:
        return asyncio.run(measure())


def start_server(repo: Path, port: int, extra: list[str], threads: int, cpus=None):
    import httpx

    log = open(repo.parent / f"server-{port}.log", "w")  # noqa: SIM115 (closed by caller)
    cmd = [sys.executable, "-m", "serving", "--model-repository", str(repo), "--port", str(port)]
    cmd += ["--threads", str(threads), "--poll-interval", "0", "--log-level", "warning", *extra]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=log,
        stderr=log,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).is_success:
                return proc, log
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready in 300 s; see {log.name}")


def wait_for_workers(url: str, workers: int, timeout: float = 120.0) -> None:
    """Until /metrics lists `workers` workers (each lists itself once it serves and has written
    its first metrics snapshot): a client connecting while only some workers listen would
    put all its keep-alive connections on those."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:  # a connection the kernel gives a worker still warming up waits for it
            text = httpx.get(f"{url}/metrics", timeout=10).text
        except httpx.HTTPError:
            text = ""
        if text.count("dlmodels_worker_requests_total{") >= workers:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{workers} server workers not all up after {timeout} s")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> dict:
    from dlmodels.runtime import OnnxModel, default_threads

    clients = [k.strip() for k in args.clients.split(",") if k.strip()]
    unknown = [k for k in clients if k not in CLIENTS]
    if unknown:  # before minutes of export and reference runs
        raise SystemExit(f"--clients: unknown {unknown}; choose from {sorted(CLIENTS)}")
    lean_encodings = {e.strip() for e in args.lean_encodings.split(",") if e.strip()}

    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    placement = plan_placement(available, args.pin) if available else {"pinned": False}
    server_cpus = placement.get("server_cpus") if placement["pinned"] else None
    client_cpus = placement.get("client_cpus") if placement["pinned"] else None
    if server_cpus:  # the reference sessions' threads are created on the server's cores
        _set_affinity(server_cpus)
    threads = args.threads or default_threads()
    if args.server_workers < 1:
        raise SystemExit(f"--server-workers {args.server_workers}: must be >= 1")
    worker_threads = args.threads or max(1, threads // args.server_workers)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    scratch = None
    if args.repository:
        repo = Path(args.repository)
    else:
        scratch = Path(tempfile.mkdtemp(prefix="serving-bench-"))
        repo = scratch / "repo"
        t = time.perf_counter()
        export_models(repo, models)
        print(f"exported {models} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    result = {
        "benchmark": "serving",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "loadavg_start": os.getloadavg(),
        "settings": {
            "repository": str(repo),
            "exported_here": scratch is not None,
            "duration_s": args.duration,
            "concurrency": args.concurrency,
            "encodings": args.encodings,
            "batching": args.batching,
            "max_batch_size": args.max_batch_size,
            "max_queue_delay_ms": args.max_queue_delay_ms,
            "max_requests_per_cell": args.max_requests,
            "server_threads": threads,
            "server_workers": args.server_workers,
            "server_threads_per_worker": worker_threads,
            "pin": args.pin,
            "raw_session_config": RAW_SESSION_CONFIG,
            "raw_seconds": args.raw_seconds,
            "clients": {
                "tritonclient": "tritonclient.http, one InferenceServerClient per thread, "
                "batch-1 requests",
                "lean": "drive_lean: one asyncio (uvloop) keep-alive connection per concurrent "
                "request sending request bytes built once (the body tritonclient.http builds "
                "for the same inputs, so the client's per-request encoding is not paid); every "
                "answer checked: parsed with tritonclient's parse_response_body and compared, "
                "or byte-identical to an answer that was. It measures what the server does "
                "when the client leaves it the shared cores",
            },
            "clients_run": args.clients,
            "lean_encodings": args.lean_encodings,
            "server": "python -m serving on 127.0.0.1 (uvicorn), same machine as the client"
            + (", pinned to its own cores" if placement["pinned"] else ", same cores"),
            "reference": "in-process onnxruntime in the benchmark process, batch 1 back to "
            "back, same threads as the server, measured for raw_seconds right before each cell "
            "(ratio_vs_raw_b1) and once at the start (ratio_vs_raw_b1_at_start)",
        },
        "placement": placement,
        "models": {},
        "raw_onnxruntime": {},
        "cells": [],
    }
    inputs, expected, refs = {}, {}, {}
    for m in models:
        ref = OnnxModel.from_manifest(repo / m, threads=1)
        path = ref.path
        # The server's session settings (no spinning): a fair reference on a shared machine.
        model = refs[m] = OnnxModel(path, threads=threads, session_config=RAW_SESSION_CONFIG)
        result["models"][m] = {
            "params": ref.manifest.source_model.get("params"),
            "class": ref.manifest.source_model.get("class"),
            "inputs": [t.to_dict() for t in model.inputs],
            "onnx_bytes": path.stat().st_size,
        }
        result["raw_onnxruntime"][m] = {
            "b1": raw_throughput(model, args.raw_seconds),
            f"b{args.max_batch_size}": raw_throughput(
                model, args.raw_seconds, batch=args.max_batch_size
            ),
        }
        inputs[m] = example(model, 1, seed=2)
        expected[m] = model.run(inputs[m])
        print(f"raw {m}: {result['raw_onnxruntime'][m]}", file=sys.stderr)
    levels = [int(c) for c in args.concurrency.split(",")]
    for batching in args.batching.split(","):
        port = _free_port()
        extra = ["--max-batch-size", str(args.max_batch_size)]
        extra += ["--max-queue-delay-ms", str(args.max_queue_delay_ms)]
        if batching == "off":
            extra.append("--no-dynamic-batching")
        if args.server_workers > 1:
            extra += ["--workers", str(args.server_workers)]
        proc, log = start_server(repo, port, extra, worker_threads, server_cpus)
        url = f"http://127.0.0.1:{port}"
        if args.server_workers > 1:  # every worker listening before the clients connect
            wait_for_workers(url, args.server_workers)
        try:
            for m in models:
                for encoding in args.encodings.split(","):
                    used = [k for k in clients if k != "lean" or encoding in lean_encodings]
                    for c, client in [(c, k) for c in levels for k in used]:
                        # The reference again, right before the cell: on a shared machine the
                        # load moves, and the ratio should compare like with like.
                        if server_cpus:
                            _set_affinity(server_cpus)
                        raw_now = raw_throughput(refs[m], args.raw_seconds)
                        raw = raw_now["items_per_s"]
                        if client_cpus:
                            _set_affinity(client_cpus)
                        before = scrape(url)
                        load = os.getloadavg()
                        observed = _affinities(proc.pid)
                        cpu = (server_cpu_s(proc.pid), process_cpu_s())
                        cell = CLIENTS[client](
                            url,
                            m,
                            inputs[m],
                            expected[m],
                            concurrency=c,
                            seconds=args.duration,
                            binary=encoding == "binary",
                            max_requests=args.max_requests,
                            timeout=60,
                        )
                        n_ok = max(cell["ok"], 1)
                        cell["server_cpu_ms_per_request"] = (
                            1e3 * (server_cpu_s(proc.pid) - cpu[0]) / n_ok
                        )
                        cell["client_cpu_ms_per_request"] = 1e3 * (process_cpu_s() - cpu[1]) / n_ok
                        cell.update(server_breakdown(before, scrape(url), m))
                        if cell["server_ms"] is not None:
                            cell["client_and_http_ms"] = cell["mean_ms"] - cell["server_ms"]
                        cell.update(
                            model=m,
                            client=client,
                            batching=batching,
                            encoding=encoding,
                            concurrency=c,
                            raw_b1_before=raw_now,
                            ratio_vs_raw_b1=cell["requests_per_s"] / raw,
                            ratio_vs_raw_b1_at_start=cell["requests_per_s"]
                            / result["raw_onnxruntime"][m]["b1"]["items_per_s"],
                            loadavg_before=load,
                            **observed,
                        )
                        result["cells"].append(cell)
                        print(
                            f"{m:9s} batching={batching:3s} {encoding:6s} c={c:<3d} "
                            f"{client:12s} "
                            f"{cell['requests_per_s']:8.1f} req/s "
                            f"ratio {cell['ratio_vs_raw_b1']:.2f}"
                            f" p50 {cell['p50_ms']:.2f} p99 {cell['p99_ms']:.2f} ms "
                            f"failed {cell['failed']} batch {cell['mean_batch_size']}",
                            file=sys.stderr,
                        )
        finally:
            proc.terminate()
            proc.wait(60)
            log.close()
    if args.breakdown:
        if server_cpus:
            _set_affinity(server_cpus)
        result["where_the_time_goes"] = breakdowns(
            repo,
            models,
            result["cells"],
            threads,
            args.breakdown_seconds,
            16 if 16 in levels else max(levels),
        )
    if available:
        _set_affinity(available)
    result["loadavg_end"] = os.getloadavg()
    result["failed_total"] = sum(c["failed"] for c in result["cells"])
    if scratch is not None and not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def breakdowns(
    repo: Path,
    models: list[str],
    cells: list[dict],
    threads: int,
    seconds: float = 0.3,
    concurrency: int = 16,
) -> dict:
    """`request_breakdown` per model at `concurrency`, with the HTTP server's share taken from
    the binary cell with batching on at that concurrency."""
    out = {
        "method": "stage_us: each stage of the server's request path timed on its own in "
        "the benchmark process (CPU time, batch 1, best of 5 rounds); asgi_app_*: the whole app "
        "driven "
        "in-process through ASGI (no HTTP) at the concurrency given, batching on; "
        "http_server_cpu_us_per_request: the server process's CPU per request in the cell "
        "minus asgi_app_cpu_us_per_request (uvicorn, httptools, sockets, asyncio)",
        "models": {},
    }
    for m in models:
        try:
            b = request_breakdown(
                repo, m, concurrency=concurrency, threads=threads, seconds=seconds
            )
        except Exception as err:  # a breakdown is extra: never lose the cells for it
            out["models"][m] = {"error": f"{type(err).__name__}: {err}"}
            continue
        for c in cells:
            if (c["model"], c["client"], c["encoding"], c["batching"], c["concurrency"]) == (
                m,
                "tritonclient",
                "binary",
                "on",
                b["concurrency"],
            ):
                b["server_process_cpu_us_per_request"] = 1e3 * c["server_cpu_ms_per_request"]
                b["http_server_cpu_us_per_request"] = (
                    b["server_process_cpu_us_per_request"] - b["asgi_app_cpu_us_per_request"]
                )
                b["client_cpu_us_per_request"] = 1e3 * c["client_cpu_ms_per_request"]
        out["models"][m] = b
        print(f"where the time goes, {m}: {json.dumps(b, default=float)}", file=sys.stderr)
    return out


def markdown(result: dict) -> str:
    rows = [
        "| model | batching | tensors | c | client | req/s | raw ORT b1/s | ratio | p50 ms | "
        "p99 ms | batch | server ms | client+HTTP ms | client CPU µs/req | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cells"]:
        server = c.get("server_ms") or 0.0
        rows.append(
            f"| {c['model']} | {c['batching']} | {c['encoding']} | {c['concurrency']} | "
            f"{c.get('client', 'tritonclient')} | {c['requests_per_s']:.0f} | "
            f"{c['raw_b1_before']['items_per_s']:.0f} | "
            f"{c['ratio_vs_raw_b1']:.2f} | {c['p50_ms']:.1f} | {c['p99_ms']:.1f} | "
            f"{c['mean_batch_size'] or 0:.1f} | {server:.2f} | "
            f"{c.get('client_and_http_ms', 0.0):.2f} | "
            f"{1e3 * c['client_cpu_ms_per_request']:.0f} | {c['failed']} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.bench", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serving.json"))
    p.add_argument(
        "--repository",
        default=None,
        help="an exported repository to serve instead of exporting the default models",
    )
    p.add_argument("--models", default="small_cnn,resnet50", help="model names to drive")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per cell")
    p.add_argument("--concurrency", default="1,16,32")
    p.add_argument("--encodings", default="binary,json")
    p.add_argument(
        "--clients",
        default="tritonclient,lean",
        help="load generators: tritonclient (tritonclient.http threads) and lean (asyncio, "
        "same requests and checks)",
    )
    p.add_argument(
        "--lean-encodings",
        default="binary",
        help="the encodings the lean client runs with (the tritonclient one runs them all)",
    )
    p.add_argument("--batching", default="on,off")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-queue-delay-ms", type=float, default=1.0)
    p.add_argument("--max-requests", type=int, default=200_000, help="per cell")
    p.add_argument("--raw-seconds", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (server, raw)")
    p.add_argument(
        "--server-workers",
        type=int,
        default=1,
        help="server processes (python -m serving --workers N); with N > 1 and no --threads, "
        "each worker's sessions get max(1, threads // N) threads",
    )
    p.add_argument(
        "--pin",
        default="auto",
        choices=["auto", "on", "off"],
        help="pin server and client to separate cores (auto: when >= 4 cores)",
    )
    p.add_argument(
        "--no-breakdown",
        dest="breakdown",
        action="store_false",
        help="skip the in-process per-stage breakdown (where the time goes)",
    )
    p.add_argument(
        "--breakdown-seconds",
        type=float,
        default=0.3,
        help="about how long each breakdown timing runs",
    )
    p.add_argument("--keep", action="store_true", help="keep the exported repository")
    p.add_argument("--markdown", type=Path, default=None, help="also write a markdown table")
    args = p.parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    table = markdown(result)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    print(table)
    return 1 if result["failed_total"] else 0


if __name__ == "__main__":
    sys.exit(main())

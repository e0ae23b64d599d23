"""`python -m serving --model-repository DIR`: the model server (and `dlmodels serve`).

    python -m serving --model-repository repo/                      serve on 127.0.0.1:8000
    python -m serving --model-repository repo/ --check              load, warm up, exit
    python -m serving --model-repository repo/ --workers 2          two server processes

`main(argv)` takes an argument list, so `dlmodels serve` calls it with its own arguments.
Exit status: 0 after a clean shutdown (SIGINT/SIGTERM: in-flight requests finish first) or a
passing --check, 1 when --check found a model that failed (or, with --workers, when a worker
had to be killed at shutdown or kept crashing), 2 for a usage error (no repository, no manifest
in it, no manifest that loads, an invalid option).

`--workers N` (N > 1): this process binds the port (`bind_sockets`: one SO_REUSEPORT socket per
worker where the OS has it, else one shared socket) and supervises N worker processes (started
with `spawn`) that each load the repository themselves (their own onnxruntime sessions,
dynamic batcher and hot-reload scan) and serve on their socket with
`uvicorn.Server(config).run(sockets=[sock])`. SIGTERM/SIGINT to this process is passed to
every worker as SIGTERM: each drains its in-flight requests, then this process exits 0. A worker
that dies is logged (`worker_exited`) and restarted with the same index (more than 3N deaths in
a minute, or one index dying more than 3 times in a row within a minute of its start:
everything stops, exit 1). A worker whose supervisor is gone (killed with SIGKILL) drains
and exits by itself. Metrics are shared through snapshot files (see
`serving.metrics`). Each worker's onnxruntime sessions get `--threads` threads, by default
max(1, cores // N).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from dlmodels.errors import OneLineArgumentParser
from dlmodels.runtime import ManifestError, OnnxModel, find_manifests, load_manifest


def check_repository(root: Path, *, threads: int | None = None, out=sys.stdout) -> int:
    """Load every manifest under `root`, open each ONNX artifact and run one inference on
    zeros shaped like its inputs. Prints one line per artifact; returns the exit status."""
    manifests = find_manifests(root)
    if not manifests:
        print(
            f"{root}: no manifest.json found (looked in it and two levels below); export "
            "models with `dlmodels export` first",
            file=sys.stderr,
        )
        return 2
    failures = checked = 0
    for path in manifests:
        try:
            manifest = load_manifest(path)
        except ManifestError as err:
            print(f"FAIL {err}", file=out)
            failures += 1
            continue
        artifacts = manifest.onnx_artifacts()
        if not artifacts:
            print(
                f"SKIP {manifest.name}: {path} lists no ONNX artifact ({manifest.formats})",
                file=out,
            )
            continue
        for artifact in artifacts:
            label = f"{manifest.name}/{artifact.format}"
            try:
                start = time.perf_counter()
                model = OnnxModel.from_manifest(manifest, artifact.format, threads=threads)
                loaded = time.perf_counter()
                outputs = model.warmup()
                ran = time.perf_counter()
            except Exception as err:  # report every model, then fail as a whole
                print(f"FAIL {label} ({artifact.path}): {type(err).__name__}: {err}", file=out)
                failures += 1
                continue
            checked += 1
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in outputs.items())
            print(
                f"OK   {label}: load {1e3 * (loaded - start):.0f} ms, first inference "
                f"{1e3 * (ran - loaded):.1f} ms -> {shapes}",
                file=out,
            )
    print(f"{checked} artifacts ready, {failures} failed", file=out)
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="python -m serving",
        description="dlmodels model server: TF Serving REST and KServe v2 over onnxruntime "
        "(TensorFlow-free).",
        epilog="Examples:\n"
        "  dlmodels serve --model-repository artifacts/\n"
        "  dlmodels serve --model-repository repo/ --format int8 --port 8080\n"
        "  dlmodels serve --model-repository repo/ --check\n"
        "  dlmodels serve --model-repository repo/ --workers 2 --host 0.0.0.0\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model-repository",
        required=True,
        type=Path,
        help="directory of models: NAME/manifest.json (version 1) or NAME/N/manifest.json",
    )
    p.add_argument(
        "--check", action="store_true", help="load every model, run one inference each, exit"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="onnxruntime threads per model (default: every core, or with --workers N "
        "max(1, cores // N) in each worker)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port, each with its own copy of the models "
        "(default 1: this process serves)",
    )
    p.add_argument("--format", default="onnx", help="artifact format to serve (onnx, int8, ...)")
    p.add_argument(
        "--providers",
        default=None,
        help="comma-separated onnxruntime execution providers, e.g. "
        "OpenVINOExecutionProvider,CPUExecutionProvider (where installed)",
    )
    p.add_argument("--spinning", action="store_true", help="let onnxruntime threads spin")
    p.add_argument(
        "--inline-below-ms",
        type=float,
        default=0.5,
        help="run models faster than this (batch 1) on the event loop, not a worker thread",
    )
    p.add_argument(
        "--no-dynamic-batching", action="store_true", help="run every request on its own"
    )
    p.add_argument("--max-batch-size", type=int, default=32, help="rows per merged batch")
    p.add_argument(
        "--instances",
        type=int,
        default=1,
        help="concurrent onnxruntime runs per model without dynamic batching (default 1)",
    )
    p.add_argument(
        "--max-queue-delay-ms", type=float, default=1.0, help="how long a request waits to batch"
    )
    p.add_argument(
        "--version-policy",
        default="latest:1",
        help="latest:N | all | specific:1,3 (default latest:1)",
    )
    p.add_argument("--poll-interval", type=float, default=2.0, help="hot reload scan, s (0: off)")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="larger bodies get 413")
    p.add_argument(
        "--auth-token-env",
        default=None,
        metavar="VAR",
        help="require `Authorization: Bearer <token>`, the token read from this env variable",
    )
    p.add_argument("--graceful-timeout", type=float, default=30.0, help="shutdown drain, s")
    p.add_argument(
        "--keep-alive",
        type=float,
        default=75.0,
        help="seconds an idle client connection stays open (default 75; with uvicorn's 5 s, a "
        "client pausing that long between requests, e.g. encoding a large JSON tensor, can send "
        "just as the server closes and fail with 'connection closed')",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every request (slower)")
    return p


def parse_policy(text: str) -> dict:
    kind, _, arg = text.partition(":")
    try:
        if kind == "latest":
            policy = {"latest": int(arg or 1)}
        elif kind == "all" and not arg:
            policy = {"all": True}
        elif kind == "specific":
            policy = {"specific": [int(v) for v in arg.split(",")]}
        else:
            raise ValueError
        from serving.repository import check_policy

        return check_policy(policy, "--version-policy")
    except ValueError:
        raise ValueError(f"--version-policy {text!r}: use latest:N, all or specific:1,3") from None


def _http_protocol():
    """httptools with one write per small response (serving._http) where httptools is
    installed, else uvicorn's choice."""
    try:
        from serving._http import CoalescingHttpToolsProtocol
    except ImportError:
        return "auto"
    return CoalescingHttpToolsProtocol


def worker_threads(threads: int | None, workers: int, cores: int | None = None) -> int | None:
    """onnxruntime threads per model in each worker process: `threads` when given; else None
    (onnxruntime over every core, as always) for a single process and max(1, cores // workers)
    for several, so the workers' sessions do not oversubscribe the cores."""
    if threads is not None or workers == 1:
        return threads
    if cores is None:
        from dlmodels.runtime import default_threads

        cores = default_threads()
    return max(1, cores // workers)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: must be >= 1 (the number of server processes)")
    if not args.model_repository.is_dir():
        parser.error(f"--model-repository {args.model_repository}: not a directory")
    if args.check:
        return check_repository(args.model_repository, threads=args.threads)
    manifests = find_manifests(args.model_repository)
    if not manifests:
        print(
            f"{args.model_repository}: no manifest.json found (looked in it and two levels "
            "below); export models with `dlmodels export` first",
            file=sys.stderr,
        )
        return 2
    problems = []
    for path in manifests:
        try:
            load_manifest(path)
            break
        except ManifestError as err:
            problems.append(str(err))
    else:
        print(
            f"{args.model_repository}: no servable model: every manifest failed to load "
            f"({'; '.join(problems)}); fix or re-export them (`--check` reports each one)",
            file=sys.stderr,
        )
        return 2
    try:
        policy = parse_policy(args.version_policy)
    except ValueError as err:
        parser.error(str(err))
    if args.max_batch_size < 1:
        parser.error(f"--max-batch-size {args.max_batch_size}: must be >= 1")
    if args.instances < 1:
        parser.error(f"--instances {args.instances}: must be >= 1")
    if not args.keep_alive > 0:
        parser.error(f"--keep-alive {args.keep_alive}: must be > 0 seconds")
    token = None
    if args.auth_token_env:
        token = os.environ.get(args.auth_token_env)
        if not token:
            parser.error(f"--auth-token-env {args.auth_token_env}: the variable is not set")

    import uvicorn

    from serving._common import log, setup_logging
    from serving.app import AppOptions, create_app
    from serving.repository import ServerSettings

    setup_logging(args.log_level)
    settings = ServerSettings(
        format=args.format,
        threads=worker_threads(args.threads, args.workers),
        providers=tuple(args.providers.split(",")) if args.providers else None,
        spinning=args.spinning,
        inline_below_ms=args.inline_below_ms,
        instances=args.instances,
        dynamic_batching=not args.no_dynamic_batching,
        max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms,
        version_policy=policy,
    )
    options = AppOptions(
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        auth_token=token,
        poll_interval=args.poll_interval,
    )
    log(
        logging.INFO,
        "server_start",
        host=args.host,
        port=args.port,
        repository=str(args.model_repository),
        settings=json.loads(json.dumps(settings.__dict__, default=list)),
        pid=os.getpid(),
        tensorflow_loaded="tensorflow" in sys.modules,
        keras_loaded="keras" in sys.modules,
        **({"workers": args.workers} if args.workers > 1 else {}),
    )
    server_options = {
        "host": args.host,
        "port": args.port,
        "log_config": None,
        "access_log": args.access_log,
        "timeout_graceful_shutdown": args.graceful_timeout,
        "timeout_keep_alive": args.keep_alive,
        "server_header": False,
        "loop": "auto",  # uvloop when installed
        "http": _http_protocol(),
    }
    if args.workers > 1:
        from serving.app import WorkerPlan

        plan = WorkerPlan(
            str(args.model_repository), settings, options, server_options, args.log_level
        )
        return _supervise(plan, args.workers, args.graceful_timeout)
    app = create_app(str(args.model_repository), settings, options)
    config = uvicorn.Config(app, **server_options)
    # uvicorn drains in-flight requests on SIGTERM/SIGINT, restores the previous handlers and
    # re-raises the signal; no-op handlers make that re-raise harmless, so a graceful shutdown
    # exits with status 0 (what process managers expect) instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run()
    return 0


# -- several worker processes (--workers N) -----------------------------------------------


def bind_sockets(host: str, port: int, n: int, backlog: int = 2048) -> list[socket.socket]:
    """The listening sockets of `n` workers, all on `host:port`: one per worker with
    SO_REUSEPORT where the OS has it (Linux, BSD), so the kernel spreads new connections over
    the workers; else one socket they share. The parent keeps them open, so a restarted worker
    takes over its socket and the connections waiting on it.

    Why not one shared socket everywhere: the worker that wakes first accepts every connection
    waiting (asyncio and uvloop accept in a loop), so a burst of keep-alive connections can all
    land on one worker: 16 benchmark connections went 0 / 16 to two workers.
    The sockets listen at once (uvicorn's backlog, 2048): a bound socket that does not listen
    does not hold the port on Linux (another SO_REUSEADDR socket may bind it too), so a second
    server started while the workers load their models would pass the check below and share
    the port. Connections the kernel gives a worker that is still warming up wait in its
    backlog until it accepts them.
    Raises OSError when the port is taken (checked without SO_REUSEPORT, so another server
    on the port is an error, not a silent sharer)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((host, port))
    except OSError:
        probe.close()
        raise
    if not hasattr(socket, "SO_REUSEPORT"):
        probe.listen(backlog)
        probe.set_inheritable(True)
        return [probe] * n
    port = probe.getsockname()[1]
    probe.close()
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket(family)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            sock.set_inheritable(True)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


class RestartBudget:
    """When the supervisor stops restarting dead workers (and exits 1): more than 3N deaths
    within a minute (a fast crash loop), or one worker index dying more than 3 times in a row,
    each time less than a minute after its start (a slow crash loop, e.g. a worker that dies
    while loading or warming up its models: it would never hit the first limit and be
    restarted forever)."""

    def __init__(self, workers: int, window_s: float = 60.0, max_in_a_row: int = 3):
        self.workers, self.window_s, self.max_in_a_row = workers, window_s, max_in_a_row
        self.deaths: list[float] = []
        self.short_lives: dict[int, int] = {}

    def died(self, index: int, uptime_s: float, now: float) -> str | None:
        """Record a death; the reason to give up, or None to restart the worker."""
        self.deaths = [t for t in self.deaths if now - t < self.window_s] + [now]
        if len(self.deaths) > 3 * self.workers:
            return f"{len(self.deaths)} deaths in the last {self.window_s:g} s"
        short = self.short_lives.get(index, 0) + 1 if uptime_s < self.window_s else 0
        self.short_lives[index] = short
        if short > self.max_in_a_row:
            return f"worker {index} died {short} times in a row, each < {self.window_s:g} s old"
        return None


def _supervise(plan, workers: int, graceful_timeout: float) -> int:
    """Bind the port, run `workers` worker processes on it until SIGTERM/SIGINT, restart
    any that dies, drain them all at the end; the exit status."""
    import multiprocessing
    import shutil
    import tempfile
    from multiprocessing.connection import wait

    from serving._common import log
    from serving.app import run_worker
    from serving.metrics import retire_snapshot

    ctx = multiprocessing.get_context("spawn")
    host, port = plan.server_options["host"], plan.server_options["port"]
    try:
        socks = bind_sockets(host, port, workers)
    except OSError as err:
        log(logging.ERROR, "bind_failed", host=host, port=port, error=str(err))
        return 1
    log(
        logging.INFO,
        "listening",
        url=f"http://{host}:{socks[0].getsockname()[1]}",
        sockets=len({id(s) for s in socks}),
    )
    metrics_dir = tempfile.mkdtemp(prefix="dlmodels-serving-metrics-")
    plan = dataclasses.replace(
        plan, options=dataclasses.replace(plan.options, metrics_dir=metrics_dir)
    )
    procs: dict[int, multiprocessing.process.BaseProcess] = {}
    started_at: dict[int, float] = {}
    budget = RestartBudget(workers)
    signalled: set[int] = set()
    stopping: list[int] = []

    def terminate(p) -> None:
        # Only a worker not yet reaped: the pid of one already reaped may belong to an
        # unrelated process by now.
        if p.pid not in signalled and p.exitcode is None:
            signalled.add(p.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)

    def on_signal(sig, _frame) -> None:
        stopping.append(sig)
        for p in list(procs.values()):
            terminate(p)

    def start(index: int) -> None:
        p = ctx.Process(
            target=run_worker, args=(plan, index, socks[index]), name=f"serving-worker-{index}"
        )
        p.start()
        procs[index] = p
        started_at[index] = time.monotonic()
        log(logging.INFO, "worker_started", worker=index, pid=p.pid)
        if stopping:  # a signal came while it started
            terminate(p)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    log(logging.INFO, "workers_start", workers=workers, pid=os.getpid(), metrics_dir=metrics_dir)
    status = 0
    try:
        for index in range(workers):
            start(index)
        while not stopping:
            wait([p.sentinel for p in procs.values()], timeout=1.0)
            for index, p in list(procs.items()):
                if stopping or p.exitcode is None:
                    continue
                log(logging.ERROR, "worker_exited", worker=index, pid=p.pid, exitcode=p.exitcode)
                retire_snapshot(metrics_dir, p.pid)  # its counters stay counted
                now = time.monotonic()
                reason = budget.died(index, now - started_at[index], now)
                if reason:
                    log(logging.ERROR, "workers_keep_dying", worker=index, reason=reason)
                    status = 1
                    stopping.append(signal.SIGTERM)
                    for other in procs.values():
                        terminate(other)
                    break
                start(index)
        log(logging.INFO, "server_stopping", signal=signal.Signals(stopping[0]).name)
        for sock in socks:  # once the workers close theirs too, new connections are refused
            sock.close()
        deadline = time.monotonic() + graceful_timeout + 15
        for index, p in procs.items():
            p.join(max(0.0, deadline - time.monotonic()))
            if p.exitcode is None:
                log(logging.ERROR, "worker_killed", worker=index, pid=p.pid, reason="timeout")
                p.kill()
                p.join()
                status = 1
            elif p.exitcode in (0, -signal.SIGTERM, -signal.SIGINT):  # a signal: not yet serving
                log(logging.INFO, "worker_stopped", worker=index, pid=p.pid, exitcode=p.exitcode)
            else:
                log(logging.ERROR, "worker_exited", worker=index, pid=p.pid, exitcode=p.exitcode)
                status = 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for p in procs.values():  # only after an error in this loop: never leave orphans
            if p.exitcode is None:
                p.kill()
                p.join()
        for sock in socks:
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    log(logging.INFO, "server_stopped", workers=workers, status=status)
    return status


if __name__ == "__main__":
    sys.exit(main())

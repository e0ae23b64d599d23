"""`python -m serving --model-repository DIR`: the model server (and `dlmodels serve`).

    python -m serving --model-repository repo/                      serve on 127.0.0.1:8000
    python -m serving --model-repository repo/ --check              load, warm up, exit

`main(argv)` takes an argument list, so `dlmodels serve` calls it with its own arguments.
Exit status: 0 after a clean shutdown (SIGINT/SIGTERM: in-flight requests finish first) or a
passing --check, 1 when --check found a model that failed, 2 for a usage error (no repository,
no manifest in it, no manifest that loads, an invalid option).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
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
        "  dlmodels serve --model-repository repo/ --check\n",
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
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads per model")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
        threads=args.threads,
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
    app = create_app(str(args.model_repository), settings, options)
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
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=args.access_log,
        timeout_graceful_shutdown=args.graceful_timeout,
        timeout_keep_alive=args.keep_alive,
        server_header=False,
        loop="auto",  # uvloop when installed
        http=_http_protocol(),
    )
    # uvicorn drains in-flight requests on SIGTERM/SIGINT, restores the previous handlers and
    # re-raises the signal; no-op handlers make that re-raise harmless, so a graceful shutdown
    # exits with status 0 (what process managers expect) instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

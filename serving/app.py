"""The FastAPI application: TF Serving REST and KServe v2 (Open Inference Protocol) endpoints
over one `ModelRepository`, with metrics, a body-size limit, an optional bearer token,
readiness after warm-up, periodic hot reload and a graceful close.

The two inference paths (`POST .../infer`, `POST ...:predict`) are served by a pure ASGI
handler placed in front of FastAPI's router and middleware: for a small model those layers
(routing through every route, dependency solving, `Request` objects, exception middleware)
cost several times the inference itself. Everything else goes through FastAPI, and the
FastAPI routes of the two inference paths stay: they document the requests in OpenAPI
(/docs, /openapi.json) and call the same handler when the fast path does not apply (an
ASGI `root_path`). Bodies are read as bytes and parsed with orjson; the pydantic models
validate only the small envelope (their `data` fields are not traversed), and binary tensors
stay views over the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import re
import sys
import time
from typing import Any, Literal

import orjson
import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from serving import codec
from serving._common import (
    NUMPY_TO_TF,
    NUMPY_TO_V2,
    ServingError,
    check_name,
    log,
    parse_version,
    v1_shape,
)
from serving.metrics import SNAPSHOT_INTERVAL_S, UNKNOWN, Metrics
from serving.repository import ModelRepository, ServerSettings

SERVER_NAME = "dlmodels"
EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics_metrics"]

JSON = b"application/json"
OCTETS = b"application/octet-stream"
_HOT_HEADERS = frozenset(
    (b"content-length", b"content-encoding", b"inference-header-content-length")
)
# The inference routes as Starlette matches them (a parameter is [^/]+, ":predict" a literal
# suffix; the route with a version comes first), for the fast path.
_V2_INFER = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")
_V1_PREDICT_VERSION = re.compile(
    r"^/v1/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+):predict$"
)
_V1_PREDICT = re.compile(r"^/v1/models/(?P<name>[^/]+):predict$")


# -- request models (envelopes only; tensor data stays untyped for speed) ------------------


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class RequestInput(pydantic.BaseModel):
    name: str = pydantic.Field(min_length=1, max_length=256)
    shape: list[pydantic.NonNegativeInt] = pydantic.Field(max_length=codec.MAX_RANK)
    datatype: Literal[codec.V2_DATATYPES]  # type: ignore[valid-type]
    parameters: dict[str, Any] | None = None
    data: Any = None


class RequestOutput(pydantic.BaseModel):
    name: str = pydantic.Field(min_length=1, max_length=256)
    parameters: dict[str, Any] | None = None


class InferenceRequest(pydantic.BaseModel):
    """KServe v2 inference request (JSON, or the JSON header of a binary request)."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = pydantic.Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class PredictRequest(pydantic.BaseModel):
    """TF Serving predict request: `instances` (row format) or `inputs` (columnar)."""

    signature_name: str | None = None
    instances: Any = None
    inputs: Any = None


def _validate(model: type[pydantic.BaseModel], obj: Any):
    try:
        return model.model_validate(obj)
    except pydantic.ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(body)'}: {e['msg']}"
            for e in err.errors()[:5]
        )
        raise ServingError(400, f"invalid request: {problems}") from None


def _body_schema(model: type[pydantic.BaseModel], binary: bool = False) -> dict:
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    if binary:
        content["application/octet-stream"] = {
            "schema": {"type": "string", "format": "binary"},
        }
    return {"requestBody": {"required": True, "content": content}}


class ServerApp(FastAPI):
    """FastAPI with a pure ASGI `front` that sees every HTTP request first (set by
    `create_app`: the bearer token check and the inference fast path), so the hot path skips
    FastAPI's per-request layers (telemetry check, middleware, routing, dependencies)."""

    front = None

    async def __call__(self, scope, receive, send) -> None:
        if self.front is not None and scope["type"] == "http":
            await self.front(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


@dataclasses.dataclass
class AppOptions:
    """Server options beyond the per-model settings.

    Attributes:
        max_body_bytes: larger request bodies get 413.
        auth_token: when set, every endpoint but /v2/health/* and /metrics needs
            `Authorization: Bearer <token>`.
        poll_interval: seconds between repository scans for hot reload (0: never rescan).
        worker: this process's index in a server of several worker processes (`--workers`);
            None for a single-process server. A worker loads and warms up its models before
            it accepts connections (its siblings answer meanwhile), shares its metrics through
            `metrics_dir` (see `serving.metrics`) and names itself in the `X-Dlmodels-Worker`
            header of /metrics answers.
        metrics_dir: the directory the workers share their metrics snapshots in.
    """

    max_body_bytes: int = 64 << 20
    auth_token: str | None = None
    poll_interval: float = 2.0
    worker: int | None = None
    metrics_dir: str | None = None


def create_app(
    repository: str,
    settings: ServerSettings | None = None,
    options: AppOptions | None = None,
) -> ServerApp:
    """The server for the model repository at `repository` (see `serving.repository`)."""
    settings = settings or ServerSettings()
    options = options or AppOptions()
    metrics = Metrics(None if options.worker is None else options.metrics_dir, options.worker or 0)
    repo = ModelRepository(repository, settings, metrics)
    state = {"ready": False, "started": time.time()}

    async def first_scan():
        repo.loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(repo.poll)
        except Exception as err:  # a broken repository keeps the server up, not ready
            log(logging.ERROR, "repository_scan_failed", error=f"{type(err).__name__}: {err}")
        state["ready"] = any(e.versions for e in repo.models.values())
        log(
            logging.INFO,
            "server_ready" if state["ready"] else "server_not_ready",
            models={n: sorted(e.versions) for n, e in repo.models.items()},
            tensorflow_loaded="tensorflow" in sys.modules,
            keras_loaded="keras" in sys.modules,
        )

    async def poller(scanned: bool):
        if not scanned:
            await first_scan()
        while options.poll_interval > 0:
            await asyncio.sleep(options.poll_interval)
            try:
                await asyncio.to_thread(repo.poll)
            except Exception as err:
                log(logging.ERROR, "repository_scan_failed", error=f"{type(err).__name__}: {err}")
            state["ready"] = any(e.versions for e in repo.models.values())

    async def snapshots():
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)
            try:
                metrics.write_snapshot()
            except OSError as err:  # a full disk must not stop the worker
                log(logging.WARNING, "metrics_snapshot_failed", error=repr(err))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker = options.worker is not None
        if worker:  # a worker accepts connections only once warm: its siblings answer meanwhile
            await first_scan()
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(poller(scanned=worker))]
        if worker:
            tasks.append(loop.create_task(snapshots()))
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await repo.close()
        if worker:
            with contextlib.suppress(OSError):
                metrics.write_snapshot()  # the final numbers, after the drain
        log(logging.INFO, "server_stopped")

    app = ServerApp(
        title="dlmodels model server",
        description="TF Serving REST and KServe v2 (Open Inference Protocol) over onnxruntime.",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.repository = repo
    app.state.metrics = metrics
    app.state.ready = state
    app.state.options = options

    # -- helpers --------------------------------------------------------------------------

    async def read_body(receive, declared: bytes | None) -> bytes:
        """The request body from ASGI `receive`, refused early (413) when its declared or
        actual size exceeds the limit."""
        limit = options.max_body_bytes
        if declared is not None:
            if not declared.isdigit():
                raise ServingError(400, "Content-Length is not a number")
            if int(declared) > limit:
                raise ServingError(
                    413,
                    f"request body of {declared.decode()} bytes exceeds the limit of {limit} bytes",
                )
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            if chunk:
                total += len(chunk)
                if total > limit:
                    raise ServingError(413, f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if not body:
            raise ServingError(400, "the request body is empty")
        return body

    class Accounting:
        """One inference request's accounting, shared by both protocols: the in-flight
        counters while it runs; then its status code, latency and (when it succeeded) the
        time of each stage (read, decode, encode) go to the metrics. Handlers set `label`
        (the model label), `code` and the stage marks `t_read`, `t_dec`, `t_inf`."""

        __slots__ = ("code", "label", "protocol", "start", "t_dec", "t_inf", "t_read")

        def __init__(self, protocol: str):
            self.protocol = protocol
            self.label = UNKNOWN
            self.code = 500

        async def __aenter__(self):
            self.start = time.perf_counter()
            metrics.inflight.inc()
            repo.activity.inflight += 1
            return self

        async def __aexit__(self, *exc) -> None:
            repo.activity.inflight -= 1
            metrics.inflight.dec()
            end = time.perf_counter()
            label, protocol, code = self.label, self.protocol, self.code
            metrics.requests.labels(label, protocol, str(code)).inc()
            if code >= 400:
                metrics.errors.labels(label, protocol, str(code)).inc()
            else:
                metrics.stage.labels(label, "read").observe(self.t_read - self.start)
                metrics.stage.labels(label, "decode").observe(self.t_dec - self.t_read)
                metrics.stage.labels(label, "encode").observe(end - self.t_inf)
            metrics.latency.labels(label, protocol).observe(end - self.start)

    def error_response(err: ServingError) -> Response:
        return Response(
            orjson.dumps({"error": err.message}),
            status_code=err.status,
            media_type="application/json",
        )

    def model_label(name: str) -> str:
        return name if name in repo.models else UNKNOWN

    # -- exception handlers: every error is {"error": "..."} JSON ------------------------

    @app.exception_handler(ServingError)
    async def _serving_error(request, err: ServingError):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err: StarletteHTTPException):
        msg = err.detail if isinstance(err.detail, str) else str(err.detail)
        if err.status_code == 404:
            msg = f"no endpoint {request.method} {request.url.path}"
        return JSONResponse({"error": msg}, status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, err: RequestValidationError):
        return JSONResponse({"error": f"invalid request: {err.errors()[:3]}"}, status_code=400)

    @app.exception_handler(Exception)
    async def _internal(request, err: Exception):
        log(logging.ERROR, "internal_error", path=request.url.path, error=repr(err))
        return JSONResponse({"error": f"internal error: {type(err).__name__}"}, status_code=500)

    # -- the front (pure ASGI, before FastAPI): bearer token, then the inference fast path --

    token = f"Bearer {options.auth_token}".encode() if options.auth_token else None

    async def front(scope, receive, send):
        if token is not None and not (
            scope["path"].startswith("/v2/health") or scope["path"] == "/metrics"
        ):
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, token):
                body = b'{"error":"missing or wrong bearer token"}'
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"www-authenticate", b"Bearer"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        if not await fast_path(scope, receive, send):
            await FastAPI.__call__(app, scope, receive, send)

    app.front = front

    # -- health and metrics --------------------------------------------------------------

    @app.get("/v2/health/live", tags=["kserve v2"])
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready", tags=["kserve v2"])
    async def ready():
        return Response(status_code=200 if state["ready"] else 503)

    worker_header = {} if options.worker is None else {"X-Dlmodels-Worker": str(options.worker)}

    @app.get("/metrics", tags=["operations"])
    async def metrics_endpoint():
        return Response(metrics.render(), media_type=metrics.content_type, headers=worker_header)

    @app.get("/v2", tags=["kserve v2"])
    async def server_metadata():
        return {"name": SERVER_NAME, "version": _version(), "extensions": EXTENSIONS}

    # -- KServe v2 model endpoints -------------------------------------------------------

    def v2_metadata(name: str, version: str | None):
        check_name(name)
        served = repo.get(name, parse_version(version))
        entry = repo.entry(name)
        return {
            "name": name,
            "versions": [str(v) for v in sorted(entry.versions)],
            "platform": "onnxruntime_onnx",
            "inputs": [
                {
                    "name": s.name,
                    "datatype": NUMPY_TO_V2.get(s.dtype, s.dtype),
                    "shape": v1_shape(s.shape),
                }
                for s in served.inputs
            ],
            "outputs": [
                {
                    "name": s.name,
                    "datatype": NUMPY_TO_V2.get(s.dtype, s.dtype),
                    "shape": v1_shape(s.shape),
                }
                for s in served.outputs
            ],
        }

    @app.get("/v2/models/{name}", tags=["kserve v2"])
    async def v2_model(name: str):
        return v2_metadata(name, None)

    @app.get("/v2/models/{name}/versions/{version}", tags=["kserve v2"])
    async def v2_model_version(name: str, version: str):
        return v2_metadata(name, version)

    def v2_ready(name: str, version: str | None):
        check_name(name)
        repo.get(name, parse_version(version))
        return Response(status_code=200)

    @app.get("/v2/models/{name}/ready", tags=["kserve v2"])
    async def v2_model_ready(name: str):
        return v2_ready(name, None)

    @app.get("/v2/models/{name}/versions/{version}/ready", tags=["kserve v2"])
    async def v2_model_version_ready(name: str, version: str):
        return v2_ready(name, version)

    def v2_config(name: str, version: str | None):
        check_name(name)
        served = repo.get(name, parse_version(version))
        entry = repo.entry(name)
        cfg = {
            "name": name,
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "max_batch_size": served.max_batch_size,
            "input": [
                {
                    "name": s.name,
                    "data_type": "TYPE_" + NUMPY_TO_V2.get(s.dtype, s.dtype),
                    "dims": v1_shape(s.shape[1:] if served.batchable else s.shape),
                }
                for s in served.inputs
            ],
            "output": [
                {
                    "name": s.name,
                    "data_type": "TYPE_" + NUMPY_TO_V2.get(s.dtype, s.dtype),
                    "dims": v1_shape(s.shape[1:] if served.batchable else s.shape),
                }
                for s in served.outputs
            ],
            "version_policy": entry.config["version_policy"],
            "parameters": {"format": entry.config["format"]},
        }
        if served.dynamic_batching:
            cfg["dynamic_batching"] = {
                "max_queue_delay_microseconds": int(served.max_queue_delay_ms * 1000)
            }
        return cfg

    @app.get("/v2/models/{name}/config", tags=["kserve v2"])
    async def v2_model_config(name: str):
        return v2_config(name, None)

    @app.get("/v2/models/{name}/versions/{version}/config", tags=["kserve v2"])
    async def v2_model_version_config(name: str, version: str):
        return v2_config(name, version)

    async def v2_work(acct: Accounting, served, body: bytes, head: dict):
        header_len = head.get(b"inference-header-content-length")
        if header_len is not None:
            if not header_len.isdigit() or int(header_len) > len(body):
                raise ServingError(
                    400,
                    f"Inference-Header-Content-Length {header_len.decode('latin-1')!r} is not "
                    f"a length within the {len(body)}-byte body",
                )
            header_len = int(header_len)
            obj = codec.loads(memoryview(body)[:header_len])
        else:
            obj = codec.loads(body)
        req = _validate(InferenceRequest, obj)
        feeds = codec.decode_v2(served, req, body, header_len)
        acct.t_dec = time.perf_counter()
        outputs = await served.infer(feeds)
        acct.t_inf = time.perf_counter()
        payload, hlen = codec.encode_v2(served, req, outputs, served.version)
        if hlen is None:
            return payload, JSON, ()
        return payload, OCTETS, ((b"inference-header-content-length", str(hlen).encode()),)

    @app.post(
        "/v2/models/{name}/infer",
        tags=["kserve v2"],
        openapi_extra=_body_schema(InferenceRequest, binary=True),
    )
    async def v2_model_infer(request: Request, name: str):
        return await routed(request, "v2", name, None)

    @app.post(
        "/v2/models/{name}/versions/{version}/infer",
        tags=["kserve v2"],
        openapi_extra=_body_schema(InferenceRequest, binary=True),
    )
    async def v2_model_version_infer(request: Request, name: str, version: str):
        return await routed(request, "v2", name, version)

    @app.post("/v2/repository/index", tags=["kserve v2"])
    async def repository_index():
        rows = []
        for name, entry in sorted(repo.models.items()):
            for ver in sorted(entry.versions):
                rows.append({"name": name, "version": str(ver), "state": "READY"})
        for (name, ver), (_, reason) in sorted(repo.failed.items()):
            if ver:
                rows.append(
                    {"name": name, "version": str(ver), "state": "UNAVAILABLE", "reason": reason}
                )
        return rows

    # -- TF Serving REST -----------------------------------------------------------------

    def v1_status(name: str, version: str | None):
        check_name(name)
        v = parse_version(version)
        entry = repo.entry(name)
        versions = [v] if v is not None else sorted(entry.versions, reverse=True)
        repo.get(name, v)
        return {
            "model_version_status": [
                {
                    "version": str(x),
                    "state": "AVAILABLE",
                    "status": {"error_code": "OK", "error_message": ""},
                }
                for x in versions
            ]
        }

    def v1_metadata(name: str, version: str | None):
        check_name(name)
        served = repo.get(name, parse_version(version))

        def sig(specs):
            return {
                s.name: {
                    "dtype": NUMPY_TO_TF.get(s.dtype, "DT_INVALID"),
                    "tensor_shape": {
                        "dim": [{"size": str(d), "name": ""} for d in v1_shape(s.shape)],
                        "unknown_rank": False,
                    },
                    "name": s.name,
                }
                for s in specs
            }

        return {
            "model_spec": {"name": name, "signature_name": "", "version": str(served.version)},
            "metadata": {
                "signature_def": {
                    "signature_def": {
                        "serving_default": {
                            "inputs": sig(served.inputs),
                            "outputs": sig(served.outputs),
                            "method_name": "tensorflow/serving/predict",
                        }
                    }
                }
            },
        }

    async def v1_work(acct: Accounting, served, body: bytes, head: dict):
        req = _validate(PredictRequest, codec.loads(body))
        feeds, fmt = codec.decode_tfserving(served, req)
        acct.t_dec = time.perf_counter()
        outputs = await served.infer(feeds)
        acct.t_inf = time.perf_counter()
        return codec.encode_tfserving(outputs, fmt), JSON, ()

    work = {"v1": v1_work, "v2": v2_work}

    async def infer(protocol: str, name: str, version: str | None, headers, receive):
        """One inference request of either protocol, from its raw ASGI headers and `receive`:
        (status, body, content type, extra headers). Every error is a JSON answer."""
        async with Accounting(protocol) as acct:
            try:
                check_name(name)
                v = parse_version(version)
                acct.label = model_label(name)
                head = {}
                for key, value in headers:  # the first of each, as Starlette's Headers.get
                    if key in _HOT_HEADERS and key not in head:
                        head[key] = value
                body = await read_body(receive, head.get(b"content-length"))
                acct.t_read = time.perf_counter()
                served = repo.get(name, v)
                if head.get(b"content-encoding", b"identity") != b"identity":
                    raise ServingError(400, "compressed request bodies are not supported")
                payload, media, extra = await work[protocol](acct, served, body, head)
                acct.code = 200
                return 200, payload, media, extra
            except ServingError as err:
                acct.code = err.status
                return err.status, orjson.dumps({"error": err.message}), JSON, ()
            except ClientDisconnect:
                acct.code = 499  # the client went away: nobody to answer
                raise
            except Exception as err:
                log(logging.ERROR, "internal_error", protocol=protocol, model=name, error=repr(err))
                body = orjson.dumps({"error": f"internal error: {type(err).__name__}"})
                return 500, body, JSON, ()

    async def routed(request: Request, protocol: str, name: str, version: str | None):
        """The FastAPI route's way into `infer` (only when the fast path does not apply)."""
        status, payload, media, extra = await infer(
            protocol, name, version, request.scope["headers"], request.receive
        )
        headers = {k.decode(): v.decode() for k, v in extra}
        return Response(payload, status_code=status, media_type=media.decode(), headers=headers)

    async def fast_path(scope, receive, send) -> bool:
        """Answer an inference request straight from ASGI (an HTTP `scope`); False when it is
        not one."""
        if scope["method"] != "POST" or scope.get("root_path"):
            return False
        path = scope["path"]
        if path.startswith("/v2/models/"):
            m = _V2_INFER.match(path)
            protocol = "v2"
        elif path.startswith("/v1/models/"):
            m = _V1_PREDICT_VERSION.match(path) or _V1_PREDICT.match(path)
            protocol = "v1"
        else:
            return False
        if m is None:
            return False
        try:
            status, payload, media, extra = await infer(
                protocol, m["name"], m.groupdict().get("version"), scope["headers"], receive
            )
        except ClientDisconnect:
            return True
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", media),
                    (b"content-length", str(len(payload)).encode()),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
        return True

    # Routes with a ":predict" suffix come first: "{name}" alone would also match "m:predict".
    @app.post(
        "/v1/models/{name}/versions/{version}:predict",
        tags=["tf serving"],
        openapi_extra=_body_schema(PredictRequest),
    )
    async def v1_version_predict(request: Request, name: str, version: str):
        return await routed(request, "v1", name, version)

    @app.post(
        "/v1/models/{name}:predict",
        tags=["tf serving"],
        openapi_extra=_body_schema(PredictRequest),
    )
    async def v1_model_predict(request: Request, name: str):
        return await routed(request, "v1", name, None)

    @app.get("/v1/models/{name}/versions/{version}/metadata", tags=["tf serving"])
    async def v1_version_metadata(name: str, version: str):
        return v1_metadata(name, version)

    @app.get("/v1/models/{name}/metadata", tags=["tf serving"])
    async def v1_model_metadata(name: str):
        return v1_metadata(name, None)

    @app.get("/v1/models/{name}/versions/{version}", tags=["tf serving"])
    async def v1_version_status(name: str, version: str):
        return v1_status(name, version)

    @app.get("/v1/models/{name}", tags=["tf serving"])
    async def v1_model_status(name: str):
        return v1_status(name, None)

    # -- OpenAPI: publish the request models ---------------------------------------------

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (InferenceRequest, PredictRequest):
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            comps.update(js.pop("$defs", {}))
            comps[model.__name__] = js
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
    return app


# -- a worker process of a multi-worker server (`python -m serving --workers N`) ----------


@dataclasses.dataclass
class WorkerPlan:
    """What a worker process needs to build its server (pickled to it by `spawn`).

    Attributes:
        repository: the model repository directory.
        settings: the per-model settings (its `threads` already split among the workers).
        options: the app options; the supervisor sets `metrics_dir`, `run_worker` the index.
        server_options: `uvicorn.Config` keyword arguments.
        log_level: the JSON logger's level.
    """

    repository: str
    settings: ServerSettings
    options: AppOptions
    server_options: dict
    log_level: str


SUPERVISOR_POLL_S = 1.0
"""How often a worker checks that its supervisor is still alive."""


def _stop_now(*_) -> None:
    raise SystemExit(0)


def run_worker(plan: WorkerPlan, index: int, sock) -> None:
    """One worker process (the target `serving.__main__` starts): the app over its own copy of
    the repository, served on the listening socket `sock` the supervisor bound."""
    import os
    import signal
    import threading

    import uvicorn

    from serving._common import LOG_FIELDS, setup_logging

    # A signal before uvicorn takes over, or the one uvicorn re-raises after its graceful
    # shutdown: exit 0 at once. While serving, uvicorn's handlers drain in-flight requests.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_now)
    LOG_FIELDS.update(worker=index, pid=os.getpid())
    setup_logging(plan.log_level)
    supervisor = os.getppid()

    def watch_supervisor():
        """The supervisor killed with SIGKILL (or OOM-killed) cannot stop its workers: without
        this they would keep serving the port, unsupervised, forever. Drain and exit."""
        while os.getppid() == supervisor:
            time.sleep(SUPERVISOR_POLL_S)
        log(logging.ERROR, "supervisor_gone", supervisor_pid=supervisor)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch_supervisor, name="supervisor-watch", daemon=True).start()
    app = create_app(
        plan.repository, plan.settings, dataclasses.replace(plan.options, worker=index)
    )
    uvicorn.Server(uvicorn.Config(app, **plan.server_options)).run(sockets=[sock])


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("dlmodels")
    except Exception:
        return "0"

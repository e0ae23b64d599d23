"""The FastAPI application: TF Serving REST and KServe v2 (Open Inference Protocol) endpoints
over one `ModelRepository`, with metrics, a body-size limit, an optional bearer token,
readiness after warm-up, periodic hot reload and a graceful close.

The request path is deliberately lean: bodies are read as bytes and parsed with orjson; the
pydantic models validate only the small envelope (their `data` fields are not traversed), and
binary tensors stay views over the body. The pydantic models still describe every request in
the OpenAPI document (/docs, /openapi.json).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import sys
import time
from typing import Any, Literal

import orjson
import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

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
from serving.metrics import UNKNOWN, Metrics
from serving.repository import ModelRepository, ServerSettings

SERVER_NAME = "dlmodels"
EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics_metrics"]


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


@dataclasses.dataclass
class AppOptions:
    """Server options beyond the per-model settings.

    Attributes:
        max_body_bytes: larger request bodies get 413.
        auth_token: when set, every endpoint but /v2/health/* and /metrics needs
            `Authorization: Bearer <token>`.
        poll_interval: seconds between repository scans for hot reload (0: never rescan).
    """

    max_body_bytes: int = 64 << 20
    auth_token: str | None = None
    poll_interval: float = 2.0


def create_app(
    repository: str,
    settings: ServerSettings | None = None,
    options: AppOptions | None = None,
) -> FastAPI:
    """The server for the model repository at `repository` (see `serving.repository`)."""
    settings = settings or ServerSettings()
    options = options or AppOptions()
    metrics = Metrics()
    repo = ModelRepository(repository, settings, metrics)
    state = {"ready": False, "started": time.time()}

    async def poller():
        loop = asyncio.get_running_loop()
        repo.loop = loop
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
        while options.poll_interval > 0:
            await asyncio.sleep(options.poll_interval)
            try:
                await asyncio.to_thread(repo.poll)
            except Exception as err:
                log(logging.ERROR, "repository_scan_failed", error=f"{type(err).__name__}: {err}")
            state["ready"] = any(e.versions for e in repo.models.values())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.get_running_loop().create_task(poller())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await repo.close()
        log(logging.INFO, "server_stopped")

    app = FastAPI(
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

    async def read_body(request: Request) -> bytes:
        limit = options.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ServingError(400, "Content-Length is not a number")
            if int(declared) > limit:
                raise ServingError(
                    413, f"request body of {declared} bytes exceeds the limit of {limit} bytes"
                )
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ServingError(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if not body:
            raise ServingError(400, "the request body is empty")
        return body

    children: dict = {}

    def child(metric, *labels):
        """A metric's child for these labels, looked up once (labels() takes a lock)."""
        key = (metric, labels)
        found = children.get(key)
        if found is None:
            found = children[key] = metric.labels(*labels)
        return found

    def finish(model: str, protocol: str, start: float, code: int) -> None:
        child(metrics.requests, model, protocol, str(code)).inc()
        if code >= 400:
            child(metrics.errors, model, protocol, str(code)).inc()
        child(metrics.latency, model, protocol).observe(time.perf_counter() - start)

    def stages(label: str, start: float, t_read: float, t_dec: float, t_inf: float) -> None:
        child(metrics.stage, label, "read").observe(t_read - start)
        child(metrics.stage, label, "decode").observe(t_dec - t_read)
        child(metrics.stage, label, "encode").observe(time.perf_counter() - t_inf)

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

    # -- auth (pure ASGI, cheap) ----------------------------------------------------------

    if options.auth_token:
        token = f"Bearer {options.auth_token}".encode()
        inner = app.build_middleware_stack

        def build():
            asgi = inner()

            async def guarded(scope, receive, send):
                if scope["type"] == "http" and not (
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
                await asgi(scope, receive, send)

            return guarded

        app.build_middleware_stack = build

    # -- health and metrics --------------------------------------------------------------

    @app.get("/v2/health/live", tags=["kserve v2"])
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready", tags=["kserve v2"])
    async def ready():
        return Response(status_code=200 if state["ready"] else 503)

    @app.get("/metrics", tags=["operations"])
    async def metrics_endpoint():
        return Response(metrics.render(), media_type=metrics.content_type)

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

    async def v2_infer(request: Request, name: str, version: str | None) -> Response:
        start = time.perf_counter()
        label, code = UNKNOWN, 500
        metrics.inflight.inc()
        repo.activity.inflight += 1
        try:
            check_name(name)
            v = parse_version(version)
            label = model_label(name)
            body = await read_body(request)
            t_read = time.perf_counter()
            if request.headers.get("content-encoding", "identity") != "identity":
                raise ServingError(400, "compressed request bodies are not supported")
            header_len = request.headers.get("inference-header-content-length")
            if header_len is not None:
                if not header_len.isdigit() or int(header_len) > len(body):
                    raise ServingError(
                        400,
                        f"Inference-Header-Content-Length {header_len!r} is not a length "
                        f"within the {len(body)}-byte body",
                    )
                header_len = int(header_len)
                obj = codec.loads(memoryview(body)[:header_len])
            else:
                obj = codec.loads(body)
            req = _validate(InferenceRequest, obj)
            served = repo.get(name, v)
            feeds = codec.decode_v2(served, req, body, header_len)
            t_dec = time.perf_counter()
            outputs = await served.infer(feeds)
            t_inf = time.perf_counter()
            payload, hlen = codec.encode_v2(served, req, outputs, served.version)
            stages(label, start, t_read, t_dec, t_inf)
            code = 200
            if hlen is None:
                return Response(payload, media_type="application/json")
            return Response(
                payload,
                media_type="application/octet-stream",
                headers={"Inference-Header-Content-Length": str(hlen)},
            )
        except ServingError as err:
            code = err.status
            return error_response(err)
        finally:
            repo.activity.inflight -= 1
            metrics.inflight.dec()
            finish(label, "v2", start, code)

    @app.post(
        "/v2/models/{name}/infer",
        tags=["kserve v2"],
        openapi_extra=_body_schema(InferenceRequest, binary=True),
    )
    async def v2_model_infer(request: Request, name: str):
        return await v2_infer(request, name, None)

    @app.post(
        "/v2/models/{name}/versions/{version}/infer",
        tags=["kserve v2"],
        openapi_extra=_body_schema(InferenceRequest, binary=True),
    )
    async def v2_model_version_infer(request: Request, name: str, version: str):
        return await v2_infer(request, name, version)

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

    async def v1_predict(request: Request, name: str, version: str | None) -> Response:
        start = time.perf_counter()
        label, code = UNKNOWN, 500
        metrics.inflight.inc()
        repo.activity.inflight += 1
        try:
            check_name(name)
            v = parse_version(version)
            label = model_label(name)
            body = await read_body(request)
            t_read = time.perf_counter()
            req = _validate(PredictRequest, codec.loads(body))
            served = repo.get(name, v)
            feeds, fmt = codec.decode_tfserving(served, req)
            t_dec = time.perf_counter()
            outputs = await served.infer(feeds)
            t_inf = time.perf_counter()
            payload = codec.encode_tfserving(outputs, fmt)
            stages(label, start, t_read, t_dec, t_inf)
            code = 200
            return Response(payload, media_type="application/json")
        except ServingError as err:
            code = err.status
            return error_response(err)
        finally:
            repo.activity.inflight -= 1
            metrics.inflight.dec()
            finish(label, "v1", start, code)

    # Routes with a ":predict" suffix come first: "{name}" alone would also match "m:predict".
    @app.post(
        "/v1/models/{name}/versions/{version}:predict",
        tags=["tf serving"],
        openapi_extra=_body_schema(PredictRequest),
    )
    async def v1_version_predict(request: Request, name: str, version: str):
        return await v1_predict(request, name, version)

    @app.post(
        "/v1/models/{name}:predict",
        tags=["tf serving"],
        openapi_extra=_body_schema(PredictRequest),
    )
    async def v1_model_predict(request: Request, name: str):
        return await v1_predict(request, name, None)

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


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("dlmodels")
    except Exception:
        return "0"

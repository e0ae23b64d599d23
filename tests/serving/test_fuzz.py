"""Fuzzing: >= 1,000 malformed requests (bad JSON, wrong names, shapes, dtypes, huge dims,
NaN, empty and oversized bodies, bad base64, bad binary framing, hostile model names) each get
a 4xx with a JSON error, never a 5xx, and the server is healthy afterwards.

The volume runs in-process (httpx's ASGI transport over the same FastAPI app the server runs);
a smaller sample goes to the real uvicorn subprocess."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.parse

import httpx
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.app import AppOptions, create_app
from serving.repository import ServerSettings

LIMIT = 200_000
FUZZ = settings(
    max_examples=210,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
SENT = {"n": 0}

MODELS = ["unet", "cgan_generator"]
GOOD_IMAGE = np.zeros((1, 32, 32, 3), "float32")


@pytest.fixture(scope="module")
def app_client(repo):
    """(send(method, path, body, headers) -> Response, app) with the app's lifespan running."""
    app = create_app(
        str(repo[0]),
        ServerSettings(threads=1, max_queue_delay_ms=0.5),
        AppOptions(max_body_bytes=LIMIT, poll_interval=0),
    )
    loop = asyncio.new_event_loop()
    lifespan = app.router.lifespan_context(app)
    loop.run_until_complete(lifespan.__aenter__())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fuzz")

    async def wait_ready():
        for _ in range(600):
            if (await client.get("/v2/health/ready")).status_code == 200:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("app never became ready")

    loop.run_until_complete(wait_ready())

    def send(method, path, body=None, headers=None):
        SENT["n"] += 1
        return loop.run_until_complete(
            client.request(method, path, content=body, headers=headers or {})
        )

    yield send, app
    loop.run_until_complete(client.aclose())
    loop.run_until_complete(lifespan.__aexit__(None, None, None))
    loop.close()


def assert_4xx(r):
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    body = r.json()
    assert isinstance(body, dict) and isinstance(body["error"], str) and body["error"], body


# -- strategies ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
names = st.sampled_from(MODELS)
infer_paths = names.map(lambda n: f"/v2/models/{n}/infer")
predict_paths = names.map(lambda n: f"/v1/models/{n}:predict")
datatypes = st.sampled_from(["FP32", "FP64", "INT32", "INT64", "BOOL", "BYTES", "fp32", "", "X"])
dims = st.integers(min_value=0, max_value=1 << 40)


def v2_body(inputs):
    return json.dumps({"inputs": inputs}).encode()


@st.composite
def bad_v2_requests(draw):
    """A request for `unet` that breaks exactly one rule."""
    kind = draw(
        st.sampled_from(
            [
                "name",
                "shape",
                "dtype",
                "count",
                "huge",
                "data",
                "nan",
                "missing",
                "extra",
                "envelope",
                "rank",
            ]
        )
    )
    good = {"name": "image", "shape": [1, 32, 32, 3], "datatype": "FP32", "data": [0.0] * 3072}
    if kind == "name":
        good["name"] = draw(st.text(min_size=1, max_size=20).filter(lambda s: s != "image"))
    elif kind == "shape":
        shape = draw(st.lists(st.integers(0, 40), min_size=4, max_size=4))
        if shape[1:] == [32, 32, 3] and shape[0] == 1:
            shape[1] = 31
        good["shape"] = shape
        good["data"] = [0.0] * int(np.prod(shape))
        if shape[1:] == [32, 32, 3]:  # batch != 1 but a fine shape: break the count instead
            good["data"] = good["data"][:-1] if good["data"] else [1.0]
    elif kind == "dtype":
        good["datatype"] = draw(datatypes.filter(lambda d: d != "FP32"))
    elif kind == "count":
        n = draw(st.integers(0, 3071) | st.integers(3073, 5000))
        good["data"] = [0.0] * n
    elif kind == "huge":
        good["shape"] = [draw(dims.filter(lambda d: d > 64)), 32, 32, 3]
    elif kind == "data":
        good["data"] = draw(
            json_values.filter(
                lambda v: not isinstance(v, list) or not v or isinstance(v[0], str | dict | None)
            )
        )
    elif kind == "nan":
        body = json.dumps({"inputs": [{**good, "data": [float("nan")] * 3072}]}).encode()
        return body  # json.dumps writes the NaN literal: not JSON
    elif kind == "missing":
        del good[draw(st.sampled_from(["name", "shape", "datatype"]))]
    elif kind == "extra":
        return v2_body([good, good])  # the same input twice
    elif kind == "envelope":
        return json.dumps(
            draw(json_values.filter(lambda v: not isinstance(v, dict) or "inputs" not in v))
        ).encode()
    elif kind == "rank":
        good["shape"] = draw(st.lists(st.integers(1, 2), min_size=17, max_size=20))
    return v2_body([good])


@st.composite
def bad_binary_requests(draw):
    """Binary tensor framing that lies: sizes, header lengths, trailing bytes."""
    x = GOOD_IMAGE.tobytes()
    kind = draw(st.sampled_from(["size", "short", "trailing", "header", "noheader", "both"]))
    size = len(x)
    body_x = x
    hlen_delta = 0
    entry = {"name": "image", "shape": [1, 32, 32, 3], "datatype": "FP32"}
    if kind == "size":
        size = draw(st.integers(0, 2 * len(x)).filter(lambda s: s != len(x)))
    elif kind == "short":
        body_x = x[: draw(st.integers(0, len(x) - 1))]
    elif kind == "trailing":
        body_x = x + draw(st.binary(min_size=1, max_size=64))
    elif kind == "both":
        entry["data"] = [0.0]
    entry["parameters"] = {"binary_data_size": size}
    header = orjson.dumps({"inputs": [entry]})
    hlen = str(len(header))
    if kind == "header":
        hlen = draw(st.sampled_from(["-1", "abc", str(len(header) + len(body_x) + 1), "1"]))
        hlen_delta = 1
    headers = {} if kind == "noheader" else {"Inference-Header-Content-Length": hlen}
    del hlen_delta
    return header + body_x, headers


@st.composite
def bad_tfserving_requests(draw):
    kind = draw(
        st.sampled_from(
            [
                "both",
                "neither",
                "shape",
                "b64",
                "b64size",
                "names",
                "strings",
                "signature",
                "ragged",
                "empty",
            ]
        )
    )
    row = np.zeros((32, 32, 3)).tolist()
    if kind == "both":
        return {"instances": [row], "inputs": [row]}
    if kind == "neither":
        return {"signature_name": "serving_default"}
    if kind == "shape":
        n = draw(st.integers(1, 40).filter(lambda n: n != 32))
        return {"instances": np.zeros((1, n, 32, 3)).tolist()}
    if kind == "b64":
        junk = draw(st.text(min_size=1, max_size=30).filter(lambda s: not _is_b64(s)))
        return {"instances": [{"b64": junk}]}
    if kind == "b64size":
        raw = draw(st.binary(min_size=0, max_size=64))
        return {"instances": [{"b64": base64.b64encode(raw).decode()}]}
    if kind == "names":
        return {"instances": [{draw(st.text(max_size=10).filter(lambda s: s != "image")): row}]}
    if kind == "strings":
        return {"inputs": [[draw(st.text(max_size=5))] * 3]}
    if kind == "signature":
        return {
            "signature_name": draw(
                st.text(min_size=1, max_size=10).filter(lambda s: s != "serving_default")
            ),
            "instances": [row],
        }
    if kind == "ragged":
        return {"instances": [row, [[0.0]]]}
    return {"instances": []}


def _is_b64(s):
    try:
        base64.b64decode(s, validate=True)
        return True
    except Exception:
        return False


# -- in-process volume ----------------------------------------------------------------------


@FUZZ
@given(path=st.one_of(infer_paths, predict_paths), body=st.binary(max_size=300))
def test_garbage_bodies(app_client, path, body):
    send, _ = app_client
    if body.strip().startswith((b"{", b"[")) and _valid_json(body):
        body = b"{" + body  # make sure it is not JSON
    assert_4xx(send("POST", path, body))


def _valid_json(b):
    try:
        orjson.loads(b)
        return True
    except orjson.JSONDecodeError:
        return False


@FUZZ
@given(body=bad_v2_requests())
def test_malformed_v2_json(app_client, body):
    send, _ = app_client
    assert_4xx(send("POST", "/v2/models/unet/infer", body))


@FUZZ
@given(req=bad_binary_requests())
def test_malformed_binary_tensors(app_client, req):
    send, _ = app_client
    body, headers = req
    assert_4xx(send("POST", "/v2/models/unet/infer", body, headers))


@FUZZ
@given(req=bad_tfserving_requests())
def test_malformed_tf_serving(app_client, req):
    send, _ = app_client
    assert_4xx(send("POST", "/v1/models/unet:predict", orjson.dumps(req)))


@FUZZ
@given(
    name=st.text(min_size=1, max_size=40).filter(lambda s: s not in ("unet", "cgan_generator")),
    version=st.one_of(st.none(), st.text(max_size=6), st.integers(2, 10**20).map(str)),
    verb=st.sampled_from(["infer", "predict", "meta", "ready", "status"]),
)
def test_hostile_names_and_versions(app_client, name, version, verb):
    send, _ = app_client
    quoted = urllib.parse.quote(name, safe="")
    version = urllib.parse.quote(version, safe="") if version is not None else None
    if verb == "infer":
        v = f"/versions/{version}" if version is not None else ""
        path = f"/v2/models/{quoted}{v}/infer"
    elif verb == "predict":
        v = f"/versions/{version}" if version is not None else ""
        path = f"/v1/models/{quoted}{v}:predict"
    elif verb == "meta":
        path = f"/v2/models/{quoted}"
    elif verb == "ready":
        path = f"/v2/models/{quoted}/ready"
    else:
        path = f"/v1/models/{quoted}/metadata"
    method = "POST" if verb in ("infer", "predict") else "GET"
    body = v2_body([{"name": "image", "shape": [1], "datatype": "FP32", "data": [0.0]}])
    r = send(method, path, body if method == "POST" else None)
    assert_4xx(r)


def test_empty_and_oversized_bodies(app_client):
    send, _ = app_client
    for path in ("/v2/models/unet/infer", "/v1/models/unet:predict"):
        assert_4xx(send("POST", path, b""))
        big = send("POST", path, b" " * (LIMIT + 1))
        assert big.status_code == 413 and "exceeds the limit" in big.json()["error"]


def test_healthy_after_fuzzing(app_client):
    send, _ = app_client
    assert SENT["n"] >= 1000, SENT
    assert send("GET", "/v2/health/ready").status_code == 200
    body = v2_body(
        [{"name": "image", "shape": [1, 32, 32, 3], "datatype": "FP32", "data": [0.5] * 3072}]
    )
    r = send("POST", "/v2/models/unet/infer", body)
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, 32, 32, 3]
    metrics = send("GET", "/metrics").text
    codes = [
        line
        for line in metrics.splitlines()
        if line.startswith("dlmodels_requests_total") and 'code="5' in line
    ]
    assert codes == []
    answered = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("dlmodels_request_errors_total")
    )
    assert answered >= 900  # the fuzzed inference requests, all counted as 4xx


# -- a sample against the real server ------------------------------------------------------


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(body=bad_v2_requests(), tf=bad_tfserving_requests(), binary=bad_binary_requests())
def test_real_server_sample(server, body, tf, binary):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert_4xx(c.post("/v2/models/unet/infer", content=body))
        assert_4xx(c.post("/v1/models/unet:predict", content=orjson.dumps(tf)))
        assert_4xx(c.post("/v2/models/unet/infer", content=binary[0], headers=binary[1]))
        assert c.get("/v2/health/ready").status_code == 200

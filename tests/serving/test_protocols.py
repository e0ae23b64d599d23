"""The real server (uvicorn in a subprocess) answers both protocols with exactly what
onnxruntime computes in-process on the same exported file, for every zoo model, and the
subprocess never imports TensorFlow or Keras."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as th

from serving.client import Client, ServerError

MODELS = ("unet", "classifier", "gru", "vae_decoder", "cgan_generator", "two_heads")
V2_TYPES = {"float32": "FP32", "int32": "INT32", "int64": "INT64"}


def direct(repo_dir, name, feeds):
    """The reference: onnxruntime in this process, default session options."""
    sess = ort.InferenceSession(str(repo_dir / name / "model.onnx"))
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def test_server_process_has_no_tensorflow(server):
    start = next(e for e in server.events() if e.get("event") == "server_start")
    ready = next(e for e in server.events() if e.get("event") == "server_ready")
    for event in (start, ready):
        assert event["tensorflow_loaded"] is False and event["keras_loaded"] is False
    assert start["host"] == "127.0.0.1"  # the default bind address
    assert sorted(ready["models"]) == sorted(MODELS)
    loaded = [e for e in server.events() if e.get("event") == "model_loaded"]
    assert len(loaded) == len(MODELS) and not any(e["inline"] for e in loaded)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("name", MODELS)
def test_tritonclient_matches_onnxruntime(server, repo, name, binary):
    repo_dir, samples = repo
    feeds = samples[name]
    client = th.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(name)
        meta = client.get_model_metadata(name)
        assert [i["name"] for i in meta["inputs"]] == list(feeds)
        inputs = []
        for n, x in feeds.items():
            inp = th.InferInput(n, list(x.shape), V2_TYPES[x.dtype.name])
            inp.set_data_from_numpy(x, binary_data=binary)
            inputs.append(inp)
        expected = direct(repo_dir, name, feeds)
        outputs = [th.InferRequestedOutput(n, binary_data=binary) for n in expected]
        # tritonclient's defaults: binary inputs, no outputs listed (binary_data_output).
        result = client.infer(name, inputs, outputs=None if binary else outputs)
        for n, want in expected.items():
            got = result.as_numpy(n)
            assert got.dtype == want.dtype and got.shape == want.shape
            if binary:
                np.testing.assert_array_equal(got, want)  # bytes in, bytes out: bit-exact
            else:
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    finally:
        client.close()


@pytest.mark.parametrize("name", MODELS)
def test_tf_serving_row_and_columnar_match_onnxruntime(server, repo, name):
    repo_dir, samples = repo
    feeds = samples[name]
    expected = direct(repo_dir, name, feeds)
    url = f"{server.url}/v1/models/{name}:predict"
    if len(feeds) == 1:
        (x,) = feeds.values()
        rows = {"instances": x.tolist()}
        cols = {"inputs": x.tolist()}
    else:
        rows = {"instances": [{k: v[i].tolist() for k, v in feeds.items()} for i in range(2)]}
        cols = {"inputs": {k: v.tolist() for k, v in feeds.items()}}
    r = httpx.post(url, json=rows)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    if len(expected) == 1:  # one output: a list of rows; several: an object per row
        preds = [{next(iter(expected)): p} for p in preds]
    assert len(preds) == 2 and all(set(p) == set(expected) for p in preds)
    for n, want in expected.items():
        got = np.array([p[n] for p in preds])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    r = httpx.post(url, json={**cols, "signature_name": "serving_default"})
    assert r.status_code == 200, r.text
    outs = r.json()["outputs"]
    if len(expected) == 1:  # one output: the tensor; several: an object by output name
        outs = {next(iter(expected)): outs}
    assert set(outs) == set(expected)
    for n, want in expected.items():
        np.testing.assert_allclose(np.array(outs[n]), want, rtol=1e-6, atol=1e-6)


def test_tf_serving_b64_values(server, repo):
    """{"b64": ...} carries a tensor's raw little-endian bytes: per instance in row format,
    the whole tensor in columnar format; both equal the number form bit for bit."""
    repo_dir, samples = repo
    x = samples["classifier"]["image"]
    (want,) = direct(repo_dir, "classifier", {"image": x}).values()
    url = f"{server.url}/v1/models/classifier:predict"
    rows = [{"b64": base64.b64encode(xi.astype("<f4").tobytes()).decode()} for xi in x]
    r = httpx.post(url, json={"instances": rows})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["predictions"]), want, rtol=1e-6, atol=1e-6)
    col = {"b64": base64.b64encode(x.astype("<f4").tobytes()).decode()}
    r = httpx.post(url, json={"inputs": {"image": col}})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["outputs"]), want, rtol=1e-6, atol=1e-6)
    bad = httpx.post(url, json={"instances": [{"b64": "not base64!"}]})
    assert bad.status_code == 400 and "base64" in bad.json()["error"]


def test_tf_serving_status_and_metadata(server):
    status = httpx.get(f"{server.url}/v1/models/unet").json()
    assert status == {
        "model_version_status": [
            {
                "version": "1",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    meta = httpx.get(f"{server.url}/v1/models/cgan_generator/metadata").json()
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["inputs"]["label"]["dtype"] == "DT_INT32"
    assert [d["size"] for d in sig["inputs"]["z"]["tensor_shape"]["dim"]] == ["-1", "4"]
    assert [d["size"] for d in sig["outputs"]["image"]["tensor_shape"]["dim"]] == [
        "-1",
        "8",
        "8",
        "1",
    ]
    assert meta["model_spec"] == {"name": "cgan_generator", "signature_name": "", "version": "1"}
    assert httpx.get(f"{server.url}/v1/models/unet/versions/1").status_code == 200


def test_python_client_both_protocols(server, repo):
    repo_dir, samples = repo
    feeds = samples["cgan_generator"]
    (want,) = direct(repo_dir, "cgan_generator", feeds).values()
    with Client(server.url) as c:
        assert c.live() and c.ready() and c.model_ready("cgan_generator", 1)
        assert c.server_metadata()["extensions"][0] == "binary_tensor_data"
        np.testing.assert_array_equal(c.infer("cgan_generator", feeds)["image"], want)
        got = c.infer("cgan_generator", feeds, binary=False, version=1)["image"]
        np.testing.assert_allclose(got, want, atol=1e-6)
        cols = c.predict("cgan_generator", inputs={k: v for k, v in feeds.items()})
        np.testing.assert_allclose(cols, want, atol=1e-6)
        with pytest.raises(ServerError) as err:
            c.infer("cgan_generator", {"z": feeds["z"]})
        assert err.value.status == 400 and "missing ['label']" in err.value.message


def test_errors_name_the_problem(server):
    post = lambda path, **kw: httpx.post(server.url + path, **kw)  # noqa: E731
    r = post(
        "/v2/models/nope/infer",
        json={"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]},
    )
    assert r.status_code == 404 and "'nope' is not loaded" in r.json()["error"]
    r = post(
        "/v2/models/unet/versions/7/infer",
        json={"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1]}]},
    )
    assert r.status_code == 404 and "no version 7" in r.json()["error"]
    r = post("/v2/models/..%2f..%2fetc/infer", content=b"{}")
    assert r.status_code in (400, 404) and "error" in r.json()
    x = np.zeros((1, 32, 32, 3), "float32")
    bad_shape = {
        "name": "image",
        "shape": [1, 16, 32, 3],
        "datatype": "FP32",
        "data": x[:, :16].ravel().tolist(),
    }
    r = post("/v2/models/unet/infer", json={"inputs": [bad_shape]})
    assert r.status_code == 400
    assert r.json()["error"] == (
        "input 'image': expected shape [-1, 32, 32, 3] (-1: any size), got [1, 16, 32, 3]"
    )
    bad_type = {"name": "image", "shape": [1, 32, 32, 3], "datatype": "INT64", "data": [0] * x.size}
    r = post("/v2/models/unet/infer", json={"inputs": [bad_type]})
    assert r.status_code == 400
    assert r.json()["error"] == "input 'image': expected datatype FP32, got 'INT64'"
    r = post("/v1/models/unet:predict", json={"instances": [[1.0, 2.0]]})
    assert r.status_code == 400 and "expected shape [-1, 32, 32, 3]" in r.json()["error"]
    z = np.zeros((2, 4)).tolist()
    r = post("/v1/models/cgan_generator:predict", json={"inputs": {"z": z, "label": [0.5, 1.7]}})
    assert r.status_code == 400
    assert r.json()["error"] == "input 'label': expected int32 values, got floating-point numbers"
    # Valid dtype and shape, but class 99 of 3: onnxruntime refuses it -> 400, not 500.
    with httpx.Client(base_url=server.url) as c:
        bad = {"inputs": {"z": z, "label": [1, 99]}}
        ok = {"inputs": {"z": z, "label": [1, 2]}}
        answers = [c.post("/v1/models/cgan_generator:predict", json=b) for b in (bad, ok)]
    assert answers[0].status_code == 400
    assert "rejected the input values" in answers[0].json()["error"]
    assert "out of data bounds" in answers[0].json()["error"]
    assert answers[1].status_code == 200
    assert httpx.get(server.url + "/v2/health/live").status_code == 200


def test_metrics_count_requests_batches_and_stages(server, repo):
    _, samples = repo
    before = httpx.get(server.url + "/metrics").text
    with Client(server.url) as c:
        for _ in range(3):
            c.infer("gru", samples["gru"])
    text = httpx.get(server.url + "/metrics").text

    def value(body, prefix):
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(prefix)
        )

    key = 'dlmodels_requests_total{code="200",model="gru",protocol="v2"}'
    assert value(text, key) - value(before, key) == 3
    rows = 'dlmodels_batch_size_sum{model="gru"}'
    assert value(text, rows) - value(before, rows) == 6  # 3 requests x batch 2
    for stage in ("read", "decode", "queue", "infer", "encode"):
        assert f'dlmodels_stage_duration_seconds_count{{model="gru",stage="{stage}"}}' in text
    assert "dlmodels_queue_depth" in text and "dlmodels_request_duration_seconds_bucket" in text


def test_openapi_documents_the_request_models(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert set(schemas["InferenceRequest"]["required"]) == {"inputs"}
    assert set(schemas["RequestInput"]["required"]) == {"name", "shape", "datatype"}
    infer = doc["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
    assert infer["application/json"]["schema"]["$ref"] == "#/components/schemas/InferenceRequest"
    assert "application/octet-stream" in infer
    predict = doc["paths"]["/v1/models/{name}:predict"]["post"]["requestBody"]["content"]
    assert predict["application/json"]["schema"]["$ref"].endswith("/PredictRequest")
    assert httpx.get(server.url + "/docs").status_code == 200


def test_client_sends_a_scalar_input_as_rank_0():
    """`Client.infer` declares the shape of a 0-d input as [] (numpy's ascontiguousarray would
    make it [1], which a model with a scalar input refuses)."""
    import orjson

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        size = int(request.headers.get("inference-header-content-length", len(request.content)))
        seen.append(orjson.loads(request.content[:size]))
        answer = {"outputs": [{"name": "y", "datatype": "FP32", "shape": [], "data": [5.0]}]}
        return httpx.Response(200, json=answer)

    client = Client("http://mock")
    client.http = httpx.Client(base_url="http://mock", transport=httpx.MockTransport(handler))
    for binary in (True, False):
        out = client.infer("m", {"scale": np.array(2.5, np.float32)}, binary=binary)
        assert out["y"].shape == () and float(out["y"]) == 5.0
    assert [r["inputs"][0]["shape"] for r in seen] == [[], []]
    assert seen[1]["inputs"][0]["data"] == [2.5]

"""A thin Python client for the server's two protocols (httpx, numpy; no TensorFlow).

    from serving.client import Client
    with Client("http://127.0.0.1:8000") as c:
        out = c.infer("unet", {"image": x})                 # KServe v2, binary tensors
        out = c.infer("unet", {"image": x}, binary=False)   # KServe v2, JSON tensors
        preds = c.predict("unet", instances=x)              # TF Serving REST, row format
        preds = c.predict("unet", inputs={"image": x})      # TF Serving REST, columnar

Any 4xx/5xx answer raises `ServerError` carrying the status and the server's JSON message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import numpy as np
import orjson

from serving._common import NUMPY_TO_V2, V2_TO_NUMPY


class ServerError(Exception):
    """The server answered with an error status."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class Client:
    """Client of one server.

    Args:
        url: the server's base URL ("http://127.0.0.1:8000").
        token: bearer token, when the server requires one.
        timeout: seconds per request.
    """

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 30.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                message = r.json().get("error", r.text)
            except ValueError:
                message = r.text
            raise ServerError(r.status_code, message)
        return r

    @staticmethod
    def _model_path(prefix: str, name: str, version: int | None) -> str:
        return f"{prefix}/{name}" + (f"/versions/{version}" if version is not None else "")

    # -- health and metadata --------------------------------------------------------------

    def live(self) -> bool:
        return self.http.get("/v2/health/live").status_code == 200

    def ready(self) -> bool:
        return self.http.get("/v2/health/ready").status_code == 200

    def model_ready(self, name: str, version: int | None = None) -> bool:
        return self.http.get(self._model_path("/v2/models", name, version) + "/ready").is_success

    def server_metadata(self) -> dict:
        return self._check(self.http.get("/v2")).json()

    def metadata(self, name: str, version: int | None = None) -> dict:
        """KServe v2 model metadata (name, versions, inputs, outputs)."""
        return self._check(self.http.get(self._model_path("/v2/models", name, version))).json()

    def tf_status(self, name: str, version: int | None = None) -> dict:
        return self._check(self.http.get(self._model_path("/v1/models", name, version))).json()

    def tf_metadata(self, name: str, version: int | None = None) -> dict:
        path = self._model_path("/v1/models", name, version) + "/metadata"
        return self._check(self.http.get(path)).json()

    def metrics(self) -> str:
        return self._check(self.http.get("/metrics")).text

    # -- inference ------------------------------------------------------------------------

    def infer(
        self,
        name: str,
        inputs: Mapping[str, np.ndarray],
        *,
        version: int | None = None,
        outputs: Sequence[str] | None = None,
        binary: bool = True,
    ) -> dict[str, np.ndarray]:
        """KServe v2 inference: output name -> array. `binary` sends and receives tensors with
        the binary tensor data extension (what tritonclient does by default)."""
        entries, chunks = [], []
        for n, value in inputs.items():
            arr = np.require(value, requirements="C")  # keeps a 0-d array 0-d
            entry: dict[str, Any] = {
                "name": n,
                "shape": list(arr.shape),
                "datatype": NUMPY_TO_V2[arr.dtype.name],
            }
            if binary:
                le = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
                entry["parameters"] = {"binary_data_size": le.nbytes}
                chunks.append(le.tobytes())
            else:
                entry["data"] = arr.ravel()
            entries.append(entry)
        request: dict[str, Any] = {"inputs": entries}
        if outputs is not None:
            request["outputs"] = [
                {"name": o, "parameters": {"binary_data": binary}} for o in outputs
            ]
        else:
            request["parameters"] = {"binary_data_output": binary}
        header = orjson.dumps(request, option=orjson.OPT_SERIALIZE_NUMPY)
        headers = {}
        if binary:
            headers["Inference-Header-Content-Length"] = str(len(header))
            body = b"".join([header, *chunks])
            headers["Content-Type"] = "application/octet-stream"
        else:
            body = header
            headers["Content-Type"] = "application/json"
        path = self._model_path("/v2/models", name, version) + "/infer"
        r = self._check(self.http.post(path, content=body, headers=headers))
        return decode_v2_response(r.content, r.headers.get("inference-header-content-length"))

    def predict(
        self,
        name: str,
        *,
        instances: Any = None,
        inputs: Any = None,
        version: int | None = None,
    ) -> Any:
        """TF Serving REST predict: `predictions` (row format) or `outputs` (columnar), numpy
        arrays where the answer holds one tensor (row format: one output) else as returned."""
        body: dict[str, Any] = {}
        if (instances is None) == (inputs is None):
            raise ValueError("give exactly one of instances= (row format) or inputs= (columnar)")
        if instances is not None:
            body["instances"] = instances
        else:
            body["inputs"] = inputs
        path = self._model_path("/v1/models", name, version) + ":predict"
        data = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        r = self._check(
            self.http.post(path, content=data, headers={"Content-Type": "application/json"})
        )
        answer = orjson.loads(r.content)
        value = answer["predictions"] if instances is not None else answer["outputs"]
        if isinstance(value, dict):
            return {k: np.asarray(v, dtype="float32") for k, v in value.items()}
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return value
        return np.asarray(value, dtype="float32")


def decode_v2_response(content: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    """Output name -> array of a KServe v2 response (JSON or binary tensors)."""
    if header_length is None:
        head, rest = orjson.loads(content), b""
    else:
        n = int(header_length)
        head, rest = orjson.loads(content[:n]), memoryview(content)[n:]
    out, offset = {}, 0
    for o in head["outputs"]:
        dtype = np.dtype(V2_TO_NUMPY[o["datatype"]])
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            arr = np.frombuffer(rest[offset : offset + size], dtype=dtype.newbyteorder("<"))
            offset += size
        else:
            arr = np.asarray(o["data"], dtype=dtype)
        out[o["name"]] = arr.reshape(o["shape"])
    return out

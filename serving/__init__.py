"""serving: the TensorFlow-free model server for dlmodels' exported artifacts.

Reads a model repository (directories holding the `manifest.json` that `dlmodels.export`
writes next to its ONNX artifacts; see `serving.repository` for the layout and numbered
versions) with `dlmodels.runtime` and runs the artifacts with onnxruntime behind two protocols:
TF Serving REST (/v1) and KServe v2 / Open Inference Protocol (/v2, with the binary tensor data
extension, so `tritonclient.http` works with its defaults). Requests for the same model
version are merged by a dynamic batcher; /metrics serves Prometheus metrics; new versions are
picked up without a restart. It imports neither TensorFlow nor Keras: a serving image needs
only `pip install 'dlmodels[serving]'`.

    python -m serving --model-repository repo/            # serve on 127.0.0.1:8000
    python -m serving --model-repository repo/ --check    # load, warm up, report, exit

Modules: `app` (FastAPI app factory), `repository` (layout, versions, hot reload), `batcher`,
`codec` (request validation and tensor encoding), `metrics`, `client` (a thin Python client),
`bench` (the load benchmark), `_http` (uvicorn's httptools protocol with one socket write per
small response), `__main__` (the command line; `main(argv)`).
"""

__all__: list[str] = []

"""serving: the TensorFlow-free model server for dlmodels' exported artifacts.

Reads a model repository (directories holding the `manifest.json` that `dlmodels.export`
writes next to its ONNX artifacts) with `dlmodels.runtime` and runs the artifacts with
onnxruntime. It imports neither TensorFlow nor Keras, so a serving image needs only
`pip install 'dlmodels[serving]'` (numpy, onnxruntime and the web stack).

For now `python -m serving --model-repository DIR --check` loads every model listed in the
repository and runs one warm-up inference on each; the HTTP server (TF Serving REST and KServe
v2 protocols, dynamic batching, hot reload) comes with the model-server issue.
"""

__all__: list[str] = []

"""The TensorFlow-free runtime: read manifest.json and run exported ONNX files.

    load_manifest / Manifest / Artifact / TensorSpec   the manifest schema, validated on load
    find_manifests                                     every manifest.json in a model repository
    OnnxModel                                          an onnxruntime session with named I/O
    match_feeds                                        inputs -> {input name: array}, checked
                                                       (what every runtime's `feeds` uses)

Everything here imports only the standard library, numpy and onnxruntime, never TensorFlow or
Keras, so a serving process (`serving/`) or a deployment image needs neither: install the base
package (`pip install dlmodels`) or `dlmodels[serving]`.
"""

from dlmodels.runtime.feeds import match_feeds
from dlmodels.runtime.manifest import (
    MANIFEST_FILENAME,
    MANIFEST_VERSION,
    ONNX_FORMATS,
    SUPPORTED_MANIFEST_VERSIONS,
    Artifact,
    Manifest,
    ManifestError,
    TensorSpec,
    find_manifests,
    load_manifest,
)
from dlmodels.runtime.onnx_runner import OnnxModel, default_threads

__all__ = [
    "MANIFEST_FILENAME",
    "MANIFEST_VERSION",
    "ONNX_FORMATS",
    "SUPPORTED_MANIFEST_VERSIONS",
    "Artifact",
    "Manifest",
    "ManifestError",
    "OnnxModel",
    "TensorSpec",
    "default_threads",
    "find_manifests",
    "load_manifest",
    "match_feeds",
]

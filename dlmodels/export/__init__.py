"""Export Keras models to deployable artifacts and prove they compute what Keras computes.

    to_keras / to_saved_model / to_onnx   write artifacts atomically (temp sibling + rename)
    quantize                              static int8 QDQ / dynamic int8 / fp16 ONNX
    verify / onnx_predict                 parity in a fresh onnxruntime process
    write_manifest / ArtifactEntry        manifest.json with I/O specs, parity, metrics, versions

Every writer refuses an existing target unless `overwrite=True`, and a failed export leaves
neither a partial file nor temp debris behind.
"""

from dlmodels.export.keras_format import to_keras
from dlmodels.export.manifest import ArtifactEntry, artifact_size, tool_versions, write_manifest
from dlmodels.export.onnx import DEFAULT_OPSET, UnsupportedOpError, onnx_io, to_onnx
from dlmodels.export.quantize import ArrayCalibrationReader, quantize
from dlmodels.export.saved_model import to_saved_model
from dlmodels.export.verify import VerificationError, VerifyReport, onnx_predict, verify

__all__ = [
    "DEFAULT_OPSET",
    "ArrayCalibrationReader",
    "ArtifactEntry",
    "UnsupportedOpError",
    "VerificationError",
    "VerifyReport",
    "artifact_size",
    "onnx_io",
    "onnx_predict",
    "quantize",
    "to_keras",
    "to_onnx",
    "to_saved_model",
    "tool_versions",
    "verify",
    "write_manifest",
]

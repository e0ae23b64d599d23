"""Export Keras models to deployable artifacts and prove they compute what Keras computes.

    to_keras / to_saved_model / to_onnx   write artifacts atomically (temp sibling + rename)
    quantize / quantize_with_report       static int8 QDQ / dynamic int8 / fp16 ONNX
    verify / onnx_predict                 parity in a fresh onnxruntime process
    write_manifest / ArtifactEntry        manifest.json with I/O specs, parity, metrics, versions
    write_repository                      all of the above for any functional model, one call
    to_fp16 / verify_fp16                 ONNX float16 (Resize & co kept fp32)
    to_openvino / OpenVINOModel / verify_openvino   OpenVINO IR, f32 / bf16 / int8 (optional extra)
    quantize_openvino / nncf_settings   OpenVINO int8 IR quantized by NNCF (optional extra)
    to_litert / LiteRTModel / verify_litert   LiteRT fp32 / fp16 / int8 (ai-edge-litert, optional)
    simplify_onnx                         onnxslim simplification, parity re-checked
    write_triton_repository / write_tfserving_base_path   serving layouts from a repository

Every writer refuses an existing target unless `overwrite=True`, and a failed export leaves
neither a partial file nor temp debris behind.
"""

from dlmodels.export.fp16 import (
    FP16_ATOL,
    fp16_fallback_ops,
    fp16_op_summary,
    to_fp16,
    verify_fp16,
)
from dlmodels.export.keras_format import to_keras
from dlmodels.export.layouts import write_tfserving_base_path, write_triton_repository
from dlmodels.export.litert import LiteRTConversionError, LiteRTModel, to_litert, verify_litert
from dlmodels.export.manifest import (
    ArtifactEntry,
    artifact_sha256,
    artifact_size,
    model_output_kinds,
    model_task,
    tool_versions,
    write_manifest,
)
from dlmodels.export.onnx import (
    DEFAULT_OPSET,
    SimplificationError,
    UnsupportedOpError,
    check_opset,
    onnx_io,
    simplify_onnx,
    to_onnx,
)
from dlmodels.export.onnx_rnn import (
    NativeRNNError,
    OpAssertionError,
    assert_ops,
    op_counts,
    replace_rnn_loops,
)
from dlmodels.export.openvino import (
    OpenVINOModel,
    nncf_settings,
    quantize_openvino,
    to_openvino,
    verify_openvino,
)
from dlmodels.export.quantize import (
    ArrayCalibrationReader,
    QuantizeReport,
    default_reduce_range,
    quantize,
    quantize_with_report,
    quantized_ops,
    select_quantization,
)
from dlmodels.export.saved_model import to_saved_model
from dlmodels.export.verify import (
    VerificationError,
    VerifyReport,
    compare_outputs,
    keras_outputs,
    onnx_predict,
    verify,
)

# After the writers above: repository imports them through this package.
from dlmodels.export.repository import (  # isort: skip
    ARTIFACT_PATHS,
    DEFAULT_FORMATS,
    FORMATS,
    ArtifactResult,
    RepositoryReport,
    sample_dict,
    write_repository,
)

__all__ = [
    "ARTIFACT_PATHS",
    "DEFAULT_FORMATS",
    "DEFAULT_OPSET",
    "FORMATS",
    "FP16_ATOL",
    "ArrayCalibrationReader",
    "ArtifactEntry",
    "ArtifactResult",
    "LiteRTConversionError",
    "LiteRTModel",
    "NativeRNNError",
    "OpAssertionError",
    "OpenVINOModel",
    "QuantizeReport",
    "RepositoryReport",
    "SimplificationError",
    "UnsupportedOpError",
    "VerificationError",
    "VerifyReport",
    "artifact_sha256",
    "artifact_size",
    "assert_ops",
    "check_opset",
    "compare_outputs",
    "default_reduce_range",
    "fp16_fallback_ops",
    "fp16_op_summary",
    "keras_outputs",
    "model_output_kinds",
    "model_task",
    "nncf_settings",
    "onnx_io",
    "onnx_predict",
    "op_counts",
    "quantize",
    "quantize_openvino",
    "quantize_with_report",
    "quantized_ops",
    "replace_rnn_loops",
    "sample_dict",
    "select_quantization",
    "simplify_onnx",
    "to_fp16",
    "to_keras",
    "to_litert",
    "to_onnx",
    "to_openvino",
    "to_saved_model",
    "tool_versions",
    "verify",
    "verify_fp16",
    "verify_litert",
    "verify_openvino",
    "write_manifest",
    "write_repository",
    "write_tfserving_base_path",
    "write_triton_repository",
]

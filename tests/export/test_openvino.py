"""OpenVINO IR fp32 / bf16 and the onnxruntime QDQ int8 file, run in OpenVINO, against Keras."""

import numpy as np
import pytest

pytest.importorskip("openvino")

from dlmodels.export import openvino as ovx
from tests.export._tiny import images


@pytest.fixture(scope="module")
def ir_dir(onnx_file, tmp_path_factory):
    xml = ovx.to_openvino(onnx_file, tmp_path_factory.mktemp("ov") / "tiny_ir")
    return xml.parent


@pytest.fixture(scope="module")
def samples(model):
    x = images(6, seed=21)
    return x, {"logits": model.predict(x, verbose=0)}


def test_ir_files_names_and_fp32_weights(ir_dir, onnx_file):
    assert sorted(p.name for p in ir_dir.iterdir()) == ["model.bin", "model.xml"]
    # fp32 weights: the .bin holds 4 bytes per weight, as many bytes as the ONNX initializers.
    import onnx

    init = onnx.load(str(onnx_file)).graph.initializer
    n_float = sum(int(np.prod(i.dims)) for i in init if i.data_type == onnx.TensorProto.FLOAT)
    assert (ir_dir / "model.bin").stat().st_size >= 4 * n_float
    m = ovx.OpenVINOModel(ir_dir, precision="f32", threads=1)
    assert m.input_names == ["image"] and m.output_names == ["logits"]
    assert m.config["INFERENCE_PRECISION_HINT"] == "f32"


def test_f32_parity(model, ir_dir, samples):
    x, expected = samples
    report = ovx.verify_openvino(model, ir_dir, x, precision="f32", expected=expected)
    assert report.passed and report.atol == 1e-4
    assert report.max_abs_error <= 1e-4 and report.agreement == 1.0


def test_bf16_parity_and_really_bf16(model, ir_dir, samples):
    if not ovx.supports_bf16():
        pytest.skip("this CPU has no AVX512-BF16 / AMX")
    x, expected = samples
    report = ovx.verify_openvino(model, ir_dir, x, precision="bf16", expected=expected)
    assert report.passed and report.atol == ovx.TOLERANCES["bf16"] == 5e-2
    # bf16 has an 8-bit significand: error far above fp32 round-off, below the bar.
    assert 1e-4 < report.max_abs_error <= 5e-2
    assert report.agreement >= 0.98
    kinds = ovx.OpenVINOModel(ir_dir, precision="bf16", threads=1).runtime_precisions()
    assert kinds["Convolution"] == {"bf16": 5}
    assert ovx.OpenVINOModel(ir_dir, precision="f32", threads=1).runtime_precisions()[
        "Convolution"
    ] == {"f32": 5}


def test_ort_qdq_int8_file_runs_int8_in_openvino(model, int8_file, samples, tmp_path):
    x, expected = samples
    report = ovx.verify_openvino(model, int8_file, x, precision="int8", expected=expected)
    assert report.passed and report.min_agreement == 0.9
    assert report.agreement >= 0.9
    assert 1e-3 < report.max_abs_error < 0.5  # quantized, yet close
    kinds = ovx.OpenVINOModel(int8_file, precision="int8", threads=1).runtime_precisions()
    assert kinds["Convolution"] == {"u8": 5}
    # Its IR runs the same way and computes the same numbers.
    xml = ovx.to_openvino(int8_file, tmp_path / "int8_ir")
    same = ovx.openvino_predict(xml, x, precision="int8", fresh_process=False)["logits"]
    onnx_out = ovx.openvino_predict(int8_file, x, precision="int8", fresh_process=False)["logits"]
    np.testing.assert_allclose(same, onnx_out, atol=1e-5)


def test_over_budget_fails(model, ir_dir, samples):
    x, expected = samples
    report = ovx.verify_openvino(model, ir_dir, x, precision="bf16", atol=1e-6, expected=expected)
    assert not report.passed
    with pytest.raises(AssertionError, match=r"FAIL .*\[bf16\]"):
        ovx.verify_openvino(
            model, ir_dir, x, precision="bf16", atol=1e-6, expected=expected, raise_on_fail=True
        )


def test_refusals(onnx_file, ir_dir, tmp_path):
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ovx.to_openvino(onnx_file, ir_dir)
    assert sorted(p.name for p in ir_dir.parent.iterdir()) == ["tiny_ir"]  # no temp debris
    with pytest.raises(ValueError, match=r"precision='fp8' is not supported.*'bf16'"):
        ovx.OpenVINOModel(ir_dir, precision="fp8")
    with pytest.raises(FileNotFoundError):
        ovx.to_openvino(tmp_path / "missing.onnx", tmp_path / "ir")
    assert not (tmp_path / "ir").exists()

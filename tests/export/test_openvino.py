"""OpenVINO IR fp32 / bf16 and the onnxruntime QDQ int8 file, run in OpenVINO, against Keras."""

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")

from dlmodels.export import openvino as ovx
from dlmodels.export.verify import FINITE_ONLY
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


def test_static_batch_computes_the_same_and_refuses_other_batches(ir_dir, samples):
    x, _ = samples  # 6 images
    dynamic = ovx.OpenVINOModel(ir_dir, precision="f32", threads=1)
    static = ovx.OpenVINOModel(ir_dir, precision="f32", threads=1, batch_size=3)
    # The compiled graph really has a fixed batch (the dynamic one keeps "?").
    assert dynamic.compiled.inputs[0].get_partial_shape().is_dynamic
    shape = static.compiled.inputs[0].get_partial_shape()
    assert shape.is_static and shape.to_shape()[0] == 3
    assert static.batch_size == 3 and "batch_size=3" in repr(static)
    for half in (x[:3], x[3:]):
        np.testing.assert_allclose(static(half), dynamic(half), atol=1e-6)
    with pytest.raises(ValueError, match=r"input 'image' has batch 6, .*compiled for batch 3"):
        static(x)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=r"batch_size must be an int >= 1"):
            ovx.OpenVINOModel(ir_dir, threads=1, batch_size=bad)


def _graph_ir(path, inputs, fn):
    """A hand-built OpenVINO graph saved as an IR: `inputs` maps names to partial shapes."""
    import openvino as ov
    import openvino.opset13 as ops

    params = [ops.parameter(ov.PartialShape(s), ov.Type.f32, name=n) for n, s in inputs.items()]
    ov.save_model(ov.Model([fn(*params)], params, path.stem), str(path))
    return path


def test_static_batch_fixes_every_input_and_checks_every_feed(tmp_path):
    """Two inputs a, b of shape (?, 4), a + b: batch_size=2 fixes both; a feed whose second
    input has another batch is refused by name; an input without a batch dimension (a
    scalar) cannot take a static batch and says to use batch_size=None."""
    import openvino.opset13 as ops

    two = _graph_ir(tmp_path / "two.xml", {"a": [-1, 4], "b": [-1, 4]}, ops.add)
    static = ovx.OpenVINOModel(two, threads=1, batch_size=2)
    assert [str(p.get_partial_shape()) for p in static.compiled.inputs] == ["[2,4]"] * 2
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    (out,) = static.run({"a": a, "b": 10 * a}).values()
    np.testing.assert_array_equal(out, 11 * a)
    with pytest.raises(ValueError, match=r"input 'b' has batch 3, but .* compiled for batch 2"):
        static.run({"a": a, "b": np.ones((3, 4), np.float32)})
    scalar = _graph_ir(tmp_path / "scalar.xml", {"s": []}, lambda s: ops.multiply(s, s))
    with pytest.raises(
        ValueError, match=r"input 's' of scalar.xml has shape \[\]; use batch_size=None"
    ):
        ovx.OpenVINOModel(scalar, threads=1, batch_size=2)
    # Compiled as it is (batch_size=None), the scalar model compiles with its shape.
    assert str(ovx.OpenVINOModel(scalar, threads=1).compiled.inputs[0].get_partial_shape()) == "[]"


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


# -- int8 quantized by NNCF ----------------------------------------------------------------


@pytest.fixture(scope="module")
def nncf_ir(onnx_file, tmp_path_factory):
    pytest.importorskip("nncf")
    out = tmp_path_factory.mktemp("nncf") / "tiny_int8"
    return ovx.quantize_openvino(onnx_file, out, images(32, seed=3), subset_size=32).parent


def _convolutions(xml):
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    return [op for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]


def _int8_weights(conv):
    """(int8 weights, per-output-channel scale) behind a Convolution: Multiply(Convert(i8), s)."""
    mul = conv.input(1).get_source_output().get_node()
    assert mul.get_type_name() == "Multiply"
    a, b = (i.get_source_output().get_node() for i in mul.inputs())
    convert, scale = (a, b) if a.get_type_name() == "Convert" else (b, a)
    q = convert.input(0).get_source_output().get_node().get_data()
    return q, scale.get_data()


def test_nncf_ir_runs_int8_and_agrees_with_keras(model, nncf_ir, ir_dir, samples):
    assert sorted(p.name for p in nncf_ir.iterdir()) == ["model.bin", "model.xml"]
    x, expected = samples
    report = ovx.verify_openvino(model, nncf_ir, x, precision="int8", expected=expected)
    assert report.passed and report.min_agreement == ovx.INT8_MIN_AGREEMENT == 0.9
    assert report.agreement >= 0.9
    assert 1e-3 < report.max_abs_error < 1.0  # quantized (far above f32 round-off), yet close
    # Every convolution of the compiled graph runs in u8 (the f32 IR's run in f32).
    kinds = ovx.OpenVINOModel(nncf_ir, precision="int8", threads=1).runtime_precisions()
    assert kinds["Convolution"] == {"u8": 5}
    # The weights are int8 per output channel, each the fp32 IR's weight rounded to the nearest
    # step of its channel's scale (the fp32 IR matches Keras: test_f32_parity).
    fp32, int8 = _convolutions(ir_dir / "model.xml"), _convolutions(nncf_ir / "model.xml")
    assert len(fp32) == len(int8) == 5
    for f, q in zip(fp32, int8, strict=True):
        w = f.input(1).get_source_output().get_node().get_data().astype(np.float64)
        qw, scale = _int8_weights(q)
        assert qw.dtype == np.int8 and scale.shape == (w.shape[0], 1, 1, 1)
        assert (np.abs(qw * scale - w) <= scale / 2 + 1e-6 * np.abs(w).max()).all()
        per_channel_max = np.abs(w).reshape(len(w), -1).max(1)
        ratio = scale.ravel() / per_channel_max  # symmetric: scale = max |w_c| / levels
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
        # Each channel's range is used: 127 steps, or 63.5 for the first convolution (NNCF's
        # overflow fix keeps 7 bits there for CPUs without VNNI).
        assert np.abs(qw).reshape(len(w), -1).max(1).min() >= 63
    # int8 weights: the .bin shrinks to well under half of the fp32 IR's.
    assert (nncf_ir / "model.bin").stat().st_size < 0.5 * (ir_dir / "model.bin").stat().st_size
    # NNCF recorded its settings in the IR; other files have none.
    settings = ovx.nncf_settings(nncf_ir)
    assert settings["preset"] == "mixed" and settings["subset_size"] == 32
    assert settings["fast_bias_correction"] is True and settings["nncf_version"].startswith("3.")
    assert ovx.nncf_settings(ir_dir) is None


def test_nncf_settings_reach_nncf(onnx_file, tmp_path):
    pytest.importorskip("nncf")
    xml = ovx.quantize_openvino(
        onnx_file,
        tmp_path / "perf",
        images(8, seed=4).astype(np.float64),  # numpy's default dtype is accepted
        preset="performance",
        subset_size=300,  # more than there are: all 8 are used
        fast_bias_correction=False,
    )
    settings = ovx.nncf_settings(xml.parent)
    assert settings["preset"] == "performance" and settings["subset_size"] == 8
    assert settings["fast_bias_correction"] is False


def test_nncf_refusals_leave_nothing_behind(onnx_file, int8_file, ir_dir, tmp_path, monkeypatch):
    pytest.importorskip("nncf")
    out = tmp_path / "q"
    calib = images(4, seed=5)
    with pytest.raises(ValueError, match=r"calibration for input 'image' is empty"):
        ovx.quantize_openvino(onnx_file, out, calib[:0])
    with pytest.raises(ValueError, match=r"shape \(4, 8, 8, 3\).*\(num_samples, \*input_shape\)"):
        ovx.quantize_openvino(onnx_file, out, calib[:, :8, :8])
    with pytest.raises(ValueError, match="NaN or inf"):
        ovx.quantize_openvino(onnx_file, out, np.full_like(calib, np.nan))
    with pytest.raises(ValueError, match=r"inputs \['x'\]; the model takes \['image'\]"):
        ovx.quantize_openvino(onnx_file, out, {"x": calib})
    with pytest.raises(ValueError, match=r"preset='fast' is not supported.*'performance'"):
        ovx.quantize_openvino(onnx_file, out, calib, preset="fast")
    with pytest.raises(ValueError, match="subset_size must be an int >= 1"):
        ovx.quantize_openvino(onnx_file, out, calib, subset_size=0)
    with pytest.raises(ValueError, match="already quantized"):
        ovx.quantize_openvino(int8_file, out, calib)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ovx.quantize_openvino(onnx_file, ir_dir, calib)
    # A failure while writing (disk full) leaves neither the target nor a temp directory.
    import openvino as ov

    def save_half(model, path, **kw):
        Path(path).write_text("<net")  # a partial model.xml
        raise OSError("No space left on device")

    monkeypatch.setattr(ov, "save_model", save_half)
    with pytest.raises(OSError, match="No space left"):
        ovx.quantize_openvino(onnx_file, out, calib, subset_size=4)
    assert list(tmp_path.iterdir()) == []


def test_nncf_missing_names_the_extra(onnx_file, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nncf", None)  # `import nncf` now raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'dlmodels\[openvino\]'"):
        ovx.quantize_openvino(onnx_file, tmp_path / "q", images(4))
    assert list(tmp_path.iterdir()) == []


def test_int8_is_judged_by_the_metric_drop_as_litert_is(monkeypatch):
    """verify_openvino's int8 bar is `int8_verdict`'s: argmax agreement and a metric drop of at
    most 0.01 by default; an output without classes and no metric is judged on finiteness only,
    and the report says so."""
    keras_out = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    shifted = {"logits": keras_out - 0.1}  # same argmax, lower mean
    monkeypatch.setattr(ovx, "openvino_predict", lambda *a, **k: shifted)

    def mean_logit(labels, out):
        return float(np.mean(out))

    kw = {"precision": "int8", "expected": {"logits": keras_out}, "labels": 0}
    report = ovx.verify_openvino(None, "x.xml", keras_out, metric=mean_logit, **kw)
    assert report.agreement == 1.0 and report.max_metric_drop == 0.01
    assert report.metric_keras - report.metric_openvino == pytest.approx(0.1, abs=1e-6)
    assert not report.passed and "mean_logit drop <= 0.01" in report.judged_by, report
    assert "judged by argmax agreement >= 0.9 and mean_logit drop <= 0.01" in str(report)
    loose = ovx.verify_openvino(
        None, "x.xml", keras_out, metric=mean_logit, max_metric_drop=0.2, **kw
    )
    assert loose.passed
    one = {"logits": keras_out[:, :1]}
    monkeypatch.setattr(ovx, "openvino_predict", lambda *a, **k: one)
    with pytest.warns(UserWarning, match="finite outputs only"):
        report = ovx.verify_openvino(None, "x.xml", keras_out, precision="int8", expected=one)
    assert report.passed and report.judged_by == FINITE_ONLY
    # f32 keeps its absolute bar and no metric bar.
    monkeypatch.setattr(ovx, "openvino_predict", lambda *a, **k: shifted)
    report = ovx.verify_openvino(
        None, "x.xml", keras_out, metric=mean_logit, **{**kw, "precision": "f32"}
    )
    assert not report.passed and report.judged_by == "max abs error <= 0.0001"


def test_a_keras_metric_object_is_scored_from_a_fresh_state(monkeypatch):
    """A `keras.metrics.Metric` accumulates over calls: without a reset, OpenVINO's value would be
    the running accuracy over Keras' outputs and its own (0.75 here, not 0.5), halving the drop
    to 0.25 and passing a 0.3 bar the true drop of 0.5 fails."""
    import keras

    labels = np.array([0, 1, 2, 0])
    keras_out = np.eye(3, dtype="float32")[labels]  # every argmax right: accuracy 1
    wrong = keras_out.copy()
    wrong[:2] = np.eye(3, dtype="float32")[[2, 2]]  # two of four wrong: accuracy 0.5
    monkeypatch.setattr(ovx, "openvino_predict", lambda *a, **k: {"logits": wrong})
    accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    kw = {"precision": "int8", "expected": {"logits": keras_out}, "labels": labels}
    for _ in range(2):  # and no state carried over from the previous verification either
        report = ovx.verify_openvino(
            None, "x.xml", keras_out, metric=accuracy, min_agreement=0.0, max_metric_drop=0.3, **kw
        )
        assert (report.metric_keras, report.metric_openvino) == (1.0, 0.5), report
        assert not report.passed and "accuracy drop <= 0.3" in report.judged_by, report


def test_int8_default_agreement_is_the_shared_one():
    """openvino.py is loaded stand-alone in its worker, so it keeps its own copy of the bar."""
    from dlmodels.export.verify import INT8_MIN_AGREEMENT

    assert ovx.INT8_MIN_AGREEMENT == INT8_MIN_AGREEMENT

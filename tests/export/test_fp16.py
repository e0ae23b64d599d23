"""ONNX fp16: half-size weights, Resize kept in fp32, parity with Keras in a fresh process."""

import numpy as np
import onnx
import pytest

from dlmodels import export
from dlmodels.export import fp16
from tests.export._tiny import images


@pytest.fixture(scope="module")
def fp16_file(onnx_file, tmp_path_factory):
    return fp16.to_fp16(onnx_file, tmp_path_factory.mktemp("fp16") / "tiny.fp16.onnx")


def _initializer_types(path):
    graph = onnx.load(str(path)).graph
    return {i.name: i.data_type for i in graph.initializer if len(i.dims) == 4}


def test_weights_are_fp16_and_resize_stays_fp32(onnx_file, fp16_file):
    conv_weights = _initializer_types(fp16_file)
    assert len(conv_weights) == 5  # stem, down, mid, head, logits (BatchNorm folded in)
    assert set(conv_weights.values()) == {onnx.TensorProto.FLOAT16}
    assert set(_initializer_types(onnx_file).values()) == {onnx.TensorProto.FLOAT}
    summary = fp16.fp16_op_summary(fp16_file)
    assert summary["float16"]["Conv"] == 5
    assert summary["float32"] == {"Resize": 1}  # the bilinear UpSampling2D
    # Weights are ~all of the file: fp16 halves it (2 bytes instead of 4 per weight).
    n_weights = sum(
        int(np.prod(i.dims))
        for i in onnx.load(str(fp16_file)).graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT16
    )
    assert n_weights > 6000
    fp32_size, fp16_size = onnx_file.stat().st_size, fp16_file.stat().st_size
    # The added Cast nodes cost a few hundred bytes, more with the longer layer names a
    # session-scoped model gets when other tests built models first: a one-sided margin.
    assert 0.8 * 2 * n_weights <= fp32_size - fp16_size <= 2 * n_weights
    io = export.onnx_io(fp16_file)
    assert [(t["name"], t["dtype"]) for t in io["inputs"]] == [("image", "float32")]
    assert [(t["name"], t["dtype"]) for t in io["outputs"]] == [("logits", "float32")]


def test_without_the_block_list_resize_turns_fp16(onnx_file, tmp_path):
    """The block list, not luck, keeps Resize in fp32."""
    out = fp16.to_fp16(onnx_file, tmp_path / "all.onnx", op_block_list=[])
    assert fp16.fp16_op_summary(out)["float16"].get("Resize") == 1
    assert "Resize" in fp16.default_op_block_list()


def test_parity_with_keras_in_a_fresh_process(model, fp16_file):
    x = images(6, seed=11)
    expected = model.predict(x, verbose=0)
    labels = np.argmax(expected, -1)

    def pixel_accuracy(y, logits):
        return float(np.mean(np.argmax(logits, -1) == y))

    report = fp16.verify_fp16(model, fp16_file, x, labels=labels, metric=pixel_accuracy)
    assert report.passed and report.atol == fp16.FP16_ATOL == 1e-2
    # fp16 weights really are in use: the error is well above fp32 round-off, below the bar.
    assert 1e-5 < report.max_abs_error <= 1e-2
    assert report.mean_abs_error < 1e-3
    assert report.metric_keras == 1.0 and report.metric_onnx >= 0.99
    # The same numbers through onnxruntime in this process.
    (got,) = export.onnx_predict(fp16_file, x)
    assert np.max(np.abs(got - expected)) == pytest.approx(report.max_abs_error, rel=1e-6)


def test_onnxruntime_cpu_fallback_is_reported(fp16_file):
    """onnxruntime's CPU EP inserts casts around fp16 nodes it has no kernel for; the report
    only ever names fp16 nodes of the file (Resize is fp32, so it is never listed)."""
    fallback = fp16.fp16_fallback_ops(fp16_file)
    half = fp16.fp16_op_summary(fp16_file)["float16"]
    assert set(fallback) <= set(half)
    assert all(fallback[op] <= half[op] for op in fallback)
    assert "Resize" not in fallback


def test_fp16_io_types(onnx_file, tmp_path, model):
    out = fp16.to_fp16(onnx_file, tmp_path / "io16.onnx", keep_io_types=False)
    io = export.onnx_io(out)
    assert io["inputs"][0]["dtype"] == "float16" and io["outputs"][0]["dtype"] == "float16"
    x = images(2, seed=12)
    (got,) = export.onnx_predict(out, x.astype("float16"))
    assert got.dtype == np.float16
    assert np.max(np.abs(got.astype("float32") - model.predict(x, verbose=0))) < 2e-2


def test_refusals(onnx_file, fp16_file, tmp_path):
    target = tmp_path / "exists.onnx"
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        fp16.to_fp16(onnx_file, target)
    assert target.read_bytes() == b"old"
    with pytest.raises(ValueError, match="already holds float16 weights"):
        fp16.to_fp16(fp16_file, tmp_path / "twice.onnx")
    with pytest.raises(ValueError, match=r"op_block_list must be a list.*\['Resize'\]"):
        fp16.to_fp16(onnx_file, tmp_path / "bad.onnx", op_block_list="Resize")
    with pytest.raises(FileNotFoundError):
        fp16.to_fp16(tmp_path / "missing.onnx", tmp_path / "x.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.onnx"]

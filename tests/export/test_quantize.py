"""Static int8 QDQ quantization: QDQ nodes, int8 weights, smaller file, fp32 agreement."""

import importlib

import numpy as np
import onnx
import pytest

from dlmodels import export
from dlmodels.export import ArrayCalibrationReader
from tests.export._tiny import images


def _ops(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_static_int8_structure_and_size(onnx_file, int8_file):
    ops = _ops(int8_file)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = onnx.load(str(int8_file)).graph.initializer
    int8 = [w for w in weights if w.data_type == onnx.TensorProto.INT8 and len(w.dims) == 4]
    # Every conv kernel (stem, down, mid, head, logits) is stored as int8, per channel.
    assert len(int8) == 5, [w.name for w in int8]
    kernel_type = {w.data_type for w in weights if len(w.dims) == 4}
    assert kernel_type == {onnx.TensorProto.INT8}
    fp32_kernels = [w for w in onnx.load(str(onnx_file)).graph.initializer if len(w.dims) == 4]
    nbytes = sum(len(w.raw_data) for w in fp32_kernels)
    assert sum(len(w.raw_data) for w in int8) * 4 == nbytes
    # Scales, zero points and int32 biases are a fixed overhead that dominates only for toy
    # models like this one (32 KB); for ResNet-50 the file shrinks ~4x (102 MB -> 26 MB).
    size_fp32, size_int8 = onnx_file.stat().st_size, int8_file.stat().st_size
    assert size_int8 < 0.7 * size_fp32, (size_fp32, size_int8)


def test_static_int8_agrees_with_keras(model, int8_file):
    x = images(16, seed=99)  # calibration-like, not the calibration samples themselves
    report = export.verify(model, int8_file, x, atol=np.inf)
    assert report.passed
    assert report.agreement >= 0.95, report
    # int8 error is real but bounded relative to the logit range.
    scale = np.max(np.abs(model.predict(x, verbose=0)))
    assert report.max_abs_error < 0.2 * scale, (report.max_abs_error, scale)


def test_dynamic_and_fp16_modes(model, onnx_file, tmp_path):
    x = images(4, seed=8)
    dyn = export.quantize(onnx_file, tmp_path / "dyn.onnx", mode="dynamic")
    assert (
        "DynamicQuantizeLinear" in _ops(dyn)
        or "ConvInteger" in _ops(dyn)
        or ("DequantizeLinear" in _ops(dyn))
    )
    assert export.verify(model, dyn, x, atol=np.inf).agreement >= 0.9
    fp16 = export.quantize(onnx_file, tmp_path / "fp16.onnx", mode="fp16")
    report = export.verify(model, fp16, x, atol=1e-2)
    assert report.passed, report
    assert fp16.stat().st_size < 0.7 * onnx_file.stat().st_size


def test_bad_arguments(onnx_file, tmp_path):
    with pytest.raises(ValueError, match="unknown quantization mode"):
        export.quantize(onnx_file, tmp_path / "q.onnx", mode="int4", calibration=images(2))
    with pytest.raises(ValueError, match="calibration"):
        export.quantize(onnx_file, tmp_path / "q.onnx")
    with pytest.raises(ValueError, match="no samples"):
        export.quantize(onnx_file, tmp_path / "q.onnx", calibration=[])
    assert list(tmp_path.iterdir()) == []


def _drain(reader):
    shapes = []
    while (item := reader.get_next()) is not None:
        shapes.append(item["image"].shape)
    return shapes


def test_calibration_reader_accepts_arrays_iterables_and_datasets():
    import tensorflow as tf

    x = images(10)
    labels = np.zeros((10, 16, 16), "int32")
    kw = dict(input_name="image", input_rank=4)
    assert _drain(ArrayCalibrationReader(x, batch_size=4, **kw)) == [
        (4, 16, 16, 3),
        (4, 16, 16, 3),
        (2, 16, 16, 3),
    ]
    assert _drain(ArrayCalibrationReader([x[:3], x[3:]], **kw)) == [(3, 16, 16, 3), (7, 16, 16, 3)]
    unbatched = tf.data.Dataset.from_tensor_slices((x, labels))
    assert _drain(ArrayCalibrationReader(unbatched, **kw)) == [(1, 16, 16, 3)] * 10
    batched = tf.data.Dataset.from_tensor_slices(x).batch(5)
    reader = ArrayCalibrationReader(batched, max_samples=7, **kw)
    assert _drain(reader) == [(5, 16, 16, 3), (2, 16, 16, 3)]
    reader.rewind()  # the calibrator may pass over the data more than once
    assert len(_drain(reader)) == 2
    with pytest.raises(ValueError, match="rank"):
        _drain(ArrayCalibrationReader(np.zeros((2, 16), "float32"), **kw))


def test_static_from_dataset(model, onnx_file, tmp_path):
    import tensorflow as tf

    x = images(16, seed=2)
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(16))).batch(8)
    path = export.quantize(onnx_file, tmp_path / "ds.int8.onnx", calibration=ds)
    assert export.verify(model, path, images(8, seed=3), atol=np.inf).agreement >= 0.9


def test_no_debris_when_symbolic_shape_inference_gives_up(tmp_path, monkeypatch):
    """A U-Net's decoder defeats onnxruntime's symbolic shape inference, which then dumps
    `sym_shape_infer_temp.onnx` + `<uuid>.data` into the working directory. quantize() must
    fall back to ONNX shape inference and leave the working directory clean."""
    import dlmodels.models as registry

    unet = registry.get(
        "unet", input_shape=(16, 16, 3), num_classes=3, depth=2, base_filters=4,
        upsampling="bilinear",
    )  # fmt: skip
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    fp32 = export.to_onnx(unet, tmp_path / "unet.onnx")
    int8 = export.quantize(fp32, tmp_path / "unet.int8.onnx", calibration=images(8))
    assert list(cwd.iterdir()) == []
    assert "QuantizeLinear" in _ops(int8)
    assert export.verify(unet, int8, images(4, seed=5), atol=np.inf).agreement >= 0.9


def _input_scale(int8_path, input_name="image"):
    """The activation scale the calibrator chose for a graph input (its range / 255)."""
    from onnx import numpy_helper

    graph = onnx.load(str(int8_path)).graph
    tensor = input_name
    for _ in range(4):  # look through layout ops (NHWC -> NCHW Transpose) before the quantizer
        node = next(n for n in graph.node if n.input and n.input[0] == tensor)
        if node.op_type == "QuantizeLinear":
            break
        assert node.op_type in ("Transpose", "Reshape", "Identity"), node.op_type
        tensor = node.output[0]
    init = {i.name: i for i in graph.initializer}
    return float(numpy_helper.to_array(init[node.input[1]]))


def test_one_shot_generator_contributes_every_batch(onnx_file, tmp_path):
    """The first batch of a one-shot generator holds the widest range: if peeking at the data
    dropped it (the old get_next + rewind), the input scale would cover [0, ~1.1] only."""
    x = images(12, seed=30)
    batches = [x[:4] * 10.0, x[4:8], x[8:]]
    widest = float(batches[0].max())

    def one_shot():
        yield from batches

    reader = ArrayCalibrationReader(one_shot(), input_name="image", input_rank=4)
    path = export.quantize(onnx_file, tmp_path / "gen.int8.onnx", calibration=reader)
    assert reader.batches_seen == 3 and reader.samples_seen == 12
    assert _input_scale(path) * 255 == pytest.approx(widest, rel=1e-3)
    # Without a reader of our own: the report counts what the calibrator read.
    report = export.quantize_with_report(
        onnx_file, tmp_path / "gen2.int8.onnx", calibration=one_shot()
    )
    assert (report.calibration_batches, report.calibration_samples) == (3, 12)
    assert _input_scale(report.path) * 255 == pytest.approx(widest, rel=1e-3)


def _two_input_onnx(tmp_path):
    import keras

    image, vec = keras.Input((16, 16, 3), name="image"), keras.Input((5,), name="vector")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, name="conv")(image))
    out = keras.layers.Dense(3, name="scores")(keras.layers.Concatenate()([x, vec]))
    model = keras.Model([image, vec], out)
    return model, export.to_onnx(model, tmp_path / "two.onnx")


def test_calibration_feeds_every_input(tmp_path):
    import tensorflow as tf

    model, path = _two_input_onnx(tmp_path)
    x, v = images(6, seed=31), np.random.default_rng(0).random((6, 5), "float32") * 7
    y = np.zeros(6, "int32")
    kw = dict(input_names=["image", "vector"], input_ranks=[4, 2], batch_size=4)

    def drained(data):
        reader = ArrayCalibrationReader(data, **kw)
        out = []
        while (item := reader.get_next()) is not None:
            out.append({k: a.shape for k, a in item.items()})
        return out

    by_name = [
        {"image": (4, 16, 16, 3), "vector": (4, 5)},
        {"image": (2, 16, 16, 3), "vector": (2, 5)},
    ]
    assert drained({"image": x, "vector": v}) == by_name
    assert drained([x, v]) == by_name
    assert drained(tf.data.Dataset.from_tensor_slices(((x, v), y)).batch(4)) == by_name
    assert (
        drained(tf.data.Dataset.from_tensor_slices({"image": x, "vector": v}).batch(4)) == by_name
    )
    assert drained(iter([(x[:4], v[:4], y[:4]), (x[4:], v[4:], y[4:])])) == by_name
    with pytest.raises(ValueError, match="lacks graph inputs"):
        drained([{"image": x}])
    report = export.quantize_with_report(path, tmp_path / "two.int8.onnx", calibration=[x, v])
    assert report.calibration_samples == 6
    # The vector input's range (0..7) was calibrated from the data fed for it.
    assert _input_scale(report.path, "vector") * 255 == pytest.approx(v.max(), rel=1e-3)
    assert export.verify(model, report.path, [x, v], atol=np.inf).passed


def test_reduce_range_follows_the_cpu_and_is_overridable(onnx_file, tmp_path, monkeypatch):
    quant = importlib.import_module("dlmodels.export.quantize")
    monkeypatch.delenv(quant.REDUCE_RANGE_ENV, raising=False)
    monkeypatch.setattr(quant.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(quant, "_cpu_flags", lambda: {"avx2", "fma"})
    assert quant.default_reduce_range()[0] is True
    monkeypatch.setattr(quant, "_cpu_flags", lambda: {"avx2", "avx512_vnni"})
    assert quant.default_reduce_range() == (False, "x86 with avx512_vnni")
    monkeypatch.setattr(quant.platform, "machine", lambda: "aarch64")
    assert quant.default_reduce_range()[0] is False
    monkeypatch.setenv(quant.REDUCE_RANGE_ENV, "1")
    assert quant.default_reduce_range() == (True, "DLMODELS_REDUCE_RANGE=1")
    report = export.quantize_with_report(
        onnx_file, tmp_path / "rr.onnx", calibration=images(4), reduce_range=False
    )
    assert report.settings()["reduce_range"] is False
    assert report.settings()["reduce_range_reason"] == "argument"

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
    # The share of ops quantized: every conv runs in int8, the bilinear Resize too.
    summary = importlib.import_module("dlmodels.export.quantize").quantized_ops(int8_file)[
        "summary"
    ]
    assert summary["compute_share_int8"] == 1.0 and summary["compute_total"] == 5
    assert summary["by_op_type"]["Resize"] == {"int8": 1, "float": 0}


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


# -- the share of ops quantized, and calibration chosen on held-out data -----------------------

quantize_module = importlib.import_module("dlmodels.export.quantize")


def _save(nodes, inits, tmp_path, name, *, channels=4, size=8, outputs=None):
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, channels, size, size])
    shape = [None, channels, size, size]
    outs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)]
    initializers = [numpy_helper.from_array(np.asarray(a, "float32"), k) for k, a in inits.items()]
    graph = helper.make_graph(nodes, name, [x], outs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def test_quantized_ops_report_on_a_hand_built_graph(tmp_path):
    """x -> Conv c1 -> Add(+x) -> ConvTranspose ct -> Erf -> Conv c2 (excluded) -> MaxPool -> y,
    and Shape(c2) -> s. Worked out by hand: c1 and add run in int8; ct is wrapped in Q/DQ but
    onnxruntime has no int8 ConvTranspose kernel; Erf is no QDQ op type; c2 was excluded; the
    MaxPool only passes quantized data through, and its input (c2's output) is float; Shape
    reads no values (not applicable)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "x"], ["a"], name="add"),
        helper.make_node("ConvTranspose", ["a", "W3"], ["ct"], name="ct"),
        helper.make_node("Erf", ["ct"], ["e"], name="erf"),
        helper.make_node("Conv", ["e", "W2"], ["c2"], name="c2"),
        helper.make_node("MaxPool", ["c2"], ["y"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),  # noqa: E501
        helper.make_node("Shape", ["c2"], ["s"], name="shape"),
    ]  # fmt: skip
    inits = {
        "W1": rng.normal(0, 0.3, (4, 4, 3, 3)),
        "B1": rng.normal(0, 0.1, 4),
        "W2": rng.normal(0, 0.3, (4, 4, 1, 1)),
        "W3": rng.normal(0, 0.3, (4, 4, 1, 1)),
    }
    outs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 4, 4]),
        helper.make_tensor_value_info("s", TensorProto.INT64, [4]),
    ]
    fp32 = _save(nodes, inits, tmp_path, "hand", outputs=outs)
    x = rng.uniform(0, 1, (8, 4, 8, 8)).astype("float32")
    report = export.quantize_with_report(
        fp32, tmp_path / "hand.int8.onnx", calibration=x, nodes_to_exclude=["c2"]
    )
    cov = report.coverage
    assert report.settings()["coverage"] == cov and report.nodes_to_exclude == ["c2"]
    reasons = {f["name"]: f["reason"].split(":")[0] for f in cov["float"]}
    assert reasons == {"ct": "no int8 kernel", "erf": "op type", "c2": "excluded", "pool": "input"}
    assert "'c2' (from Conv 'c2')" in next(f for f in cov["float"] if f["name"] == "pool")["reason"]
    assert cov["by_op_type"] == {
        "Add": {"int8": 1, "float": 0},
        "Conv": {"int8": 1, "float": 1},
        "ConvTranspose": {"int8": 0, "float": 1},
        "Erf": {"int8": 0, "float": 1},
        "MaxPool": {"int8": 0, "float": 1},
    }
    assert (cov["int8_nodes"], cov["float_nodes"]) == (2, 4)
    assert cov["share_int8"] == pytest.approx(2 / 6)
    assert (cov["compute_int8"], cov["compute_total"]) == (1, 3)
    assert cov["not_applicable"] == {"Shape": 1}
    # Without asking onnxruntime, the ConvTranspose looks quantized (Q/DQ all around it).
    graph_only = quantize_module.quantized_ops(report.path, nodes_to_exclude=["c2"], runtime=False)
    assert graph_only["summary"]["by_op_type"]["ConvTranspose"] == {"int8": 1, "float": 0}
    # An op told not to quantize its output, read by a float op: the output is the reason.
    small = _save([*nodes[:2], helper.make_node("Erf", ["a"], ["y"], name="erf")],
                  {k: inits[k] for k in ("W1", "B1")}, tmp_path, "small")  # fmt: skip
    options = {"OpTypesToExcludeOutputQuantization": ["Add"]}
    cov = export.quantize_with_report(
        small, tmp_path / "small.int8.onnx", calibration=x, extra_options=options
    ).coverage
    assert [(f["name"], f["reason"]) for f in cov["float"]] == [
        ("add", "output: 'a' is read in float by Erf 'erf'"),
        ("erf", "op type: Erf is not quantized by onnxruntime's QDQ quantizer"),
    ]


def _identity_conv(tmp_path):
    """A 1x1 conv that copies its 3 input channels: the fp32 output is the input itself."""
    from onnx import helper

    node = helper.make_node("Conv", ["x", "W"], ["y"], name="copy")
    w = np.eye(3, dtype="float32")[:, :, None, None]
    return _save([node], {"W": w}, tmp_path, "identity", channels=3)


def _calibration_and_held_out():
    """Calibration: [0, 1] plus one outlier (100); held out: the deployment data, [0, 50]."""
    rng = np.random.default_rng(5)
    calib = rng.uniform(0, 1, (16, 3, 8, 8)).astype("float32")
    calib[0, 0, 0, 0] = 100.0
    held_out = rng.uniform(0, 50, (8, 3, 8, 8)).astype("float32")
    return calib, held_out


def _mae_vs_identity(path, x):
    import onnxruntime as ort

    (y,) = ort.InferenceSession(str(path)).run(None, {"x": x})
    return float(np.mean(np.abs(y.astype(np.float64) - x)))


def test_selection_scores_on_held_out_data(tmp_path):
    """Percentile 99.9 clips the outlier: best on the calibration data, but it clips the wide
    held-out data to ~1. MinMax keeps [0, 100]: coarse steps, yet best on held-out data. The
    selector must pick MinMax; scoring on the calibration data would pick Percentile."""
    fp32 = _identity_conv(tmp_path)
    calib, held_out = _calibration_and_held_out()
    grid = [
        {"calibration_method": "percentile", "percentile": 99.9},
        {"calibration_method": "minmax"},
    ]
    # Independent check of the premise: each candidate quantized on its own, scored by numpy
    # against the identity (the fp32 output), on both data sets.
    scores, alone = {}, {}
    for i, c in enumerate(grid):
        path = export.quantize_with_report(fp32, tmp_path / f"c{i}.onnx", calibration=calib, **c)
        scores[i] = (_mae_vs_identity(path.path, calib), _mae_vs_identity(path.path, held_out))
        alone[i] = path.settings()
    assert scores[0][0] < scores[1][0]  # on calibration data: percentile wins
    assert scores[1][1] < 0.1 * scores[0][1]  # on held-out data: minmax wins by far

    report = quantize_module.select_quantization(
        fp32, tmp_path / "best.onnx", calibration=calib, held_out=held_out, candidates=grid
    )
    sel = report.selection
    assert sel["chosen"] == 1 and report.calibration_method == "minmax"
    assert sel["metric"] == "mean_abs_error" and sel["held_out_samples"] == 8
    for i, entry in enumerate(sel["candidates"]):
        assert entry["score"] == pytest.approx(scores[i][1], rel=1e-4)
    assert _input_scale(report.path, "x") * 255 == pytest.approx(100.0, rel=1e-3)
    assert report.coverage["compute_share_int8"] == 1.0
    # A metric where greater is better flips the choice.
    flipped = quantize_module.select_quantization(
        fp32,
        tmp_path / "worst.onnx",
        calibration=calib,
        held_out=held_out,
        candidates=grid,
        greater_is_better=True,
    )
    assert flipped.selection["chosen"] == 0 and flipped.percentile == 99.9
    # The chosen file is described exactly as quantize_with_report describes the same settings.
    assert {**report.settings(), "selection": None} == alone[1]
    assert {**flipped.settings(), "selection": None} == alone[0]


def test_selection_default_grid_and_task_metric(onnx_file, tmp_path):
    """The default grid on the exported tiny segmenter with a caller's task metric (argmax
    agreement with fp32): every candidate scored, "first_last" resolved to the stem and the
    logits convs, the manifest settings JSON-safe."""
    import json

    def agreement(outputs, reference):
        return float(np.mean(outputs.argmax(-1) == reference.argmax(-1)))

    report = quantize_module.select_quantization(
        onnx_file,
        tmp_path / "auto.onnx",
        calibration=images(16, seed=40),
        held_out=images(8, seed=41),
        metric=agreement,
        greater_is_better=True,
    )
    table = report.selection["candidates"]
    assert len(table) == len(quantize_module.DEFAULT_CANDIDATES)
    assert all(0.5 <= e["score"] <= 1.0 for e in table), table
    assert report.selection["chosen"] == max(
        range(len(table)), key=lambda i: (table[i]["score"], -i)
    )
    excluded = table[-1]["settings"]["nodes_to_exclude"]
    names = quantize_module.compute_nodes(onnx_file)
    assert len(excluded) == 2 and set(excluded) == {names[0], names[-1]}
    graph = onnx.load(str(onnx_file)).graph
    kernel = {i.name: tuple(i.dims) for i in graph.initializer}
    shapes = {n.name: kernel[n.input[1]] for n in graph.node if n.name in excluded}
    # The stem reads the 3 image channels (3x3); the logits conv writes the 3 classes (1x1).
    assert shapes == {names[0]: (16, 3, 3, 3), names[-1]: (3, 16, 1, 1)}
    settings = json.loads(json.dumps(report.settings()))
    assert settings["selection"]["metric"] == "agreement"
    assert settings["coverage"]["compute_total"] == 5

    # Bad arguments: clear errors, no file written.
    tmp_path = tmp_path / "bad"
    tmp_path.mkdir()
    select = quantize_module.select_quantization
    with pytest.raises(ValueError, match="unknown keys"):
        select(onnx_file, tmp_path / "a.onnx", calibration=images(2), held_out=images(2),
               candidates=[{"method": "minmax"}])  # fmt: skip
    with pytest.raises(ValueError, match="calibration_method='kl'"):
        select(onnx_file, tmp_path / "a.onnx", calibration=images(2), held_out=images(2),
               candidates=[{"calibration_method": "kl"}])  # fmt: skip
    with pytest.raises(ValueError, match="held_out"):
        select(onnx_file, tmp_path / "a.onnx", calibration=images(2), held_out=None)
    with pytest.raises(ValueError, match="nodes_to_exclude names nodes"):
        export.quantize(onnx_file, tmp_path / "a.onnx", calibration=images(2),
                        nodes_to_exclude=["nope"])  # fmt: skip
    assert list(tmp_path.iterdir()) == []

"""ONNX export: graph names equal the Keras names, symbolic batch, parity in a fresh process."""

import sys
from pathlib import Path

import keras
import numpy as np
import onnx
import pytest
import tensorflow as tf

from dlmodels import export
from tests.export._tiny import IMAGE_SHAPE, images, tiny_segmenter
from tests.helpers import assert_onnx_parity


def _io(path):
    graph = onnx.load(str(path)).graph
    init = {i.name for i in graph.initializer}

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    return (
        {i.name: dims(i) for i in graph.input if i.name not in init},
        {o.name: dims(o) for o in graph.output},
        [o.name for o in graph.output],
    )


def test_graph_names_and_symbolic_batch(model, onnx_file):
    inputs, outputs, _ = _io(onnx_file)
    assert inputs == {"image": ["batch", *IMAGE_SHAPE]}
    assert outputs == {"logits": ["batch", *IMAGE_SHAPE[:2], 3]}
    assert list(inputs) == [t.name for t in model.inputs]
    assert list(outputs) == list(model.output_names)
    onnx.checker.check_model(onnx.load(str(onnx_file)))


@pytest.mark.parametrize("batch", [1, 3])
def test_parity_fresh_process(model, onnx_file, batch):
    x = images(batch, seed=20 + batch)
    report = export.verify(model, onnx_file, x, atol=1e-4)
    assert report.passed, report
    assert report.max_abs_error <= 1e-4
    assert report.n_samples == batch
    assert report.agreement == 1.0


def test_multi_output_names_order_and_parity(multi_model, tmp_path):
    path = export.to_onnx(multi_model, tmp_path / "two.onnx")
    _, outputs, order = _io(path)
    # tf.nest sorts dict keys ("label" < "logits"); the graph must keep the Keras order.
    assert order == list(multi_model.output_names) == ["logits", "label"]
    assert outputs["label"] == ["batch", 4]
    x = images(3, seed=5)
    report = export.verify(multi_model, path, x, atol=1e-4)
    assert report.passed, report
    got = export.onnx_predict(path, x)
    expected = multi_model.predict(x, verbose=0)
    for g, e in zip(got, expected, strict=True):
        assert np.max(np.abs(g - e)) <= 1e-4


def test_fresh_process_equals_in_process(onnx_file):
    x = images(2, seed=6)
    (fresh,) = export.onnx_predict(onnx_file, x, fresh_process=True)
    (local,) = export.onnx_predict(onnx_file, {"image": x})
    np.testing.assert_array_equal(fresh, local)


def test_worker_does_not_import_tensorflow(onnx_file):
    from dlmodels.export.verify import _run_worker

    _, names, tf_loaded = _run_worker(onnx_file, images(1))
    assert names == ["logits"]
    assert tf_loaded is False


def test_shared_helper_accepts_our_api(model):
    report = assert_onnx_parity(model, images(2, seed=7))
    assert report.max_abs_error <= 1e-4


def _dense_model():
    inp = keras.Input((4,), name="x")
    return keras.Model(inp, keras.layers.Dense(3, name="scores")(inp), name="dense")


def test_bad_opset_is_refused_before_work(model, tmp_path):
    for opset in (12, 19, 7, 99, 17.0, "17", True, None):
        with pytest.raises(ValueError, match=r"opset=.*13\.\.18"):
            export.to_onnx(model, tmp_path / "m.onnx", opset=opset)
    # Checked before the target: an existing file does not hide the opset error.
    (tmp_path / "m.onnx").write_bytes(b"old")
    with pytest.raises(ValueError, match=r"opset=12 is out of range"):
        export.to_onnx(model, tmp_path / "m.onnx", opset=12, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert (tmp_path / "m.onnx").read_bytes() == b"old"


def test_opset_boundaries_are_written_and_run(tmp_path):
    from dlmodels.export.onnx import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

    assert (MIN_OPSET, DEFAULT_OPSET, MAX_OPSET) == (13, 17, 18)
    model = _dense_model()
    x = np.random.default_rng(0).random((3, 4), "float32")
    for opset in (13, 18, np.int64(17)):
        path = export.to_onnx(model, tmp_path / f"m{opset}.onnx", opset=opset)
        declared = {o.domain: o.version for o in onnx.load(str(path)).opset_import}
        assert declared[""] == opset
        (got,) = export.onnx_predict(path, x)
        np.testing.assert_allclose(got, model.predict(x, verbose=0), atol=1e-5)


@pytest.fixture(scope="module")
def tiny_unet():
    from dlmodels.models import registry
    from tests.export._tiny import _randomize_norm_stats

    keras.utils.set_random_seed(0)
    unet = registry.get(
        "unet", input_shape=(32, 32, 3), num_classes=3, depth=2, base_filters=4,
        upsampling="bilinear",
    )  # fmt: skip
    _randomize_norm_stats(unet, 0)
    return unet


def _unet_images(n, seed):
    return np.random.default_rng(seed).uniform(0, 1, (n, 32, 32, 3)).astype("float32")


@pytest.fixture(scope="module")
def unet_onnx(tiny_unet, tmp_path_factory):
    return export.to_onnx(tiny_unet, tmp_path_factory.mktemp("unet") / "plain.onnx")


def test_simplify_keeps_parity_and_never_grows_the_graph(tiny_unet, unet_onnx, tmp_path):
    import shutil

    from dlmodels.export.onnx import simplify_onnx

    simple = Path(shutil.copy(unet_onnx, tmp_path / "simple.onnx"))
    report = simplify_onnx(tiny_unet, simple, samples=_unet_images(2, 1))
    before, after = onnx.load(str(unet_onnx)), onnx.load(str(simple))
    assert report.nodes_before == len(before.graph.node)
    assert report.nodes_after == len(after.graph.node) <= len(before.graph.node)
    assert report.max_abs_error <= 1e-4 and report.n_samples == 2
    props = {p.key: p.value for p in after.metadata_props}
    assert props["dlmodels.simplified_by"] == report.tool and report.tool.startswith("onnxslim ")
    assert int(props["dlmodels.nodes_before"]) == len(before.graph.node)
    onnx.checker.check_model(after)
    assert export.onnx_io(simple) == export.onnx_io(unet_onnx)  # names, symbolic batch, dtypes
    # Parity re-checked on other samples, in a fresh onnxruntime process.
    verified = export.verify(tiny_unet, simple, _unet_images(3, 2), atol=1e-4)
    assert verified.passed and verified.max_abs_error <= 1e-4, verified


def test_simplification_that_breaks_parity_is_rejected_and_file_kept(
    tiny_unet, unet_onnx, tmp_path, monkeypatch
):
    import shutil

    import onnxslim

    from dlmodels.export.onnx import SimplificationError, simplify_onnx

    real = onnxslim.slim

    def breaking_slim(model_proto, *args, **kwargs):
        slimmed = real(model_proto, *args, **kwargs)
        init = next(i for i in slimmed.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
        arr = onnx.numpy_helper.to_array(init)  # a "simplification" that shifts some weights
        init.CopyFrom(onnx.numpy_helper.from_array(arr + 0.5, init.name))
        return slimmed

    path = Path(shutil.copy(unet_onnx, tmp_path / "m.onnx"))
    original = path.read_bytes()
    monkeypatch.setattr(onnxslim, "slim", breaking_slim)
    with pytest.raises(SimplificationError, match=r"broke parity .* unsimplified file .* kept"):
        simplify_onnx(tiny_unet, path, samples=_unet_images(2, 3))
    assert path.read_bytes() == original
    with pytest.raises(SimplificationError, match="broke parity"):
        export.to_onnx(tiny_unet, tmp_path / "n.onnx", simplify=True)  # seeded stand-in samples
    assert export.verify(tiny_unet, tmp_path / "n.onnx", _unet_images(2, 4)).passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "n.onnx"]  # no debris


def test_simplify_without_samples_refuses_free_dims_before_writing(tmp_path):
    inp = keras.Input((None, None, 3), name="image")
    model = keras.Model(inp, keras.layers.Conv2D(2, 1, name="c")(inp))
    with pytest.raises(ValueError, match=r"free dimensions.*samples="):
        export.to_onnx(model, tmp_path / "m.onnx", simplify=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fault", ["io_shape", "keras_fails"])
def test_simplify_rejects_changed_io_and_wraps_parity_failures(
    fault, tiny_unet, unet_onnx, tmp_path, monkeypatch
):
    import shutil

    import onnxslim

    from dlmodels.export.onnx import SimplificationError, simplify_onnx

    verify = sys.modules["dlmodels.export.verify"]  # the module (export.verify is a function)
    real = onnxslim.slim

    def renaming_slim(model_proto, *args, **kwargs):
        slimmed = real(model_proto, *args, **kwargs)
        slimmed.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"  # same names
        return slimmed

    def failing(*args, **kwargs):
        raise ValueError("injected: Keras cannot run these samples")

    if fault == "io_shape":
        monkeypatch.setattr(onnxslim, "slim", renaming_slim)
        match = r"changed the graph IO .*'N'.*unsimplified file .* kept"
    else:
        monkeypatch.setattr(verify, "keras_outputs", failing)
        match = r"parity check .*injected.*unsimplified file .* kept"
    path = Path(shutil.copy(unet_onnx, tmp_path / "m.onnx"))
    original = path.read_bytes()
    with pytest.raises(SimplificationError, match=match):
        simplify_onnx(tiny_unet, path, samples=_unet_images(1, 3))
    assert path.read_bytes() == original


class _Igamma(keras.layers.Layer):
    """An op tf2onnx has no mapping for (stands in for any unsupported layer)."""

    def call(self, x):
        return tf.math.igamma(tf.abs(x) + 1.0, tf.abs(x) + 1.0)


def test_unsupported_op_is_surfaced_with_its_name(tmp_path):
    inp = keras.Input((4,), name="x")
    model = keras.Model(inp, _Igamma(name="odd")(inp))
    with pytest.raises(export.UnsupportedOpError, match=r"Igamma .*node"):
        export.to_onnx(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("style", ["list", "dict"])
def test_multi_input_models(style, tmp_path):
    image, cond = keras.Input((8, 8, 3), name="image"), keras.Input((5,), name="cond")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, name="conv")(image))
    scores = keras.layers.Dense(3, name="scores")(keras.layers.Concatenate()([x, cond]))
    inputs = [image, cond] if style == "list" else {"image": image, "cond": cond}
    model = keras.Model(inputs, scores)
    rng = np.random.default_rng(0)
    feeds = {"image": rng.random((3, 8, 8, 3), "float32"), "cond": rng.random((3, 5), "float32")}

    sm = export.to_saved_model(model, tmp_path / "sm")
    got = tf.saved_model.load(str(sm)).signatures["serving_default"](
        **{k: tf.constant(v) for k, v in feeds.items()}
    )["scores"]
    expected = model.predict(
        feeds if style == "dict" else [feeds["image"], feeds["cond"]], verbose=0
    )
    assert np.max(np.abs(got.numpy() - expected)) <= 1e-5

    path = export.to_onnx(model, tmp_path / "m.onnx")
    io = export.onnx_io(path)
    assert [i["name"] for i in io["inputs"]] == [t.name for t in model.inputs]
    assert export.verify(model, path, feeds).passed
    assert export.verify(model, path, [feeds[t.name] for t in model.inputs]).passed


def test_mixed_precision_model_exports_as_float32(tmp_path):
    """tf2onnx mistypes float16 bilinear resizes (ORT then refuses the file); export a float32
    copy with the same weights instead."""
    keras.config.set_dtype_policy("mixed_float16")
    try:
        half = tiny_segmenter(0, filters=8)
    finally:
        keras.config.set_dtype_policy("float32")
    path = export.to_onnx(half, tmp_path / "half.onnx")
    io = export.onnx_io(path)
    assert io["outputs"][0]["dtype"] == "float32"
    # Against the float16 Keras model: fp16 rounding, not an export error.
    report = export.verify(half, path, images(2), atol=1e-2)
    assert report.passed and report.agreement == 1.0, report
    float_twin = tiny_segmenter(0, filters=8)
    float_twin.set_weights(half.get_weights())
    assert export.verify(float_twin, path, images(2), atol=1e-4).passed


def test_dict_output_model_uses_output_names(tmp_path):
    inp = keras.Input((4,), name="x")
    model = keras.Model(
        inp,
        {"zeta": keras.layers.Dense(3, name="dense_a")(inp), "alpha": keras.layers.Dense(2)(inp)},
    )
    x = np.random.default_rng(0).random((3, 4), "float32")
    sm = export.to_saved_model(model, tmp_path / "sm")
    out = tf.saved_model.load(str(sm)).signatures["serving_default"](x=tf.constant(x))
    assert sorted(out) == sorted(model.output_names)
    path = export.to_onnx(model, tmp_path / "m.onnx")
    shapes = {o["name"]: o["shape"] for o in export.onnx_io(path)["outputs"]}
    assert shapes["dense_a"] == ["batch", 3]
    assert export.verify(model, path, x).passed

"""ONNX export: graph names equal the Keras names, symbolic batch, parity in a fresh process."""

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


def test_bad_opset_is_refused_before_work(model, tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export.to_onnx(model, tmp_path / "m.onnx", opset=99)
    assert not (tmp_path / "m.onnx").exists()


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

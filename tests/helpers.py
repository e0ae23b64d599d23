"""The shared checks every layer and model goes through (in the spirit of keras-hub's TestCase).

`run_layer_test` and `run_model_test` check: output shape, `get_config` -> `from_config`
round-trip, `.keras` save/load with identical outputs, the mixed_float16 policy (fp32 variables,
fp16 compute, finite outputs close to fp32), and for models SavedModel and ONNX parity against
Keras in a fresh onnxruntime process.
"""

from __future__ import annotations

import os
import tempfile

import keras
import numpy as np
import tensorflow as tf


def _random_inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype("float32")


def _wrap(layer, input_shape):
    inp = keras.Input(shape=input_shape[1:], batch_size=None)
    return keras.Model(inp, layer(inp))


def assert_config_roundtrip(obj):
    config = obj.get_config()
    clone = type(obj).from_config(config)
    assert clone.get_config() == config, "from_config(get_config()) changed the config"
    return clone


def assert_keras_roundtrip(model, x, atol=1e-6):
    """Save to .keras, load with safe_mode (no Lambda / pickled code), compare inference outputs."""
    expected = model.predict(x, verbose=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
    got = loaded.predict(x, verbose=0)
    for e, g in zip(keras.tree.flatten(expected), keras.tree.flatten(got), strict=True):
        np.testing.assert_allclose(g, e, atol=atol, rtol=0)
    return loaded


def assert_mixed_precision(build, x, rtol=0.05):
    """Build under mixed_float16: variables stay fp32, compute is fp16, outputs finite.

    `build` is a zero-argument callable returning a model or layer (called twice: once per policy).
    """
    keras.utils.set_random_seed(7)
    ref = build()
    ref_out = ref(x, training=False)
    weights = ref.get_weights()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(7)
        obj = build()
        out = obj(x, training=False)
        obj.set_weights(weights)
        out = obj(x, training=False)
        assert all(v.dtype == "float32" for v in obj.weights), "variables must stay float32"
        for o, r in zip(keras.tree.flatten(out), keras.tree.flatten(ref_out), strict=True):
            o = keras.ops.convert_to_numpy(keras.ops.cast(o, "float32"))
            r = keras.ops.convert_to_numpy(r)
            assert np.all(np.isfinite(o)), "non-finite output under mixed_float16"
            scale = np.max(np.abs(r)) + 1e-6
            assert np.max(np.abs(o - r)) / scale < rtol, "fp16 output far from fp32 output"
        return obj
    finally:
        keras.config.set_dtype_policy("float32")


def assert_saved_model_parity(model, x, atol=1e-5):
    from dlmodels import export

    expected = model.predict(x, verbose=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sm")
        export.to_saved_model(model, path)
        loaded = tf.saved_model.load(path)
        fn = loaded.signatures["serving_default"]
        feeds = {model.inputs[0].name: tf.constant(x)} if len(model.inputs) == 1 else None
        assert feeds is not None, "multi-input SavedModel parity: pass inputs explicitly"
        out = fn(**feeds)
    got = [out[k].numpy() for k in model.output_names]
    for e, g in zip(keras.tree.flatten(expected), got, strict=True):
        np.testing.assert_allclose(g, e, atol=atol, rtol=0)


def assert_onnx_parity(model, x, atol=1e-4):
    from dlmodels import export

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        export.to_onnx(model, path)
        report = export.verify(model, path, x, atol=atol)
    assert report.max_abs_error <= atol, report
    return report


def run_layer_test(
    layer_cls,
    init_kwargs,
    input_shape,
    expected_output_shape,
    *,
    mixed_precision=True,
    keras_roundtrip=True,
):
    """Shape, config round-trip, .keras round-trip and mixed precision for one layer."""
    x = _random_inputs(input_shape)
    layer = layer_cls(**init_kwargs)
    y = layer(x, training=False)
    assert tuple(y.shape) == tuple(expected_output_shape), (tuple(y.shape), expected_output_shape)
    if hasattr(layer, "compute_output_shape"):
        assert tuple(layer.compute_output_shape(input_shape)) == tuple(expected_output_shape)
    assert_config_roundtrip(layer)
    if keras_roundtrip:
        assert_keras_roundtrip(_wrap(layer_cls(**init_kwargs), input_shape), x)
    if mixed_precision:
        assert_mixed_precision(lambda: _wrap(layer_cls(**init_kwargs), input_shape), x)
    return layer


def run_model_test(
    build,
    input_shape,
    expected_output_shape,
    *,
    mixed_precision=True,
    saved_model=True,
    onnx=True,
    onnx_atol=1e-4,
):
    """Every check for a model; `build` is a zero-argument callable returning a fresh model."""
    x = _random_inputs(input_shape)
    model = build()
    y = model(x, training=False)
    shapes = [tuple(t.shape) for t in keras.tree.flatten(y)]
    expected = (
        [tuple(expected_output_shape)]
        if isinstance(expected_output_shape[0], int | type(None))
        else [tuple(s) for s in expected_output_shape]
    )
    assert shapes == expected, (shapes, expected)
    config = model.get_config()
    clone = model.__class__.from_config(config)
    assert len(clone.weights) == len(model.weights)
    assert_keras_roundtrip(model, x)
    if mixed_precision:
        assert_mixed_precision(build, x)
    if saved_model:
        assert_saved_model_parity(model, x)
    if onnx:
        assert_onnx_parity(model, x, atol=onnx_atol)
    return model

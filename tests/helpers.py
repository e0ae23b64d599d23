"""The shared checks every layer and model goes through (in the spirit of keras-hub's TestCase).

`run_layer_test` and `run_model_test` check, on small inputs:

- output shape (and `compute_output_shape` for layers);
- config: `from_config(get_config())` gives an equal config, and the clone with the original's
  weights computes the same outputs (a dropped or mis-restored constructor argument fails);
- `.keras` save/load (safe mode) with identical outputs and config;
- mixed_float16: variables float32; every layer, sublayer and intermediate output computes in
  float16 except the declared float32 heads; model outputs float32 (`float32_outputs`); outputs
  finite and close to float32;
- one training step: every trainable weight gets a finite gradient, and an SGD step changes the
  inference output;
- for models, SavedModel and ONNX parity against Keras (eager Keras and `model.predict`).

Every parity check (.keras, config clone, SavedModel, ONNX) first gives the normalization
variables non-trivial values (`randomize_norm_statistics`): fresh BatchNorm statistics (mean 0,
variance 1, gamma 1, beta 0) make the layer an identity, so an artifact that dropped or
mis-restored a norm layer would pass. Only variables still at their initial value are changed,
so a shared fixture model or a trained one keeps its weights.

Tolerances are absolute for outputs of order 1 and relative to the largest |output| beyond that
(`atol * max(1, max|output|)`): float32 rounding grows with the magnitude, and ResNet logits with
random statistics reach ~30.

Inputs are described by specs: a shape `(2, 32, 32, 3)` (float32 normal noise), or a list of
`(shape, dtype)` / `(shape, dtype, maxval)` tuples for several and integer inputs, e.g.
`[((None, 32, 32, 3), "float32"), ((None,), "int32", 10)]` (a None batch size becomes 2; integer
inputs are uniform in [0, maxval), maxval 10 by default).
"""

from __future__ import annotations

import copy
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf
from keras.src.models.functional import Functional

DEFAULT_BATCH = 2
_NORM_VARIABLES = {
    # variable name: (value of a fresh layer, random replacement)
    "moving_mean": (0.0, lambda rng, shape: rng.normal(0.0, 0.2, shape)),
    "moving_variance": (1.0, lambda rng, shape: rng.uniform(0.5, 2.0, shape)),
    "gamma": (1.0, lambda rng, shape: rng.uniform(0.6, 1.4, shape)),
    "beta": (0.0, lambda rng, shape: rng.normal(0.0, 0.2, shape)),
}


# -- inputs ------------------------------------------------------------------------------------
def _is_shape(obj) -> bool:
    return isinstance(obj, tuple | list) and all(
        d is None or (isinstance(d, int) and not isinstance(d, bool)) for d in obj
    )


def _is_spec(obj) -> bool:
    return (
        isinstance(obj, tuple | list)
        and len(obj) in (2, 3)
        and _is_shape(obj[0])
        and isinstance(obj[1], str)
    )


def normalize_specs(inputs) -> tuple[list[tuple[tuple, str, int | None]], bool]:
    """([(shape, dtype, maxval)], single) from a shape, one spec or a list of specs."""
    if _is_shape(inputs) and inputs and not _is_shape(inputs[0]):
        return [(tuple(inputs), "float32", None)], True
    if _is_spec(inputs):
        items, single = [inputs], True
    else:
        items, single = list(inputs), False
    specs = []
    for item in items:
        if _is_shape(item):
            specs.append((tuple(item), "float32", None))
        elif _is_spec(item):
            specs.append((tuple(item[0]), str(item[1]), item[2] if len(item) == 3 else None))
        else:
            raise ValueError(f"input spec {item!r}: want a shape or (shape, dtype[, maxval])")
    return specs, single


def make_inputs(specs, *, batch=DEFAULT_BATCH, seed=0) -> list[np.ndarray]:
    """Random arrays for normalized specs: float normal noise, integers in [0, maxval)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for shape, dtype, maxval in specs:
        shape = tuple(batch if (i == 0 and d is None) else d for i, d in enumerate(shape))
        if any(d is None for d in shape):
            raise ValueError(f"input shape {shape}: only the batch dimension may be None")
        if np.issubdtype(np.dtype(dtype), np.integer):
            arrays.append(rng.integers(0, maxval or 10, shape).astype(dtype))
        elif dtype == "bool":
            arrays.append(rng.integers(0, 2, shape).astype(bool))
        else:
            arrays.append(rng.standard_normal(shape).astype(dtype))
    return arrays


def _symbolic_inputs(specs):
    return [keras.Input(shape=tuple(s[1:]), dtype=dtype) for s, dtype, _ in specs]


def pack(model, arrays: list):
    """Arrays in `model.inputs` order, arranged the way the model takes them."""
    if len(arrays) == 1:
        return arrays[0]
    struct = getattr(model, "_inputs_struct", None)
    if isinstance(struct, dict):
        return keras.tree.pack_sequence_as(struct, arrays)
    return list(arrays)


def _wrap(layer, specs):
    """A functional model around one layer, for saving / mixed precision / training checks."""
    specs = normalize_specs(specs)[0] if not isinstance(specs, list) else specs
    inputs = _symbolic_inputs(specs)
    outputs = layer(inputs[0] if len(inputs) == 1 else inputs)
    return keras.Model(inputs[0] if len(inputs) == 1 else inputs, outputs)


def _numpy_list(outputs) -> list[np.ndarray]:
    return [np.asarray(keras.ops.convert_to_numpy(o)) for o in keras.tree.flatten(outputs)]


def _scale(outputs) -> float:
    """max(1, largest |value|): tolerances are absolute for outputs of order 1 and relative for
    larger ones (float32 rounding grows with the magnitude; random-statistics logits reach 30)."""
    arrays = [a for a in _numpy_list(outputs) if a.size and np.issubdtype(a.dtype, np.floating)]
    return max([1.0] + [float(np.max(np.abs(a))) for a in arrays])


def _assert_all_close(got, expected, atol, what):
    got, expected = _numpy_list(got), _numpy_list(expected)
    assert len(got) == len(expected), f"{what}: {len(got)} outputs, expected {len(expected)}"
    tol = atol * _scale(expected)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.shape == e.shape, f"{what}: output {i} has shape {g.shape}, expected {e.shape}"
        err = float(np.max(np.abs(g.astype("float64") - e.astype("float64")))) if e.size else 0.0
        assert err <= tol, f"{what}: output {i} differs by {err:.3e} (tolerance {tol:.3g})"


def _shape_matches(actual, expected) -> bool:
    return len(actual) == len(expected) and all(
        e is None or a == e for a, e in zip(actual, expected, strict=True)
    )


def _expected_shapes(expected_output_shape):
    if _is_shape(expected_output_shape) and not _is_shape(expected_output_shape[0]):
        return [tuple(expected_output_shape)]
    return [tuple(s) for s in expected_output_shape]


# -- normalization statistics ------------------------------------------------------------------
def randomize_norm_statistics(obj, *, seed=0, only_fresh=True) -> int:
    """Give normalization variables (moving mean / variance, gamma, beta) random values in place.

    Fresh BatchNorm statistics make the layer the identity, which hides an export or a save that
    drops or mis-restores it; with these values a lost norm changes the outputs by O(0.1..1).
    `only_fresh` leaves variables that already differ from their initial value alone (models that
    are shared by several tests, or trained ones, keep their weights). Returns how many variables
    were changed.
    """
    rng = np.random.default_rng(seed)
    changed = 0
    for v in obj.weights:
        name = v.path.rsplit("/", 1)[-1]
        if name not in _NORM_VARIABLES:
            continue
        fresh_value, draw = _NORM_VARIABLES[name]
        value = keras.ops.convert_to_numpy(v)
        if only_fresh and not np.all(value == fresh_value):
            continue
        v.assign(draw(rng, tuple(v.shape)).astype(value.dtype))
        changed += 1
    return changed


def _json_form(obj):
    if isinstance(obj, dict):
        return {k: _json_form(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_form(v) for v in obj]
    return obj


# -- config ------------------------------------------------------------------------------------
def assert_config_roundtrip(obj):
    """`from_config(get_config())` must reproduce the config exactly; returns the clone."""
    config = obj.get_config()
    clone = type(obj).from_config(copy.deepcopy(config))  # Functional.from_config pops keys
    got = clone.get_config()
    if got != config:
        diff = sorted(k for k in set(config) | set(got) if config.get(k, "-") != got.get(k, "-"))
        raise AssertionError(f"from_config(get_config()) changed the config at keys {diff}")
    return clone


def assert_clone_computes_the_same(original, clone, x, atol=1e-6):
    """The clone with the original's weights must compute the original's outputs."""
    if not clone.built:
        clone(x, training=False)
    clone.set_weights(original.get_weights())
    _assert_all_close(
        clone(x, training=False),
        original(x, training=False),
        atol,
        "config clone with copied weights",
    )


# -- .keras ------------------------------------------------------------------------------------
def assert_keras_roundtrip(model, x, atol=1e-6):
    """Save to .keras, load with safe_mode (no Lambda / pickled code), compare inference outputs
    (eager and `predict`) and the config. Norm statistics are randomized first (if fresh)."""
    randomize_norm_statistics(model)
    expected = model(x, training=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
    _assert_all_close(loaded(x, training=False), expected, atol, ".keras reload (eager)")
    _assert_all_close(loaded.predict(x, verbose=0), expected, max(atol, 1e-5), ".keras (predict)")
    # JSON turns tuples into lists; anything else that differs is a config the file lost.
    assert _json_form(loaded.get_config()) == _json_form(model.get_config()), (
        ".keras reload changed the config"
    )
    return loaded


# -- mixed precision ---------------------------------------------------------------------------
def _sublayers(layer):
    return layer._flatten_layers(include_self=False, recursive=False)


def _check_policies(layer, allowed_float32, path, problems):
    for sub in _sublayers(layer):
        if isinstance(sub, keras.layers.InputLayer):
            continue
        name = f"{path}/{sub.name}" if path else sub.name
        allowed = name in allowed_float32 or sub.name in allowed_float32
        if sub.compute_dtype != "float16" and not allowed:
            problems.append(f"{name} computes in {sub.compute_dtype}")
        if allowed:
            continue  # a float32 head's own sublayers follow its policy
        _check_policies(sub, allowed_float32, name, problems)


def _output_layers(model):
    return {t._keras_history[0].name for t in model.outputs if hasattr(t, "_keras_history")}


def _check_intermediate_outputs(model, x, allowed_float32, problems):
    """Run every (singly-used) top-level layer's output and check its dtype."""
    probes = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer) or len(layer._inbound_nodes) != 1:
            continue
        for t in keras.tree.flatten(layer.output):
            probes.append((layer, t))
    if not probes:
        return
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    probe = keras.Model(inputs, [t for _, t in probes])
    values = keras.tree.flatten(probe(x, training=False))
    for (layer, _), value in zip(probes, values, strict=True):
        dtype = keras.backend.standardize_dtype(value.dtype)
        if "float" not in dtype:
            continue
        want = "float32" if layer.name in allowed_float32 else "float16"
        if dtype != want:
            problems.append(f"output of {layer.name} is {dtype}, expected {want}")


def assert_mixed_precision(
    build, x, rtol=0.05, *, reference=None, float32_outputs=False, float32_layers=()
):
    """Build under mixed_float16 and check the policy is really applied.

    Variables stay float32; every layer and sublayer computes in float16, and for functional
    models every intermediate (top-level) layer output is float16, except the layers producing
    the model outputs when `float32_outputs` (then those outputs must be float32: the declared
    float32 heads) and the layers named in `float32_layers`. Outputs are finite and close to the
    float32 `reference` (built with `build` under float32 when not given) with copied weights.

    `build` is a zero-argument callable returning a model or layer.
    """
    if reference is None:
        keras.utils.set_random_seed(7)
        reference = build()
        reference(x, training=False)
        randomize_norm_statistics(reference)
    ref_out = reference(x, training=False)
    weights = reference.get_weights()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(7)
        obj = build()
        obj(x, training=False)
        obj.set_weights(weights)
        out = obj(x, training=False)
        bad_vars = [v.path for v in obj.weights if v.dtype != "float32"]
        assert not bad_vars, f"variables must stay float32 under mixed_float16: {bad_vars}"
        allowed = set(float32_layers)
        if float32_outputs and isinstance(obj, keras.Model):
            allowed |= _output_layers(obj)
        problems = []
        _check_policies(obj, allowed, "", problems)
        if isinstance(obj, Functional):
            _check_intermediate_outputs(obj, x, allowed, problems)
        for i, o in enumerate(keras.tree.flatten(out)):
            dtype = keras.backend.standardize_dtype(o.dtype)
            want = "float32" if float32_outputs else "float16"
            if "float" in dtype and dtype != want:
                problems.append(f"model output {i} is {dtype}, expected {want}")
        assert not problems, "mixed_float16 not applied: " + "; ".join(problems)
        for o, r in zip(keras.tree.flatten(out), keras.tree.flatten(ref_out), strict=True):
            o = keras.ops.convert_to_numpy(keras.ops.cast(o, "float32"))
            r = keras.ops.convert_to_numpy(r)
            assert np.all(np.isfinite(o)), "non-finite output under mixed_float16"
            scale = np.max(np.abs(r)) + 1e-6
            err = np.max(np.abs(o - r)) / scale
            assert err < rtol, f"fp16 output far from fp32 output (relative {err:.3g})"
        return obj
    finally:
        keras.config.set_dtype_policy("float32")


# -- one training step -------------------------------------------------------------------------
def assert_train_step(model, x, *, learning_rate=0.05, seed=0):
    """One SGD step on a squared error to random targets: every trainable weight gets a gradient
    that is not None and finite, and the step changes the inference output.

    Non-trainable state (BatchNorm statistics, seed generators) is restored after the forward pass
    so that only the SGD update can change the output. Mutates `model`'s weights.
    """
    weights = list(model.trainable_weights)
    assert weights, f"{model.name} has no trainable weights"
    frozen = [(v, keras.ops.convert_to_numpy(v)) for v in model.non_trainable_variables]
    before = _numpy_list(model(x, training=False))
    rng = np.random.default_rng(seed + 7919)  # not make_inputs' stream: targets != inputs
    targets = [rng.standard_normal(o.shape).astype("float32") for o in before]
    with tf.GradientTape() as tape:
        outputs = keras.tree.flatten(model(x, training=True))
        loss = tf.add_n(
            [
                tf.reduce_mean(tf.square(tf.cast(o, "float32") - t))
                for o, t in zip(outputs, targets, strict=True)
                if o.dtype.is_floating
            ]
        )
    grads = tape.gradient(loss, weights)
    missing = [w.path for w, g in zip(weights, grads, strict=True) if g is None]
    assert not missing, f"no gradient for trainable weights {missing}"
    nonfinite = [
        w.path
        for w, g in zip(weights, grads, strict=True)
        if not np.all(np.isfinite(keras.ops.convert_to_numpy(tf.convert_to_tensor(g))))
    ]
    assert not nonfinite, f"non-finite gradient for {nonfinite}"
    keras.optimizers.SGD(learning_rate).apply_gradients(zip(grads, weights, strict=True))
    for v, value in frozen:
        v.assign(value)
    after = _numpy_list(model(x, training=False))
    change = max(float(np.max(np.abs(a - b))) for a, b in zip(after, before, strict=True))
    assert change > 1e-6, "an SGD step did not change the output"


# -- export parity -----------------------------------------------------------------------------
def _as_list(model, x) -> list:
    if isinstance(x, dict):
        return [x[t.name] for t in model.inputs]
    return list(x) if isinstance(x, list | tuple) else [x]


def assert_saved_model_parity(model, x, atol=1e-5):
    """SavedModel `serving_default` (inputs by name) against eager Keras and `predict`.
    Norm statistics are randomized first (if fresh). `x`: an array, a list in input order or a
    dict by input name."""
    from dlmodels import export

    randomize_norm_statistics(model)
    arrays = _as_list(model, x)
    packed = pack(model, arrays)
    eager = _numpy_list(model(packed, training=False))
    predicted = _numpy_list(model.predict(packed, verbose=0))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sm")
        export.to_saved_model(model, path)
        loaded = tf.saved_model.load(path)
        fn = loaded.signatures["serving_default"]
        feeds = {t.name: tf.constant(a) for t, a in zip(model.inputs, arrays, strict=True)}
        out = fn(**feeds)
        got = [out[k].numpy() for k in model.output_names]
    _assert_all_close(got, eager, atol, "SavedModel vs eager Keras")
    _assert_all_close(got, predicted, atol, "SavedModel vs Keras predict")


def assert_onnx_parity(model, x, atol=1e-4):
    """ONNX (fresh onnxruntime process, `export.verify`) against `predict`, and (in-process
    onnxruntime) against eager Keras. Norm statistics are randomized first (if fresh)."""
    from dlmodels import export

    randomize_norm_statistics(model)
    arrays = _as_list(model, x)
    eager = _numpy_list(model(pack(model, arrays), training=False))
    atol = atol * _scale(eager)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        export.to_onnx(model, path)
        report = export.verify(model, path, arrays if len(arrays) > 1 else arrays[0], atol=atol)
        got = export.onnx_predict(path, arrays if len(arrays) > 1 else arrays[0])
    assert report.max_abs_error <= atol, report
    _assert_all_close(got, eager, atol / _scale(eager), "ONNX vs eager Keras")
    return report


# -- the runners -------------------------------------------------------------------------------
def run_layer_test(
    layer_cls,
    init_kwargs,
    inputs,
    expected_output_shape,
    *,
    mixed_precision=True,
    keras_roundtrip=True,
    train_step=True,
    float32_layers=(),
):
    """Shape, config round trip (+ clone outputs), .keras round trip, mixed precision (float16
    everywhere) and one training step for one layer. `inputs`: a shape or input specs (module
    docstring)."""
    specs, _ = normalize_specs(inputs)
    arrays = make_inputs(specs)
    x = arrays[0] if len(arrays) == 1 else arrays
    layer = layer_cls(**init_kwargs)
    layer(x, training=False)
    randomize_norm_statistics(layer)
    y = layer(x, training=False)
    shapes = [tuple(t.shape) for t in keras.tree.flatten(y)]
    expected = _expected_shapes(expected_output_shape)
    assert len(shapes) == len(expected) and all(
        _shape_matches(a, e) for a, e in zip(shapes, expected, strict=True)
    ), (shapes, expected)
    if len(arrays) == 1 and hasattr(layer, "compute_output_shape"):
        computed = layer.compute_output_shape(arrays[0].shape)
        assert _shape_matches(tuple(computed), expected[0]), (computed, expected[0])
    clone = assert_config_roundtrip(layer)
    assert_clone_computes_the_same(layer, clone, x)
    wrapped = _wrap(layer, specs)
    if keras_roundtrip:
        assert_keras_roundtrip(wrapped, x)
    if mixed_precision:
        assert_mixed_precision(
            lambda: _wrap(layer_cls(**init_kwargs), specs),
            x,
            reference=wrapped,
            float32_outputs=False,
            float32_layers=float32_layers,
        )
    if train_step:
        assert_train_step(wrapped, x)
    return layer


def run_model_test(
    build,
    inputs,
    expected_output_shape,
    *,
    mixed_precision=True,
    saved_model=True,
    onnx=True,
    onnx_atol=1e-4,
    train_step=True,
    float32_outputs=True,
    float32_layers=(),
):
    """Every check for a model; `build` is a zero-argument callable returning a fresh model.

    Args:
        build: returns a fresh functional model.
        inputs: a shape (e.g. (2, 32, 32, 3)) or input specs (module docstring).
        expected_output_shape: one shape or a list of shapes; None matches any size.
        mixed_precision / saved_model / onnx / train_step: which checks to run.
        onnx_atol: tolerance of the ONNX parity.
        float32_outputs: the model declares float32 output layers (logits heads), checked under
            mixed_float16; False for backbones whose outputs are float16 feature maps.
        float32_layers: names of further layers allowed to compute in float32.
    """
    specs, _ = normalize_specs(inputs)
    model = build()
    x = pack(model, make_inputs(specs))
    randomize_norm_statistics(model)
    y = model(x, training=False)
    shapes = [tuple(t.shape) for t in keras.tree.flatten(y)]
    expected = _expected_shapes(expected_output_shape)
    assert len(shapes) == len(expected) and all(
        _shape_matches(a, e) for a, e in zip(shapes, expected, strict=True)
    ), (shapes, expected)
    clone = assert_config_roundtrip(model)
    assert_clone_computes_the_same(model, clone, x)
    assert_keras_roundtrip(model, x)
    if mixed_precision:
        assert_mixed_precision(
            build,
            x,
            reference=model,
            float32_outputs=float32_outputs,
            float32_layers=float32_layers,
        )
    if saved_model:
        assert_saved_model_parity(model, x)
    if onnx:
        assert_onnx_parity(model, x, atol=onnx_atol)
    if train_step:
        assert_train_step(model, x)
    return model

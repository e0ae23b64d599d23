"""The named, batch-dynamic serving function shared by the SavedModel and ONNX exporters.

Both formats are traced from the same `tf.function` so they expose the same contract: inputs named
after the Keras inputs (`image`), outputs keyed by `model.output_names` (`logits`), batch size
None, every other dimension as in the model's input shape.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from dlmodels.errors import UserError


def as_functional(model):
    """A Sequential model as the functional model over the same layers (and weights); any other
    model as is. Keras 3's Sequential has no `output_names`, which the exporters name graph
    outputs and signature keys by; the functional view names its output after the last layer."""
    if isinstance(model, keras.Sequential):
        if not model.built or not getattr(model, "inputs", None):
            raise UserError(
                f"Sequential model {model.name!r} has no input shape, so it cannot be exported: "
                "start it with keras.Input(shape=...) or call it on data first."
            )
        return keras.Model(model.inputs, model.outputs, name=model.name)
    return model


def input_names(model) -> list[str]:
    """The Keras input names, which become the signature / ONNX input names."""
    _require_functional(model)
    return [t.name for t in model.inputs]


def output_names(model) -> list[str]:
    """The Keras output names, which become the signature keys / ONNX output names."""
    model = as_functional(model)
    _require_functional(model)
    return list(model.output_names)


def _require_functional(model) -> None:
    if not getattr(model, "inputs", None):
        raise UserError(
            f"model {getattr(model, 'name', model)!r} has no symbolic inputs; export needs a "
            "functional model (keras.Model(inputs, outputs)) or a model that has been built by "
            "calling it on a keras.Input. For subclassed models (VAE, GAN) export their "
            "functional sub-models (encoder, decoder, generator)."
        )


def _computes_in_half(model) -> bool:
    for layer in getattr(model, "_flatten_layers", lambda: model.layers)():
        policy = getattr(layer, "dtype_policy", None)
        if policy is not None and policy.compute_dtype in ("float16", "bfloat16"):
            return True
    return False


def _to_float32_policies(config):
    if isinstance(config, dict):
        if config.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and isinstance(
            config.get("config"), dict
        ):
            return {**config, "config": {**config["config"], "name": "float32"}}
        return {k: _to_float32_policies(v) for k, v in config.items()}
    if isinstance(config, list):
        return [_to_float32_policies(v) for v in config]
    if config in ("mixed_float16", "mixed_bfloat16"):
        return "float32"
    return config


def float32_copy(model):
    """The same model computing in float32, for models built under a mixed precision policy.

    Mixed precision (float16 compute, float32 variables) is a training-speed device; a CPU
    serving graph wants float32, and tf2onnx emits ONNX graphs onnxruntime refuses to load for
    some float16 layers (mixed float16/float32 operands). The variables are float32 already, so
    the copy carries identical weights. Models not computing in half precision are returned as is.
    """
    if not _computes_in_half(model):
        return model
    try:
        clone = model.__class__.from_config(_to_float32_policies(model.get_config()))
    except Exception as err:
        raise UserError(
            f"{model.name!r} computes in float16/bfloat16 and could not be rebuilt in float32 "
            f"from its config ({type(err).__name__}: {err}). Build the model again under "
            "keras.config.set_dtype_policy('float32'), copy the weights with set_weights, and "
            "export that."
        ) from err
    clone.set_weights(model.get_weights())
    return clone


def input_signature(model) -> list[tf.TensorSpec]:
    """TensorSpecs with the Keras input names, batch dimension None."""
    specs = []
    for t in model.inputs:
        shape = (None, *tuple(t.shape[1:]))
        specs.append(tf.TensorSpec(shape, dtype=tf.as_dtype(t.dtype), name=t.name))
    return specs


def pack_inputs(model, flat: list):
    """Arrange arrays given in `model.inputs` order the way the model was built to be called
    (one tensor, a list, or a dict keyed by input name)."""
    if len(flat) == 1:
        return flat[0]
    struct = getattr(model, "_inputs_struct", None)  # Keras 3 Functional keeps the structure
    if struct is not None and not isinstance(struct, list | tuple):
        return keras.tree.pack_sequence_as(struct, flat)
    return list(flat)


def serving_function(model) -> tf.types.experimental.GenericFunction:
    """A tf.function `f(*inputs) -> {output_name: tensor}` running the model in inference mode."""
    names = output_names(model)

    def serve(*inputs):
        outputs = model(pack_inputs(model, list(inputs)), training=False)
        # keras.tree.flatten orders dict outputs by key, the order output_names follows too.
        flat = keras.tree.flatten(outputs)
        if len(flat) != len(names):
            raise ValueError(
                f"model returned {len(flat)} outputs but has {len(names)} output_names {names}"
            )
        return dict(zip(names, flat, strict=True))

    return tf.function(serve, input_signature=input_signature(model), autograph=False)

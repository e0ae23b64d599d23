"""The output convention of every dlmodels model, and how to read it off any Keras model.

Convention: models return **logits** unless asked otherwise (`final_activation=` /
`classifier_activation=`). Training code and exported manifests read which one a model returns
with `output_kind`, so a loss is never built for logits on a model that emits probabilities (a
silent double softmax) and a serving client knows what it receives.
"""

from __future__ import annotations

OUTPUT_KINDS = ("logits", "softmax", "sigmoid", "unknown")


def _activation_name(layer) -> str | None:
    activation = getattr(layer, "activation", None)
    if activation is None:
        if type(layer).__name__ == "Softmax":
            return "softmax"
        return None
    name = getattr(activation, "__name__", None) or str(activation)
    return name.lower()


def _producing(tensor):
    """(layer, node_index, tensor_index) of the call that produced a symbolic tensor, or None."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None
    layer, node_index, tensor_index = history
    return layer, node_index, tensor_index


def _graph_outputs(layer):
    """The symbolic outputs of a functional / Sequential model used as a layer, else None."""
    import keras

    if not isinstance(layer, keras.Model):
        return None
    try:
        outputs = layer.outputs
    except (AttributeError, ValueError):  # a subclassed (or unbuilt) model has no graph
        return None
    return list(outputs) if outputs else None


# Layers that move, resize or (in training only) drop values without changing what they are.
# FeatureTap: the identity layer backbones use to declare features (dlmodels.layers.features).
_PASS_THROUGH = (
    "Identity",
    "FeatureTap",
    "Reshape",
    "Flatten",
    "Permute",
    "Cropping1D",
    "Cropping2D",
    "Cropping3D",
    "UpSampling1D",
    "UpSampling2D",
    "UpSampling3D",
    "Resizing",
    "Dropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "SpatialDropout3D",
    "ActivityRegularization",
)


def _layer_kind(layer) -> str:
    name = _activation_name(layer)
    if name in (None, "linear"):
        # Layers without an activation attribute (Add, Concatenate, ...) are not classifiers.
        return "logits" if hasattr(layer, "activation") else "unknown"
    if name == "softmax":
        return "softmax"
    if name == "sigmoid":
        return "sigmoid"
    return "unknown"


def tensor_kind(tensor) -> str:
    """ "logits", "softmax", "sigmoid" or "unknown" for a symbolic Keras tensor: the activation
    of the layer that produced it, looking through shape-only layers (Reshape, resize, ...) and
    into nested functional / Sequential models (to the inner output the tensor is).

    Each step follows the tensor's own Keras history (layer, node index, tensor index), so a
    shared layer is read at the call that produced this tensor, not at its first call."""
    for _ in range(256):
        produced = _producing(tensor)
        if produced is None:
            return "unknown"
        layer, node_index, tensor_index = produced
        inner = _graph_outputs(layer)
        if inner is not None:
            if not 0 <= tensor_index < len(inner):
                return "unknown"
            tensor = inner[tensor_index]
            continue
        if type(layer).__name__ not in _PASS_THROUGH:
            return _layer_kind(layer)
        nodes = getattr(layer, "_inbound_nodes", None) or []
        if not 0 <= node_index < len(nodes) or not nodes[node_index].input_tensors:
            return "unknown"
        tensor = nodes[node_index].input_tensors[0]
    return "unknown"


def output_kind(model) -> str | list[str]:
    """What a functional model returns: "logits", "softmax" (probabilities over the last axis),
    "sigmoid" (independent probabilities) or "unknown". A list, one per output, for
    multi-output models."""
    outputs = getattr(model, "outputs", None)
    if not outputs:
        return "unknown"
    kinds = [tensor_kind(t) for t in outputs]
    return kinds[0] if len(kinds) == 1 else kinds

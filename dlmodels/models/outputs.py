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


def _producing_layer(tensor):
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else history[0]


# FeatureTap: the identity layer backbones use to declare features (dlmodels.layers.features).
_PASS_THROUGH = (
    "Identity",
    "FeatureTap",
    "Reshape",
    "Cropping2D",
    "UpSampling2D",
    "Resizing",
    "Permute",
)


def tensor_kind(tensor) -> str:
    """ "logits", "softmax", "sigmoid" or "unknown" for a symbolic Keras tensor: the activation
    of the layer that produced it, looking through shape-only layers (Reshape, resize, ...)."""
    layer = _producing_layer(tensor)
    for _ in range(16):
        if layer is None:
            return "unknown"
        if type(layer).__name__ not in _PASS_THROUGH:
            break
        inbound = layer._inbound_nodes[0].input_tensors if layer._inbound_nodes else []
        layer = _producing_layer(inbound[0]) if inbound else None
    name = _activation_name(layer)
    if name in (None, "linear"):
        # Layers without an activation attribute (Add, Concatenate, ...) are not classifiers.
        return "logits" if hasattr(layer, "activation") else "unknown"
    if name == "softmax":
        return "softmax"
    if name == "sigmoid":
        return "sigmoid"
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

"""The backbone contract: a backbone declares its feature maps, decoders read them.

A backbone is a functional `keras.Model` whose multi-scale feature maps each pass through a
`dlmodels.layers.FeatureTap(name="C<i>", stride=s)`. These functions read the taps (never layer
names), so a decoder written against them (U-Net encoder skips, DeepLab's low-level and ASPP
features, an FPN) takes any backbone that taps its stages, as timm's `features_only` and
keras-hub's `pyramid_outputs` do (Lin et al. 2017, "Feature Pyramid Networks for Object
Detection", for the C_i naming: C_i has stride 2**i unless dilation lowers it).

    backbone = ResNet50(include_top=False, input_shape=(None, None, 3), output_stride=16)
    feature_strides(backbone)              # {"C1": 2, "C2": 4, "C3": 8, "C4": 16, "C5": 16}
    features = feature_model(backbone, ["C2", "C5"])   # image -> {"C2": ..., "C5": ...}
"""

from __future__ import annotations

import builtins

import keras

from dlmodels.errors import UserError
from dlmodels.layers.features import FeatureTap


def _taps(model, caller: str) -> builtins.list[FeatureTap]:
    layers = getattr(model, "layers", None)
    if layers is None or not getattr(model, "inputs", None):
        raise UserError(
            f"{caller}: `model`={getattr(model, 'name', model)!r} is not a functional Keras model "
            "with symbolic inputs; pass a backbone built by dlmodels.models (e.g. ResNet50)."
        )
    taps = [layer for layer in layers if isinstance(layer, FeatureTap)]
    if not taps:
        nested = [layer.name for layer in layers if isinstance(layer, keras.Model)]
        hint = (
            f" It nests the models {nested}: pass the backbone itself (model.get_layer(name))."
            if nested
            else ""
        )
        raise UserError(
            f"{caller}: `model`={model.name!r} declares no feature maps (it has no "
            "dlmodels.layers.FeatureTap layers). Pass a backbone built by dlmodels.models "
            "(ResNet18 ... ResNet152V2), or declare the features of your own backbone by "
            f"passing each one through FeatureTap(name='C<i>', stride=<stride>).{hint}"
        )
    return taps


def _select(taps, names, caller):
    by_name = {tap.name: tap for tap in taps}
    if names is None:
        return taps
    if isinstance(names, str):
        names = [names]
    names = builtins.list(names)
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise UserError(
            f"{caller}: `names`={names!r} must be a non-empty list of declared features; this "
            f"backbone declares {builtins.list(by_name)}."
        )
    return [by_name[n] for n in names]


def backbone_features(model, names=None) -> dict:
    """The symbolic feature maps a backbone declares, by name, in graph order.

    Args:
        model: a functional backbone with `FeatureTap` layers (every dlmodels ResNet).
        names: None for every declared feature, or a list such as ["C2", "C5"].

    Returns:
        `{"C1": KerasTensor, ...}`: tensors of `model`'s graph, to build a decoder on.

    Raises:
        UserError (a ValueError): the model declares no features, or `names` holds an
            undeclared one.
    """
    taps = _select(_taps(model, "backbone_features"), names, "backbone_features")
    return {tap.name: tap.output for tap in taps}


def feature_model(model, names=None, *, name=None):
    """A functional model mapping the backbone's input(s) to a dict of its declared features.

    The new model shares `model`'s layers and weights (training one trains the other) and is
    exportable like any functional model.

    Args:
        model: a functional backbone with `FeatureTap` layers (every dlmodels ResNet).
        names: None for every declared feature, or a list such as ["C2", "C3", "C4", "C5"].
        name: name of the new model (default "<model name>_features").

    Returns:
        `keras.Model(inputs -> {feature name: feature map})`.
    """
    outputs = backbone_features(model, names)
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, outputs, name=name or f"{model.name}_features")


def feature_strides(model_or_output_stride=32, names=None, *, include_c1=False) -> dict[str, int]:
    """Stride of each declared feature of a backbone, read from its taps.

    Args:
        model_or_output_stride: a backbone model (read its `FeatureTap` strides), or, for
            compatibility, a ResNet `output_stride` (8, 16, 32), which gives the ResNet table
            of C2..C5 (`dlmodels.models.resnet.feature_strides`).
        names: with a model: None for every declared feature, or a list of names.
        include_c1: with an output stride: also return C1 (stride 2). A model's taps always
            include it.

    Returns:
        `{"C1": 2, "C2": 4, ...}` for a model; `{"C2": 4, ..., "C5": 32}` for an output stride.
    """
    arg = model_or_output_stride
    if isinstance(arg, int) and not isinstance(arg, bool):
        from dlmodels.models.resnet import feature_strides as resnet_strides

        return resnet_strides(arg, include_c1=include_c1)
    taps = _select(_taps(arg, "feature_strides"), names, "feature_strides")
    return {tap.name: tap.stride for tap in taps}


# Registry names a decoder accepts as `backbone=`: every dlmodels ResNet.
BACKBONES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet50v2",
    "resnet101v2",
    "resnet152v2",
)


def build_backbone(
    backbone,
    inputs,
    *,
    output_stride: int = 32,
    multigrid=None,
    backbone_kwargs: dict | None = None,
    owner: str = "build_backbone",
) -> tuple[dict, dict[str, int]]:
    """Build (or apply) a backbone on a decoder's symbolic `inputs`; return its features.

    Decoders (the U-Net family, DeepLab, FCN, PSPNet) take `backbone=` as either a registry name
    from `BACKBONES` or a functional backbone model declaring `FeatureTap` features:

    - a name builds that ResNet *inside* the decoder's graph (`input_tensor=inputs`,
      `include_top=False`), so the result is one flat functional model: every layer is visible
      to export, quantization and `model.summary()`, and `output_stride` / `multigrid` dilate it;
    - a model is applied to `inputs` as a nested model (its weights are shared, e.g. an
      ImageNet-initialized ResNet); its strides are fixed, so `output_stride` must equal its
      deepest feature's stride.

    Args:
        backbone: a name in `BACKBONES` (case-insensitive) or a functional backbone model.
        inputs: the decoder's symbolic image input (batch, H, W, C).
        output_stride: 8, 16 or 32: stride of the deepest feature (a name dilates to reach it).
        multigrid: per-block unit rates of stage 5 for a name (DeepLabv3's (1, 2, 4)).
        backbone_kwargs: further keyword arguments for the ResNet builder (norm, activation,
            se_ratio, ...); not allowed together with a model instance.
        owner: the caller's name, for error messages.

    Returns:
        `(features, strides)`: `{"C1": tensor, ..., "C5": tensor}` on `inputs`' graph, and
        `{"C1": 2, ..., "C5": output_stride}`.

    Raises:
        UserError (a ValueError): an unknown name (the message lists `BACKBONES`), a model
            without features, an output stride the backbone cannot give, or `backbone_kwargs`
            with a model.
    """
    if isinstance(backbone, str):
        key = backbone.lower()
        if key not in BACKBONES:
            raise UserError(
                f"{owner}: `backbone`={backbone!r} is not a known backbone. Allowed values: "
                f"{', '.join(BACKBONES)}, or a functional model declaring FeatureTap features "
                "(see dlmodels.models.backbone)."
            )
        if output_stride not in (8, 16, 32):
            raise UserError(
                f"{owner}: `output_stride`={output_stride!r} is not supported. Allowed values: "
                "8, 16, 32."
            )
        from dlmodels.models.registry import entry

        kwargs = dict(backbone_kwargs or {})
        for fixed in ("include_top", "input_tensor", "input_shape", "output_stride", "multigrid"):
            if fixed in kwargs:
                raise UserError(
                    f"{owner}: `backbone_kwargs` may not set {fixed!r}; the decoder sets it "
                    "(pass output_stride / multigrid to the decoder itself)."
                )
        kwargs.setdefault("name", key)
        model = entry(key).builder(
            include_top=False,
            input_tensor=inputs,
            output_stride=output_stride,
            multigrid=multigrid,
            **kwargs,
        )
        return backbone_features(model), feature_strides(model)
    if backbone_kwargs:
        raise UserError(
            f"{owner}: `backbone_kwargs` applies to a backbone given by name; a model instance "
            "is used as built."
        )
    strides = feature_strides(backbone)  # raises a clear error without taps
    deepest = max(strides.values())
    if deepest != output_stride:
        raise UserError(
            f"{owner}: the backbone model {backbone.name!r} has output stride {deepest} "
            f"(features {strides}), but `output_stride`={output_stride!r} was asked for; pass "
            f"output_stride={deepest}, or a backbone name so the decoder can dilate it."
        )
    features = feature_model(backbone)(inputs)
    return dict(features), strides

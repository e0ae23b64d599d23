"""UNet++ (Zhou et al. 2018, "UNet++: A Nested U-Net Architecture for Medical Image
Segmentation", DLMIA / ML-CDS workshop at MICCAI).

The encoder nodes X^{i,0} (i = 0..depth, two 3x3 convs each, 2x2 max pooling between levels) are
those of U-Net; the decoder is a grid of nested, densely connected nodes

    X^{i,j} = H([X^{i,0}, ..., X^{i,j-1}, U(X^{i+1,j-1})])    for j >= 1, i + j <= depth,

where H is a conv block (two 3x3 conv + norm + activation), U an upsampling by 2 to the
filters of level i and [...] a concatenation (the "re-designed skip pathways"). A 1x1 conv head on
each of X^{0,1}, ..., X^{0,depth} gives the deeply supervised outputs; the model pruned to
L^k (the paper's section 2, "model pruning") keeps only the nodes with i + j <= k and head k.
The paper's model is `UNetPlusPlus(depth=4, base_filters=32, norm=None,
deep_supervision=True)` (filters 32, 64, 128, 256, 512; the authors' Keras code adds dropout
after each conv, here one `Dropout` after each node when `dropout` > 0).
"""

from __future__ import annotations

import keras

from dlmodels._validation import check_choice, check_positive_int
from dlmodels.errors import UserError
from dlmodels.layers.conv import validate_activation, validate_norm
from dlmodels.models.backbone import build_backbone
from dlmodels.models.registry import register
from dlmodels.models.unet import _double_conv, _upsample

PAPER = (
    "Zhou et al. 2018, UNet++: A Nested U-Net Architecture for Medical Image Segmentation (DLMIA)"
)
UPSAMPLING = ("transpose", "bilinear")
BACKBONE_STRIDE = 32
"""Input sizes must be multiples of this with a backbone (the stride of its C5)."""


# -- helpers shared with UNet3Plus -------------------------------------------------------------
def check_input_shape(input_shape, depth: int, backbone, *, owner: str) -> tuple:
    """(height, width, channels) with known channels whose sizes the encoder can divide:
    multiples of 2**depth without a backbone, of 32 (C5's stride) with one."""
    try:
        input_shape = tuple(input_shape)
    except TypeError:
        input_shape = None
    if input_shape is None or len(input_shape) != 3 or input_shape[-1] is None:
        raise UserError(
            f"{owner}: `input_shape` must be (height, width, channels) with known channels, "
            f"got {input_shape!r}."
        )
    factor = BACKBONE_STRIDE if backbone is not None else 2**depth
    why = (
        f"with a backbone every spatial size must be a multiple of {factor} (the stride of C5)"
        if backbone is not None
        else f"a model of `depth`={depth} needs every spatial size to be a multiple of "
        f"2**depth = {factor}"
    )
    for axis, size in zip(("height", "width"), input_shape[:2], strict=True):
        if size is not None and (size < 1 or size % factor):
            lower = max(size // factor * factor, factor)
            upper = max((size // factor + 1) * factor, factor)
            sizes = f"{lower} or {upper}" if lower != upper else f"{lower}"
            hint = "" if backbone is not None else ", or lower `depth`"
            raise UserError(
                f"{owner}: `input_shape`={input_shape} has {axis} {size}, but {why}. Resize or "
                f"pad to {sizes}{hint}."
            )
    return input_shape


def check_backbone_depth(depth: int, backbone, backbone_kwargs, *, owner: str) -> None:
    """A backbone gives five levels (C1..C5), so at most depth 4; kwargs need a backbone."""
    if backbone is None:
        if backbone_kwargs:
            raise UserError(
                f"{owner}: `backbone_kwargs`={backbone_kwargs!r} given without a `backbone`; "
                "pass backbone='resnet18' (or another name) or drop backbone_kwargs."
            )
        return
    if depth > 4:
        raise UserError(
            f"{owner}: `depth`={depth} needs {depth + 1} encoder levels, but a backbone gives "
            "five (C1..C5, strides 2..32). Allowed with a backbone: depth 1..4."
        )


def encoder_from_backbone(backbone, inputs, depth, backbone_kwargs, *, owner):
    """The backbone's C1..C_{depth+1} on `inputs`, and their strides (2, 4, ...)."""
    features, strides = build_backbone(
        backbone,
        inputs,
        output_stride=BACKBONE_STRIDE,
        backbone_kwargs=backbone_kwargs,
        owner=owner,
    )
    names = [f"C{i}" for i in range(1, depth + 2)]
    return [features[n] for n in names], [int(strides[n]) for n in names]


def level_filters(filters, base_filters, depth, *, owner, name="filters") -> tuple[int, ...]:
    """`filters` (one positive int per level) or base_filters * 2**level, levels 0..depth."""
    if filters is None:
        base = check_positive_int("base_filters", base_filters, owner=owner)
        return tuple(base * 2**level for level in range(depth + 1))
    try:
        values = tuple(filters)
    except TypeError:
        values = ()
    if len(values) != depth + 1:
        raise UserError(
            f"{owner}: `{name}`={filters!r} must hold one positive int per level, {depth + 1} "
            f"for `depth`={depth} (e.g. {tuple(32 * 2**i for i in range(depth + 1))}), or be "
            "None to use `base_filters`."
        )
    return tuple(check_positive_int(name, v, owner=owner) for v in values)


def check_dropout(name, value, *, owner) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise UserError(f"{owner}: `{name}` must be a rate in [0, 1), got {value!r}.")
    return float(value)


def output_head(x, num_classes, kernel_size, upsample, *, prefix, kernel_initializer="he_normal"):
    """Conv to `num_classes`, then bilinear upsampling by `upsample` (when > 1) to the input
    size: logits are resized before the activation, as DeepLab and UNet 3+ do."""
    x = keras.layers.Conv2D(
        num_classes,
        kernel_size,
        padding="same",
        kernel_initializer=kernel_initializer,
        name=f"{prefix}_conv",
    )(x)
    if upsample > 1:
        x = keras.layers.UpSampling2D(
            upsample, interpolation="bilinear", name=f"{prefix}_upsample"
        )(x)
    return x


def output_activation(x, final_activation, name):
    # float32 output layer: keeps logits / probabilities in fp32 under mixed_float16.
    return keras.layers.Activation(final_activation or "linear", dtype="float32", name=name)(x)


# -- UNet++ ------------------------------------------------------------------------------------
@register("unet_plus_plus", task="segmentation", paper=PAPER)
def UNetPlusPlus(
    input_shape=(256, 256, 3),
    num_classes=2,
    *,
    depth=4,
    base_filters=32,
    filters=None,
    norm="batch",
    activation="relu",
    upsampling="transpose",
    dropout=0.0,
    deep_supervision=False,
    head=None,
    final_activation=None,
    backbone=None,
    backbone_kwargs=None,
    kernel_initializer="he_normal",
    name="unet_plus_plus",
):
    """Build UNet++ as a functional `keras.Model` mapping "image" to per-pixel logits.

    Nested dense skip pathways close the semantic gap between encoder and decoder maps, and
    deep supervision on X^{0,1..depth} lets the trained model be pruned to a shallower, faster
    L^k at inference (`head=k` here, or `prune(model, k)` on a trained model).

    Args:
        input_shape: (height, width, channels); height and width may be None and must be
            multiples of 2**depth when given (of 32 with a backbone).
        num_classes: output channels of each 1x1 head (>= 1).
        depth: the deepest level (the paper: 4, nodes X^{0..4, *}).
        base_filters: filters of level 0, doubled at each level (the paper: 32).
        filters: instead of base_filters, one int per level 0..depth.
        norm: normalization after each conv ("batch", "sync_batch", "group", "layer",
            "instance" or None; the paper: None).
        activation: Keras activation name (the paper: "relu").
        upsampling: "transpose" (2x2 transposed conv, stride 2, the paper's) or "bilinear"
            (bilinear resize then 2x2 conv); both map to the filters of the target level.
        dropout: rate of a Dropout after each node (0 disables it).
        deep_supervision: return every head X^{0,1..depth} as a list of outputs
            "logits", "logits_1" ... "logits_<depth-1>": the main head X^{0,depth} (the full
            model's, which training metrics and exports read) first, then the auxiliary heads
            X^{0,1..depth-1} in order; False returns only "logits".
        head: None, or k in 1..depth to build the pruned UNet++ L^k: only the nodes with
            i + j <= k and the single output "logits" of head k. Its layers are named as in the
            full model, so weights of a trained full model load by layer name.
        final_activation: None for logits, or "softmax" / "sigmoid" (applied to every head).
        backbone: None (the U-Net encoder above), or a ResNet name ("resnet18" ...) / a backbone
            model declaring FeatureTap features: X^{i,0} are then C1..C_{depth+1} (strides
            2..2**(depth+1)) and each head is bilinearly upsampled by 2 to the input size.
        backbone_kwargs: further arguments of the named ResNet builder (norm, ...).
        kernel_initializer: initializer of every conv, block convs and 1x1 heads (the paper:
            He normal).
        name: model name.

    Returns:
        `keras.Model` with input "image" (batch, H, W, C) and output "logits"
        (batch, H, W, num_classes), or with `deep_supervision` a list of `depth` such outputs
        "logits" (head X^{0,depth}), "logits_1" ... "logits_<depth-1>" (head j on X^{0,j});
        float32 also under a mixed-precision policy.
    """
    owner = "UNetPlusPlus"
    depth = check_positive_int("depth", depth, owner=owner)
    check_backbone_depth(depth, backbone, backbone_kwargs, owner=owner)
    input_shape = check_input_shape(input_shape, depth, backbone, owner=owner)
    num_classes = check_positive_int("num_classes", num_classes, owner=owner)
    filters = level_filters(filters, base_filters, depth, owner=owner)
    norm = validate_norm(norm, owner=owner)
    activation = validate_activation(activation, owner=owner)
    upsampling = check_choice("upsampling", upsampling, UPSAMPLING, owner=owner)
    final_activation = validate_activation(final_activation, name="final_activation", owner=owner)
    dropout = check_dropout("dropout", dropout, owner=owner)
    if head is not None:
        if isinstance(head, bool) or not isinstance(head, int) or not 1 <= head <= depth:
            raise UserError(
                f"{owner}: `head`={head!r} must be None (the full model) or an int in "
                f"1..{depth} (the pruned UNet++ L^head for `depth`={depth})."
            )
        if deep_supervision:
            raise UserError(
                f"{owner}: `head`={head} builds one pruned output; it cannot be combined with "
                "deep_supervision=True. Build the full model with deep supervision for training "
                "and prune it with prune(model, head) or head=k for inference."
            )
    levels = depth if head is None else head

    conv_kwargs = {"norm": norm, "activation": activation, "kernel_initializer": kernel_initializer}
    inputs = keras.Input(shape=input_shape, name="image")
    nodes = {}

    def finish(x, i, j):
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"x{i}_{j}_dropout")(x)
        nodes[(i, j)] = x

    if backbone is None:
        x = inputs
        for i in range(levels + 1):
            if i:
                x = keras.layers.MaxPooling2D(2, name=f"x{i - 1}_0_pool")(nodes[(i - 1, 0)])
            finish(_double_conv(x, filters[i], f"x{i}_0", conv_kwargs), i, 0)
        head_upsample = 1
    else:
        encoder, strides = encoder_from_backbone(
            backbone, inputs, levels, backbone_kwargs, owner=owner
        )
        for i, feature in enumerate(encoder):
            nodes[(i, 0)] = feature
        head_upsample = strides[0]

    for j in range(1, levels + 1):
        for i in range(levels - j + 1):
            up = _upsample(
                nodes[(i + 1, j - 1)], filters[i], f"x{i}_{j}", upsampling, kernel_initializer
            )
            x = keras.layers.Concatenate(name=f"x{i}_{j}_concat")(
                [nodes[(i, k)] for k in range(j)] + [up]
            )
            finish(_double_conv(x, filters[i], f"x{i}_{j}", conv_kwargs), i, j)

    def make_head(j, out_name):
        x = output_head(
            nodes[(0, j)],
            num_classes,
            1,
            head_upsample,
            prefix=f"head{j}",
            kernel_initializer=kernel_initializer,
        )
        return output_activation(x, final_activation, out_name)

    if deep_supervision:
        # The last head (the full UNet++) is the one to predict with: it is named "logits" and
        # comes first, so code reading `outputs[0]` (a serving client, an export metric) gets
        # it; the auxiliary heads X^{0,1..depth-1} follow in order as "logits_<j>".
        outputs = [make_head(levels, "logits")]
        outputs += [make_head(j, f"logits_{j}") for j in range(1, levels)]
    else:
        outputs = make_head(levels, "logits")
    return keras.Model(inputs, outputs, name=name)


def prune(model, head, *, name=None):
    """The pruned UNet++ L^k of a (trained) UNet++: only the nodes X^{i,j} with i + j <= k.

    The pruned model shares the layers and weights of `model` (no copy: it computes exactly
    head k of `model`) and has one float32 output "logits" with the head's activation, ready to
    export. Pruning trades accuracy for speed at inference, the paper's section 2.

    Args:
        model: a model built by `UNetPlusPlus` (with `deep_supervision=True` for k < depth).
        head: k, the head to keep (1 .. the model's depth).
        name: the new model's name (default "<model name>_l<k>").

    Returns:
        `keras.Model` from the model's input to head k's output, named "logits".

    Raises:
        ValueError: `model` has no head k (not a UNet++, k out of range, or a model built
            without deep supervision for k < depth).
    """
    heads = sorted(
        int(layer.name[len("head") : -len("_conv")])
        for layer in model.layers
        if layer.name.startswith("head")
        and layer.name.endswith("_conv")
        and layer.name[len("head") : -len("_conv")].isdigit()
    )
    if isinstance(head, bool) or not isinstance(head, int) or head not in heads:
        hint = (
            " It was built without deep supervision, so only its last head exists: build "
            "UNetPlusPlus(..., deep_supervision=True) to train every head, or UNetPlusPlus(..., "
            "head=k) to build L^k directly."
            if len(heads) == 1
            else ""
        )
        raise UserError(
            f"prune: `head`={head!r} is not a head of model {model.name!r}; its heads are "
            f"{heads or 'none (not a UNetPlusPlus)'}.{hint}"
        )
    x = model.get_layer(f"head{head}_conv").output
    upsample = [layer for layer in model.layers if layer.name == f"head{head}_upsample"]
    if upsample:
        x = upsample[0].output
    out_layers = [t._keras_history[0] for t in model.outputs]
    wanted = {f"logits_{head}", "logits"} if head == max(heads) else {f"logits_{head}"}
    final = next((la for la in out_layers if la.name in wanted), out_layers[0])
    activation = final.get_config()["activation"]
    outputs = keras.layers.Activation(activation, dtype="float32", name="logits")(x)
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, outputs, name=name or f"{model.name}_l{head}")

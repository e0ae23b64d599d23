"""The U-Net family: U-Net, Attention U-Net and ResUNet.

U-Net (Ronneberger et al. 2015, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI): a contracting path of `depth` levels (two 3x3 conv + ReLU, then 2x2 max
pooling, doubling the filters), a bottleneck, and an expanding path (2x2 "up-convolution" halving
the filters, concatenation with the skip connection, two 3x3 conv + ReLU), then a 1x1 conv to
`num_classes`. The paper's model is `UNet(depth=4, base_filters=64, norm=None, dropout=0.5,
padding="valid")`: unpadded convolutions, skips center-cropped to the decoder's size, 572 -> 388.
`padding="same"` (the default) keeps the input's size instead. `predict_tiled` is the paper's
overlap-tile strategy for images larger than one tile.

Attention U-Net (Oktay et al. 2018, "Attention U-Net: Learning Where to Look for the Pancreas"):
the U-Net with an additive `AttentionGate` on the skips of levels 2..depth (as the authors'
code), gated by the decoder feature one level deeper (before it is upsampled).

ResUNet (Zhang, Liu & Wang 2018, "Road Extraction by Deep Residual U-Net", IEEE GRSL): full
pre-activation residual units (He et al. 2016) in encoder, bridge and decoder; downsampling by a
stride-2 first convolution instead of pooling; parameter-free upsampling + concatenation before
every decoder unit.

All three take `backbone=`: None (the paper's encoder) or a ResNet name / backbone model
(`dlmodels.models.backbone.build_backbone`): its features C1..C4 (strides 2..16) are the skips and
C5 (stride 32) the bottleneck; the decoder upsamples C5 -> C4 ... -> C1, then once more to full
resolution without a skip, as segmentation_models' Unet does.
"""

from __future__ import annotations

import itertools
import math

import keras
import numpy as np

from dlmodels._validation import check_choice, check_positive_int
from dlmodels.errors import UserError
from dlmodels.layers.attention import AttentionGate
from dlmodels.layers.conv import (
    ConvNormAct,
    make_activation,
    make_norm,
    validate_activation,
    validate_norm,
)
from dlmodels.layers.residual import ResidualBlock
from dlmodels.models.registry import register

UPSAMPLING = ("transpose", "bilinear")
PADDINGS = ("same", "valid")
RESUNET_UPSAMPLING = ("nearest", "bilinear")
_BACKBONE_DEPTH = 4  # skips C1..C4, bottleneck C5


def check_divisible_input(input_shape, depth: int, *, owner: str = "UNet", reason: str = ""):
    """Raise ValueError unless every known spatial size is divisible by 2**depth.

    `reason` replaces the default explanation ("a U-Net of `depth`=d") in the message.
    """
    factor = 2**depth
    why = reason or f"a U-Net of `depth`={depth}"
    what, hint = ("", "") if reason else ("2**depth = ", ", or lower `depth`")
    for axis, size in zip(("height", "width"), input_shape[:2], strict=True):
        if size is not None and size % factor:
            lower, upper = size // factor * factor, (size // factor + 1) * factor
            raise UserError(
                f"{owner}: `input_shape`={tuple(input_shape)} has {axis} {size}, which {why} "
                f"cannot divide: every spatial size must be a multiple of {what}{factor}. "
                f"Resize or pad to {lower or factor} or {upper}{hint}."
            )


def _double_conv(x, filters, prefix, conv_kwargs):
    x = ConvNormAct(filters, 3, name=f"{prefix}_conv1", **conv_kwargs)(x)
    return ConvNormAct(filters, 3, name=f"{prefix}_conv2", **conv_kwargs)(x)


def _upsample(x, filters, prefix, mode, kernel_initializer):
    if mode == "transpose":
        return keras.layers.Conv2DTranspose(
            filters, 2, strides=2, kernel_initializer=kernel_initializer, name=f"{prefix}_up"
        )(x)
    # The paper's words: "an upsampling of the feature map followed by a 2x2 convolution that
    # halves the number of feature channels". Bilinear resize + conv also quantizes to int8 fully
    # (transposed convs stay fp32 in onnxruntime's static quantization). The 2x2 conv is "same"
    # also in the unpadded U-Net, so that each up-step exactly doubles the size as in the paper.
    x = keras.layers.UpSampling2D(2, interpolation="bilinear", name=f"{prefix}_resize")(x)
    return keras.layers.Conv2D(
        filters, 2, padding="same", kernel_initializer=kernel_initializer, name=f"{prefix}_up"
    )(x)


# -- sizes of the unpadded (padding="valid") U-Net ---------------------------------------------
def _valid_output_size_or_none(input_size: int, depth: int):
    """Output size of the unpadded U-Net, or None when `input_size` is not accepted."""
    s = int(input_size)
    for _ in range(depth):  # two unpadded 3x3 convs (-4), then 2x2 pooling of an even size
        s -= 4
        if s <= 0 or s % 2:
            return None
        s //= 2
    s -= 4  # bottleneck
    if s <= 0:
        return None
    for _ in range(depth):  # 2x up-convolution, then two unpadded 3x3 convs
        s = 2 * s - 4
        if s <= 0:
            return None
    return s


def _valid_bottleneck_range(depth: int):
    """(offset, step, smallest bottleneck input b): valid sizes are step * b + offset, b >= b0."""
    step = 2**depth
    offset = 4 * (step - 1)
    b = 5
    while _valid_output_size_or_none(step * b + offset, depth) is None:
        b += 1
    return offset, step, b


def _nearest_valid_inputs(size: int, depth: int) -> list[int]:
    offset, step, b0 = _valid_bottleneck_range(depth)
    b = max(b0, (size - offset) // step)
    candidates = [step * b + offset, step * (b + 1) + offset]
    below = [c for c in candidates if c <= size]
    above = [c for c in candidates if c > size]
    return (below[-1:] + above[:1]) if below else above[:1]


def unet_valid_output_size(input_size: int, depth: int = 4) -> int:
    """Output height (or width) of the unpadded U-Net (`padding="valid"`) for an input size.

    Each level's two unpadded 3x3 convolutions remove 4 pixels, every pooled size must be even,
    and every decoder size must stay positive: `unet_valid_output_size(572, 4) == 388`, the paper's
    figure 1.

    Args:
        input_size: input height or width (>= 1).
        depth: number of pooling steps (>= 1).

    Returns:
        The output size.

    Raises:
        ValueError: the U-Net cannot take this size; the message names the nearest valid sizes.
    """
    depth = check_positive_int("depth", depth, owner="unet_valid_output_size")
    input_size = check_positive_int("input_size", input_size, owner="unet_valid_output_size")
    out = _valid_output_size_or_none(input_size, depth)
    if out is None:
        near = _nearest_valid_inputs(input_size, depth)
        raise UserError(
            f"unet_valid_output_size: `input_size`={input_size} is not accepted by an unpadded "
            f"U-Net of `depth`={depth} (every pooled size must be even and every conv output "
            f"positive). Nearest valid sizes: {' and '.join(map(str, near))}."
        )
    return out


def unet_valid_input_size(output_size: int, depth: int = 4) -> int:
    """The input size of the unpadded U-Net giving `output_size`: the inverse of
    `unet_valid_output_size` (`unet_valid_input_size(388, 4) == 572`).

    Raises:
        ValueError: no input gives this output size; the message names the nearest that exist.
    """
    depth = check_positive_int("depth", depth, owner="unet_valid_input_size")
    output_size = check_positive_int("output_size", output_size, owner="unet_valid_input_size")
    offset, step, b0 = _valid_bottleneck_range(depth)
    # output = step * (b - 4) - offset, linear in the bottleneck input b
    b, rem = divmod(output_size + offset, step)
    b += 4
    if rem or b < b0:
        b = max(b0, b)
        near = sorted(
            {step * (c - 4) - offset for c in (b, b + 1) if c >= b0 and step * (c - 4) - offset > 0}
        )
        lower = [n for n in near if n < output_size]
        upper = [n for n in near if n > output_size]
        options = lower[-1:] + upper[:1]
        raise UserError(
            f"unet_valid_input_size: no input gives `output_size`={output_size} with an unpadded "
            f"U-Net of `depth`={depth}: outputs are {step} * k - {offset} for k >= {b0 - 4}. "
            f"Nearest: {' and '.join(map(str, options))}."
        )
    return step * b + offset


def _check_valid_input(input_shape, depth, owner):
    for axis, size in zip(("height", "width"), input_shape[:2], strict=True):
        if size is None:
            raise UserError(
                f"{owner}: `input_shape`={tuple(input_shape)} has an unknown {axis}; "
                "padding='valid' needs static height and width (the skip crops are computed "
                "from them). Give the tile size, e.g. (572, 572, 1), or use padding='same'."
            )
        if _valid_output_size_or_none(size, depth) is None:
            near = _nearest_valid_inputs(size, depth)
            raise UserError(
                f"{owner}: `input_shape`={tuple(input_shape)} has {axis} {size}, which an "
                f"unpadded (padding='valid') U-Net of `depth`={depth} cannot take: every size "
                "before a 2x2 pooling must be even and every conv output positive. Nearest "
                f"valid sizes: {' and '.join(map(str, near))} (see unet_valid_input_size)."
            )


def _center_crop(skip, target, name):
    """Crop `skip` to `target`'s static spatial size, centered (the paper's skip cropping)."""
    dh = skip.shape[1] - target.shape[1]
    dw = skip.shape[2] - target.shape[2]
    if dh == 0 and dw == 0:
        return skip
    return keras.layers.Cropping2D(((dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)), name=name)(
        skip
    )


# -- shared argument checks and encoders ------------------------------------------------------
def _check_common(
    owner,
    input_shape,
    num_classes,
    depth,
    base_filters,
    norm,
    activation,
    final_activation,
    dropout,
    backbone,
):
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = None
    if shape is None or len(shape) != 3 or shape[-1] is None:
        raise UserError(
            f"{owner}: `input_shape` must be (height, width, channels) with known channels, "
            f"got {input_shape!r}. Pass e.g. input_shape=(256, 256, 3); height and width may "
            "be None."
        )
    depth = check_positive_int("depth", depth, owner=owner)
    base_filters = check_positive_int("base_filters", base_filters, owner=owner)
    num_classes = check_positive_int("num_classes", num_classes, owner=owner)
    norm = validate_norm(norm, owner=owner)
    activation = validate_activation(activation, owner=owner)
    final_activation = validate_activation(final_activation, name="final_activation", owner=owner)
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, int | float)
        or not (0.0 <= float(dropout) < 1.0)
    ):
        raise UserError(f"{owner}: `dropout` must be a number in [0, 1), got {dropout!r}.")
    if backbone is not None and not isinstance(backbone, str | keras.Model):
        raise UserError(
            f"{owner}: `backbone`={backbone!r} must be None (the paper's encoder), a ResNet name "
            "such as 'resnet18', or a functional backbone model declaring FeatureTap features."
        )
    if backbone is not None and depth != _BACKBONE_DEPTH:
        raise UserError(
            f"{owner}: `depth`={depth} cannot be used with `backbone`={_backbone_name(backbone)!r}:"
            " a backbone gives skips C1..C4 and the bottleneck C5 (strides 2..32), so the decoder "
            "depth is 4. Leave depth=4."
        )
    return depth, base_filters, num_classes, norm, activation, final_activation, float(dropout)


def _check_attention_levels(levels, depth, owner):
    """The decoder levels to gate: None means 2..depth (the authors' Attention U-Net leaves the
    full-resolution skip ungated), "all" means 1..depth, else a collection of ints in 1..depth."""
    if levels is None:
        return frozenset(range(2, depth + 1))
    if isinstance(levels, str) and levels == "all":
        return frozenset(range(1, depth + 1))
    try:
        values = list(levels)
    except TypeError:
        values = None
    if (
        isinstance(levels, str)
        or values is None
        or any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= depth for v in values)
    ):
        raise UserError(
            f"{owner}: `attention_levels`={levels!r} must be None (levels 2..depth, the "
            f"authors'), 'all', or a collection of decoder levels in 1..{depth} (1 is the "
            f"full-resolution skip), e.g. attention_levels={tuple(range(2, depth + 1))}."
        )
    return frozenset(values)


def _backbone_name(backbone):
    return backbone if isinstance(backbone, str) else getattr(backbone, "name", backbone)


def _backbone_encoder(inputs, backbone, backbone_kwargs, input_shape, owner):
    """Skips [C1, C2, C3, C4] and the bottleneck C5 of a backbone built on `inputs`."""
    from dlmodels.models.backbone import build_backbone

    check_divisible_input(
        tuple(input_shape),
        _BACKBONE_DEPTH + 1,
        owner=owner,
        reason=f"the stride-32 features of `backbone`={_backbone_name(backbone)!r}",
    )
    features, strides = build_backbone(
        backbone, inputs, output_stride=32, backbone_kwargs=backbone_kwargs, owner=owner
    )
    names = [f"C{i}" for i in range(1, _BACKBONE_DEPTH + 2)]
    wrong = {n: strides.get(n) for n in names if strides.get(n) != 2 ** int(n[1:])}
    if wrong:
        raise UserError(
            f"{owner}: `backbone`={_backbone_name(backbone)!r} must declare features C1..C5 at "
            f"strides 2, 4, 8, 16, 32; it declares {strides}."
        )
    return [features[n] for n in names[:-1]], features[names[-1]]


def _logits(x, num_classes, final_activation, kernel_initializer="glorot_uniform"):
    x = keras.layers.Conv2D(
        num_classes, 1, kernel_initializer=kernel_initializer, name="head_conv"
    )(x)
    # float32 output layer: keeps logits / probabilities in fp32 under mixed_float16.
    return keras.layers.Activation(final_activation or "linear", dtype="float32", name="logits")(x)


def _build_unet(
    owner,
    input_shape,
    num_classes,
    depth,
    base_filters,
    norm,
    activation,
    upsampling,
    dropout,
    final_activation,
    kernel_initializer,
    name,
    padding="same",
    backbone=None,
    backbone_kwargs=None,
    attention=False,
    attention_levels=None,
    attention_reduction=1,
    gating_conv=True,
):
    depth, base_filters, num_classes, norm, activation, final_activation, dropout = _check_common(
        owner,
        input_shape,
        num_classes,
        depth,
        base_filters,
        norm,
        activation,
        final_activation,
        dropout,
        backbone,
    )
    upsampling = check_choice("upsampling", upsampling, UPSAMPLING, owner=owner)
    padding = check_choice("padding", padding, PADDINGS, owner=owner)
    if backbone_kwargs is not None and backbone is None:
        raise UserError(f"{owner}: `backbone_kwargs` needs a `backbone` name; got backbone=None.")
    if padding == "valid":
        if backbone is not None:
            raise UserError(
                f"{owner}: padding='valid' is the paper's unpadded encoder and cannot be combined "
                f"with `backbone`={_backbone_name(backbone)!r} (a ResNet pads its convolutions). "
                "Use padding='same' with a backbone."
            )
        _check_valid_input(tuple(input_shape), depth, owner)
    elif backbone is None:
        check_divisible_input(tuple(input_shape), depth, owner=owner)
    if attention:
        attention_levels = _check_attention_levels(attention_levels, depth, owner)
        attention_reduction = check_positive_int(
            "attention_reduction", attention_reduction, owner=owner
        )
        if gating_conv not in (True, False):
            raise UserError(f"{owner}: `gating_conv` must be True or False, got {gating_conv!r}.")

    conv_kwargs = {"norm": norm, "activation": activation, "kernel_initializer": kernel_initializer}
    if padding == "valid":
        conv_kwargs["padding"] = "valid"
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    if backbone is None:
        x = inputs
        skips = []
        for level in range(1, depth + 1):
            x = _double_conv(x, base_filters * 2 ** (level - 1), f"enc{level}", conv_kwargs)
            if dropout and level == depth:
                # "drop-out layers at the end of the contracting path" (the paper, section 3),
                # placed as in the reference Keras port (zhixuhao/unet: drop4, drop5): on the
                # deepest encoder level's output, which feeds both its skip and the pooling,
                # and below on the bottleneck's output.
                x = keras.layers.Dropout(dropout, name=f"enc{level}_dropout")(x)
            skips.append(x)
            x = keras.layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
        x = _double_conv(x, base_filters * 2**depth, "bottleneck", conv_kwargs)
        if dropout:
            x = keras.layers.Dropout(dropout, name="bottleneck_dropout")(x)
        level_filters = {level: base_filters * 2 ** (level - 1) for level in range(1, depth + 1)}
    else:
        skips, x = _backbone_encoder(inputs, backbone, backbone_kwargs, input_shape, owner)
        if dropout:
            x = keras.layers.Dropout(dropout, name="bottleneck_dropout")(x)
        # one extra decoder level (full resolution) below C1: filters shift by one level, so
        # base_filters=16 gives segmentation_models' (256, 128, 64, 32, 16)
        level_filters = {level: base_filters * 2**level for level in range(1, depth + 1)}
    for level in range(depth, 0, -1):
        filters = level_filters[level]
        skip = skips[level - 1]
        if attention and level in attention_levels:
            # gating signal: the decoder feature one level deeper, before upsampling; at the
            # deepest level the bottleneck through a 1x1 conv-norm-act (the authors'
            # UnetGridGatingSignal), which feeds only the gate, not the decoder.
            g = x
            if level == depth and gating_conv:
                g = ConvNormAct(x.shape[-1], 1, name="gating_conv", **conv_kwargs)(x)
            inter = max(1, skip.shape[-1] // attention_reduction)
            skip = AttentionGate(
                inter, kernel_initializer=kernel_initializer, name=f"dec{level}_attention"
            )([skip, g])
        x = _upsample(x, filters, f"dec{level}", upsampling, kernel_initializer)
        if padding == "valid":
            skip = _center_crop(skip, x, f"dec{level}_crop")
        x = keras.layers.Concatenate(name=f"dec{level}_concat")([skip, x])
        x = _double_conv(x, filters, f"dec{level}", conv_kwargs)
    if backbone is not None:
        x = _upsample(x, base_filters, "dec0", upsampling, kernel_initializer)
        x = _double_conv(x, base_filters, "dec0", conv_kwargs)
    outputs = _logits(x, num_classes, final_activation, kernel_initializer)
    return keras.Model(inputs, outputs, name=name)


@register("unet", task="segmentation", paper="Ronneberger et al. 2015, U-Net (MICCAI)")
def UNet(
    input_shape=(256, 256, 3),
    num_classes=2,
    *,
    depth=4,
    base_filters=64,
    norm="batch",
    activation="relu",
    upsampling="transpose",
    dropout=0.0,
    final_activation=None,
    kernel_initializer="he_normal",
    padding="same",
    backbone=None,
    backbone_kwargs=None,
    name="unet",
):
    """Build a U-Net as a functional `keras.Model` mapping "image" to per-pixel "logits".

    Args:
        input_shape: (height, width, channels). With padding="same" height and width may be
            None (any multiple of 2**depth at run time) and must be multiples of 2**depth when
            given; with padding="valid" they must be static sizes the unpadded network accepts
            (`unet_valid_output_size`; 572 for the paper's tile); with a backbone, multiples of 32.
        num_classes: output channels of the final 1x1 conv (>= 1).
        depth: number of 2x2 max-pooling steps (the paper: 4; 4 with a backbone).
        base_filters: filters of the first level, doubled at each level (the paper: 64). With a
            backbone the decoder at C_l has base_filters * 2**l filters and the final
            full-resolution block base_filters.
        norm: normalization after each conv ("batch", "sync_batch", "group", "layer",
            "instance" or None; the paper: None).
        activation: Keras activation name (the paper: "relu").
        upsampling: "transpose" (2x2 transposed conv, stride 2) or "bilinear" (bilinear resize
            then 2x2 conv); both halve the filters.
        dropout: dropout rate at the end of the contracting path (the paper: 0.5): a Dropout
            "enc<depth>_dropout" on the deepest encoder level's output (before its pooling, so
            its skip is dropped too) and "bottleneck_dropout" on the bottleneck's output, as in
            the reference Keras port (zhixuhao/unet, drop4 / drop5). With a backbone only C5
            (the bottleneck) is dropped.
        final_activation: None for logits, or "softmax" / "sigmoid".
        kernel_initializer: initializer of every conv, the 1x1 head included (the paper: He
            normal).
        padding: "same" (output size = input size) or "valid" (the paper: unpadded 3x3 convs,
            skips center-cropped; 572 -> 388 for depth 4).
        backbone: None (the paper's encoder), a ResNet name ("resnet18", ... see
            `dlmodels.models.backbone.BACKBONES`) or a backbone model declaring C1..C5.
        backbone_kwargs: keyword arguments for a backbone given by name (norm, ...).
        name: model name.

    Returns:
        `keras.Model` with input "image" (batch, H, W, C) and output "logits"
        (batch, H', W', num_classes) in float32 (also under a mixed-precision policy); H' = H
        except with padding="valid" (`unet_valid_output_size(H, depth)`).
    """
    return _build_unet(
        "UNet",
        input_shape,
        num_classes,
        depth,
        base_filters,
        norm,
        activation,
        upsampling,
        dropout,
        final_activation,
        kernel_initializer,
        name,
        padding=padding,
        backbone=backbone,
        backbone_kwargs=backbone_kwargs,
    )


@register(
    "attention_unet",
    task="segmentation",
    paper="Oktay et al. 2018, Attention U-Net: Learning Where to Look for the Pancreas (MIDL)",
)
def AttentionUNet(
    input_shape=(256, 256, 3),
    num_classes=2,
    *,
    depth=4,
    base_filters=64,
    norm="batch",
    activation="relu",
    upsampling="transpose",
    dropout=0.0,
    final_activation=None,
    kernel_initializer="he_normal",
    backbone=None,
    backbone_kwargs=None,
    attention_levels=None,
    attention_reduction=1,
    gating_conv=True,
    name="attention_unet",
):
    """Build an Attention U-Net: the (same-padded) U-Net with additive attention gates on its
    skip connections (Oktay et al. 2018).

    At a gated decoder level l the skip x_l is replaced by `AttentionGate(F_int)([x_l, g])`
    where g is the decoder feature one level deeper, before it is upsampled (the paper's
    figure 1); the gate is the identity on the shapes. The defaults follow the authors' model
    (ozan-oktay/Attention-Gated-Networks, `unet_CT_single_att_dsv_3D`): levels 2..depth are
    gated and the full-resolution skip is not (`up_concat1(conv1, up2)`); F_int = C_x, the
    skip's channels (`inter_size=filters[l]`); and the deepest gate's signal is the bottleneck
    through a 1x1 conv-norm-act "gating_conv" (`UnetGridGatingSignal3`). Their deep-supervision
    heads and the gates' output 1x1 conv-BN-ReLU are left out. Arguments and outputs as `UNet`
    (padding is "same"), and:

    Args:
        attention_levels: decoder levels whose skip is gated: None (2..depth, the authors'),
            "all" (1..depth) or a collection of ints in 1..depth (1 = full resolution; with a
            backbone level l is the skip C_l).
        attention_reduction: F_int = max(1, C_x // attention_reduction) (1, the authors'
            model; 2 gives `AttentionGate`'s own default C_x // 2).
        gating_conv: derive the deepest gate's signal by a 1x1 conv-norm-act on the bottleneck
            (True, the authors'), or use the bottleneck itself (False).

    Returns:
        `keras.Model` "image" (batch, H, W, C) -> "logits" (batch, H, W, num_classes), float32.
    """
    return _build_unet(
        "AttentionUNet",
        input_shape,
        num_classes,
        depth,
        base_filters,
        norm,
        activation,
        upsampling,
        dropout,
        final_activation,
        kernel_initializer,
        name,
        backbone=backbone,
        backbone_kwargs=backbone_kwargs,
        attention=True,
        attention_levels=attention_levels,
        attention_reduction=attention_reduction,
        gating_conv=gating_conv,
    )


def _resunet_stem(x, filters, norm, activation, conv_kwargs, norm_kwargs):
    """The paper's first unit (figure 3): conv -> norm -> act -> conv, plus a 1x1 projection of
    the input: no norm / activation on the raw image."""
    has_norm = norm is not None
    h = keras.layers.Conv2D(
        filters, 3, padding="same", use_bias=not has_norm, name="enc1_conv1", **conv_kwargs
    )(x)
    n = make_norm(norm, channels=filters, name="enc1_norm1", **norm_kwargs)
    if n is not None:
        h = n(h)
    a = make_activation(activation, name="enc1_act1")
    if a is not None:
        h = a(h)
    h = keras.layers.Conv2D(filters, 3, padding="same", name="enc1_conv2", **conv_kwargs)(h)
    s = keras.layers.Conv2D(filters, 1, name="enc1_shortcut", **conv_kwargs)(x)
    return keras.layers.Add(name="enc1_add")([h, s])


@register(
    "resunet",
    task="segmentation",
    paper="Zhang, Liu & Wang 2018, Road Extraction by Deep Residual U-Net (IEEE GRSL)",
)
def ResUNet(
    input_shape=(224, 224, 3),
    num_classes=2,
    *,
    depth=None,
    base_filters=64,
    norm="batch",
    activation="relu",
    upsampling="nearest",
    dropout=0.0,
    final_activation=None,
    kernel_initializer="he_normal",
    backbone=None,
    backbone_kwargs=None,
    name="resunet",
):
    """Build a deep residual U-Net (ResUNet, Zhang, Liu & Wang 2018).

    Encoder: unit 1 is conv3x3 -> norm -> act -> conv3x3 plus a 1x1 projection of the image
    (figure 3: no pre-activation on the raw input); units 2..depth and the bridge are full
    pre-activation residual units (`ResidualBlock(preact=True)`: norm -> act -> conv3x3 (stride 2)
    -> norm -> act -> conv3x3, plus a 1x1 stride-2 projection of the pre-activated input),
    doubling the filters. Decoder: parameter-free 2x upsampling, concatenation with the encoder
    unit of the same size, a pre-activation residual unit (stride 1) halving the filters; then a
    1x1 conv. The paper's model (table 1) is `ResUNet((224, 224, 3), 1, depth=3,
    base_filters=64)` with a sigmoid: 7.8M parameters. Convolutions carry a bias only where no
    norm follows them.

    Args:
        input_shape: (height, width, channels); height and width multiples of 2**depth (of 32
            with a backbone) or None.
        num_classes: output channels (>= 1). The default 2 (background, road) trains with the
            default softmax cross-entropy and metrics, like `UNet`; the paper's model has 1
            channel with a sigmoid (`num_classes=1`, which then needs a binary loss and
            metrics).
        depth: number of stride-2 units (encoder units 2..depth and the bridge); None means 3
            (the paper) without a backbone and 4 with one.
        base_filters: filters of unit 1, doubled per level (the paper: 64). With a backbone the
            decoder unit at C_l has base_filters * 2**l filters and the full-resolution one
            base_filters.
        norm, activation: of every unit (the paper: batch norm, ReLU).
        upsampling: "nearest" or "bilinear" 2x resize (no parameters).
        dropout: dropout rate on the bridge output (the paper: 0).
        final_activation: None for logits, or "sigmoid" / "softmax".
        kernel_initializer: of every conv, the 1x1 head included.
        backbone, backbone_kwargs: as `UNet`: C1..C4 skips, C5 replaces the bridge.
        name: model name.

    Returns:
        `keras.Model` "image" (batch, H, W, C) -> "logits" (batch, H, W, num_classes), float32.
    """
    owner = "ResUNet"
    if depth is None:
        depth = 3 if backbone is None else _BACKBONE_DEPTH
    depth, base_filters, num_classes, norm, activation, final_activation, dropout = _check_common(
        owner,
        input_shape,
        num_classes,
        depth,
        base_filters,
        norm,
        activation,
        final_activation,
        dropout,
        backbone,
    )
    upsampling = check_choice("upsampling", upsampling, RESUNET_UPSAMPLING, owner=owner)
    if backbone_kwargs is not None and backbone is None:
        raise UserError(f"{owner}: `backbone_kwargs` needs a `backbone` name; got backbone=None.")
    if backbone is None:
        check_divisible_input(tuple(input_shape), depth, owner=owner)
    unit_kwargs = {
        "preact": True,
        "norm": norm,
        "activation": activation,
        "use_bias": None,
        "kernel_initializer": kernel_initializer,
    }
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    if backbone is None:
        x = _resunet_stem(
            inputs, base_filters, norm, activation, {"kernel_initializer": kernel_initializer}, {}
        )
        skips = [x]
        for level in range(2, depth + 1):
            x = ResidualBlock(
                base_filters * 2 ** (level - 1), 2, name=f"enc{level}", **unit_kwargs
            )(x)
            skips.append(x)
        x = ResidualBlock(base_filters * 2**depth, 2, name="bridge", **unit_kwargs)(x)
        level_filters = {level: base_filters * 2 ** (level - 1) for level in range(1, depth + 1)}
    else:
        skips, x = _backbone_encoder(inputs, backbone, backbone_kwargs, input_shape, owner)
        level_filters = {level: base_filters * 2**level for level in range(1, depth + 1)}
    if dropout:
        x = keras.layers.Dropout(dropout, name="bridge_dropout")(x)
    for level in range(depth, 0, -1):
        x = keras.layers.UpSampling2D(2, interpolation=upsampling, name=f"dec{level}_up")(x)
        x = keras.layers.Concatenate(name=f"dec{level}_concat")([skips[level - 1], x])
        x = ResidualBlock(level_filters[level], 1, name=f"dec{level}", **unit_kwargs)(x)
    if backbone is not None:
        x = keras.layers.UpSampling2D(2, interpolation=upsampling, name="dec0_up")(x)
        x = ResidualBlock(base_filters, 1, name="dec0", **unit_kwargs)(x)
    outputs = _logits(x, num_classes, final_activation, kernel_initializer)
    return keras.Model(inputs, outputs, name=name)


# -- tiled prediction ----------------------------------------------------------------------------
def _tile_starts(size: int, tile: int, step: int) -> list[int]:
    """Starts of tiles of length `tile` every `step` covering [0, size); the last one ends at
    `size` (shifted back) so no tile leaves the image. `size` >= `tile`."""
    starts = list(range(0, size - tile + 1, step))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def _owned_ranges(starts: list[int], tile: int, size: int) -> list[tuple[int, int]]:
    """Split [0, size) among overlapping tiles at the midpoints of their overlaps: every pixel
    goes to the tile whose nearest inner border is farthest away."""
    bounds = [0]
    for a, b in itertools.pairwise(starts):
        bounds.append((b + a + tile) // 2)
    bounds.append(size)
    return list(itertools.pairwise(bounds))


def _main_output(model, out):
    """The main output of a (possibly multi-output) model's result: the one named "logits"
    (UNet++ / UNet 3+ deep supervision, UNet 3+'s CGM), else the first; a single tensor as is."""
    if isinstance(out, dict):
        return out["logits"] if "logits" in out else next(iter(out.values()))
    if isinstance(out, list | tuple):
        from dlmodels.training.tasks import main_output_index

        return out[main_output_index(model)]
    return out


def _model_output_size(model, tile_size, channels):
    try:
        shape = _main_output(model, model.compute_output_shape((1, tile_size, tile_size, channels)))
        if shape[1] is not None and shape[2] is not None:
            return int(shape[1]), int(shape[2]), int(shape[3])
    except (TypeError, ValueError, NotImplementedError):  # cannot infer it: run the model once
        pass
    out = model.predict(np.zeros((1, tile_size, tile_size, channels), "float32"), verbose=0)
    out = np.asarray(_main_output(model, out))
    return out.shape[1], out.shape[2], out.shape[3]


def _predict_batches(model, tiles, batch_size):
    outs = []
    for i in range(0, len(tiles), batch_size):
        batch = np.stack(tiles[i : i + batch_size]).astype("float32")
        pred = _main_output(model, model.predict_on_batch(batch))
        outs.append(np.asarray(pred, dtype="float32"))
    return np.concatenate(outs, axis=0)


def predict_tiled(model, image, *, tile_size=None, overlap=None, batch_size=4):
    """Predict a large image tile by tile with a segmentation model; returns (H, W, classes).

    Two strategies, picked from the model's output size for one tile:

    - Same-size models (padding="same", output tile = input tile): square tiles of `tile_size`
      every `tile_size - overlap` pixels (the last row / column of tiles is shifted back to end
      at the image border), and every output pixel is taken from the tile whose inner border is
      farthest from it (the overlaps are split at their midpoints, "crop and stitch"). A pixel
      is predicted exactly as in the whole image when the model's receptive-field radius is at
      most overlap // 2 and every tile start is a multiple of the model's total stride (2**depth
      for a U-Net: then the tiles' pooling grids coincide with the whole image's). Images
      smaller than a tile are mirror-padded to one tile.
    - Unpadded models (padding="valid", output tile o < input tile t): the paper's overlap-tile
      strategy (Ronneberger et al. 2015, figure 2): the image is mirror-padded by the context
      margin (t - o) / 2 (and at the bottom / right up to a multiple of o), input tiles start
      every o pixels and each output tile is exactly the o x o block it covers; the missing
      context at the image border is extrapolated by mirroring. `overlap` is fixed by the model
      (t - o) and may be omitted.

    Args:
        model: a Keras model mapping (batch, t, t, C) to (batch, o, o, classes); of a
            multi-output model (deep supervision, UNet 3+'s CGM) the main output is used, the
            one named "logits" (else the first).
        image: array (H, W, C).
        tile_size: input tile side t; None means the model's static input size (required when
            the model's input size is unknown). A model with a static input size only takes
            that size.
        overlap: pixels shared by neighbouring tiles of a same-size model, in [0, tile_size);
            None means tile_size // 4. For an unpadded model None or tile_size - o.
        batch_size: tiles per forward pass (>= 1).

    Returns:
        float32 array (H, W, classes).
    """
    owner = "predict_tiled"
    image = np.asarray(image)
    if image.ndim != 3:
        raise UserError(f"{owner}: `image` must be (height, width, channels), got {image.shape}.")
    batch_size = check_positive_int("batch_size", batch_size, owner=owner)
    height, width, channels = image.shape
    static = tuple(model.input_shape[1:3])
    if tile_size is None:
        if None in static or static[0] != static[1]:
            raise UserError(
                f"{owner}: `tile_size` is needed: the model's input size is {static}. Pass "
                "e.g. tile_size=256."
            )
        tile_size = static[0]
    tile_size = check_positive_int("tile_size", tile_size, owner=owner)
    if None not in static and static != (tile_size, tile_size):
        raise UserError(
            f"{owner}: `tile_size`={tile_size} does not fit the model, whose input size is "
            f"fixed to {static}. Pass tile_size={static[0]} (or build the model with "
            "input_shape=(None, None, C))."
        )
    out_h, out_w, classes = _model_output_size(model, tile_size, channels)
    if out_h != out_w or out_h > tile_size or (tile_size - out_h) % 2:
        raise UserError(
            f"{owner}: the model maps a {tile_size}x{tile_size} tile to {out_h}x{out_w}; "
            "predict_tiled supports same-size outputs and centered valid outputs."
        )
    if out_h < tile_size:
        return _predict_overlap_tile(
            model, image, tile_size, out_h, overlap, batch_size, classes, owner
        )
    if overlap is None:
        overlap = tile_size // 4
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile_size:
        raise UserError(
            f"{owner}: `overlap`={overlap!r} must be an integer in [0, tile_size={tile_size})."
        )
    pad_h, pad_w = max(0, tile_size - height), max(0, tile_size - width)
    padded = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric")
    ph, pw = padded.shape[:2]
    step = tile_size - overlap
    rows, cols = _tile_starts(ph, tile_size, step), _tile_starts(pw, tile_size, step)
    tiles = [padded[r : r + tile_size, c : c + tile_size] for r in rows for c in cols]
    preds = _predict_batches(model, tiles, batch_size)
    result = np.zeros((ph, pw, classes), "float32")
    row_ranges, col_ranges = _owned_ranges(rows, tile_size, ph), _owned_ranges(cols, tile_size, pw)
    k = 0
    for r, (r0, r1) in zip(rows, row_ranges, strict=True):
        for c, (c0, c1) in zip(cols, col_ranges, strict=True):
            result[r0:r1, c0:c1] = preds[k, r0 - r : r1 - r, c0 - c : c1 - c]
            k += 1
    return result[:height, :width]


def _predict_overlap_tile(model, image, tile, out, overlap, batch_size, classes, owner):
    margin = (tile - out) // 2
    if overlap is not None and overlap != tile - out:
        raise UserError(
            f"{owner}: `overlap`={overlap!r} does not fit this unpadded model: it maps "
            f"{tile}-pixel tiles to {out} pixels, so neighbouring input tiles share exactly "
            f"{tile - out} pixels. Pass overlap=None or overlap={tile - out}."
        )
    height, width = image.shape[:2]
    n_rows, n_cols = math.ceil(height / out), math.ceil(width / out)
    padded = np.pad(
        image,
        (
            (margin, margin + n_rows * out - height),
            (margin, margin + n_cols * out - width),
            (0, 0),
        ),
        mode="symmetric",
    )
    starts = [(i * out, j * out) for i in range(n_rows) for j in range(n_cols)]
    tiles = [padded[r : r + tile, c : c + tile] for r, c in starts]
    preds = _predict_batches(model, tiles, batch_size)
    result = np.zeros((n_rows * out, n_cols * out, classes), "float32")
    for (r, c), pred in zip(starts, preds, strict=True):
        result[r : r + out, c : c + out] = pred
    return result[:height, :width]

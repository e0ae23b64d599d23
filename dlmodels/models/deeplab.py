"""DeepLabv3 (Chen et al. 2017, "Rethinking Atrous Convolution for Semantic Image Segmentation")
and DeepLabv3+ (Chen et al. 2018, "Encoder-Decoder with Atrous Separable Convolution for
Semantic Image Segmentation", ECCV).

    DeepLabV3:     image -> dilated ResNet (output stride 16 or 8) -> C5 -> ASPP -> 1x1 classifier
                   -> bilinear resize to the image size
    DeepLabV3Plus: ASPP(C5) -> bilinear resize to C2's size --.
                   C2 (stride 4) -> 1x1 conv-BN-ReLU (48) ------> concat -> 2 x 3x3 conv-BN-ReLU
                   (256) -> 1x1 classifier -> bilinear resize to the image size

Decisions:
- Every resize goes to the *runtime* size of its reference tensor (`ResizeLike`), not by a fixed
  factor: a ResNet rounds its sizes up (248 -> C2 62 -> C5 16 at output stride 16), so
  upsampling C5 by 16 would give 256, not 248. Inputs may therefore have `None` height and
  width, and the output always has the input's size, in Keras and after ONNX export.
- Bilinear resizing with half-pixel centers (align_corners=False; ONNX `Resize` "half_pixel").
  The authors' TF code used align_corners=True with inputs of size k * output_stride + 1; the
  half-pixel convention is TF2's and PyTorch's default and needs no special input sizes.
- Minimum input: each known spatial size must be at least `2 * output_stride` (C5 at least
  2 x 2 cells; smaller inputs collapse it to a single cell where every branch of ASPP sees the
  same value). `None` sizes are checked by nobody at run time: any size >= 1 runs.
- Multi-grid (DeepLabv3 section 3.2): stage 5's blocks get rates `multigrid` x the stage's
  dilation; (1, 2, 4) for the three blocks of ResNet-34/50/101/152. ResNet-18's stage 5 has two
  blocks: a longer `multigrid` is cut to its first two rates, (1, 2).
"""

from __future__ import annotations

import keras

from dlmodels._validation import check_choice, check_positive_int
from dlmodels.errors import UserError
from dlmodels.layers.aspp import ASPP, rates_for_output_stride
from dlmodels.layers.conv import (
    ConvNormAct,
    make_activation,
    make_norm,
    validate_activation,
    validate_norm,
)
from dlmodels.layers.resize import ResizeLike
from dlmodels.models.backbone import build_backbone
from dlmodels.models.registry import register

OUTPUT_STRIDES = (8, 16, 32)
_STAGE5_BLOCKS = {"resnet18": 2}  # every other dlmodels ResNet has 3 blocks in stage 5

DEEPLABV3_PAPER = (
    "Chen et al. 2017, Rethinking Atrous Convolution for Semantic Image Segmentation (DeepLabv3)"
)
DEEPLABV3PLUS_PAPER = (
    "Chen et al. 2018, Encoder-Decoder with Atrous Separable Convolution for Semantic Image "
    "Segmentation (DeepLabv3+, ECCV)"
)


def check_segmentation_input(input_shape, minimum: int, *, owner: str, why: str) -> tuple:
    """Validate `input_shape` = (height, width, channels) of a segmenter and return it as a tuple.

    Height and width may be None (any size at run time); known ones must be >= `minimum`
    (`why` says where the minimum comes from). Channels must be a known positive int.
    """
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = None
    if shape is None or len(shape) != 3:
        raise UserError(
            f"{owner}: `input_shape` must be (height, width, channels), got {input_shape!r}."
        )
    channels = shape[-1]
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise UserError(
            f"{owner}: the channel count of `input_shape`={shape!r} must be a known positive "
            "int, e.g. (None, None, 3)."
        )
    for axis, size in zip(("height", "width"), shape[:2], strict=True):
        if size is None:
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < minimum:
            raise UserError(
                f"{owner}: `input_shape`={shape!r} has {axis} {size!r}, below the minimum "
                f"{minimum} ({why}). Pass a larger input, or None for a size known at run time."
            )
    return shape


def resolve_multigrid(backbone, multigrid, *, owner="DeepLabV3"):
    """`multigrid` as passed to the backbone: None stays None; for a ResNet name the rates are
    cut to the blocks of its stage 5 (ResNet-18: 2); a backbone model ignores it (fixed rates).

    Raises:
        UserError: `multigrid` is not a sequence of positive ints, or (for a ResNet name) it
            has fewer rates than stage 5 has blocks.
    """
    if multigrid is None:
        return None
    blocks = _STAGE5_BLOCKS.get(backbone.lower(), 3) if isinstance(backbone, str) else None
    example = (1, 2, 4)[: blocks or 3]
    try:
        rates = tuple(multigrid)
    except TypeError:
        rates = None
    if (
        isinstance(multigrid, str)
        or not rates
        or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rates)
        or (blocks is not None and len(rates) < blocks)
    ):
        where = (
            f"one positive int per stage-5 block of {backbone} ({blocks}; a longer sequence is "
            f"cut to its first {blocks})"
            if blocks is not None
            else "positive ints, one per stage-5 block"
        )
        raise UserError(
            f"{owner}: `multigrid`={multigrid!r} must hold {where}, e.g. {example}, or be None "
            "for no multi-grid."
        )
    if blocks is None:
        return None
    return rates[:blocks]


def _backbone_kwargs(backbone, backbone_kwargs, norm):
    """The decoder's `norm` also normalizes a backbone built by name, unless overridden."""
    if not isinstance(backbone, str):
        return backbone_kwargs
    kwargs = dict(backbone_kwargs or {})
    kwargs.setdefault("norm", norm)
    return kwargs


def logits_head(x, num_classes, image, final_activation, *, name="classifier"):
    """1x1 classifier, bilinear resize to `image`'s runtime size, float32 output "logits"."""
    x = keras.layers.Conv2D(num_classes, 1, name=name)(x)
    x = ResizeLike(name="upsample")([x, image])
    # float32 output layer: keeps logits / probabilities in fp32 under mixed_float16.
    return keras.layers.Activation(final_activation or "linear", dtype="float32", name="logits")(x)


def _common_checks(owner, input_shape, num_classes, output_stride, norm, activation, final):
    check_choice("output_stride", output_stride, OUTPUT_STRIDES, owner=owner)
    num_classes = check_positive_int("num_classes", num_classes, owner=owner)
    norm = validate_norm(norm, owner=owner)
    activation = validate_activation(activation, owner=owner)
    final = validate_activation(final, name="final_activation", owner=owner)
    shape = check_segmentation_input(
        input_shape,
        2 * output_stride,
        owner=owner,
        why=f"2 x output_stride {output_stride}: C5 must have at least 2 x 2 cells",
    )
    return shape, num_classes, norm, activation, final


def _separable_conv(x, filters, prefix, norm, activation):
    """DeepLabv3+'s depthwise-separable 3x3 conv: 3x3 depthwise conv -> norm -> act, then a 1x1
    conv-norm-act to `filters` (Chen et al. 2018, section 3.2; as ASPP's separable branches)."""
    x = keras.layers.DepthwiseConv2D(
        3,
        padding="same",
        use_bias=norm is None,
        depthwise_initializer="he_normal",
        name=f"{prefix}_depthwise",
    )(x)
    n = make_norm(norm, channels=x.shape[-1], name=f"{prefix}_depthwise_norm")
    if n is not None:
        x = n(x)
    a = make_activation(activation, name=f"{prefix}_depthwise_act")
    if a is not None:
        x = a(x)
    return ConvNormAct(filters, 1, norm=norm, activation=activation, name=f"{prefix}_pointwise")(x)


def _encoder(
    inputs,
    backbone,
    output_stride,
    multigrid,
    backbone_kwargs,
    rates,
    aspp_filters,
    *,
    norm,
    activation,
    dropout,
    separable,
    owner,
):
    """DeepLabv3's encoder, shared by both models: the (dilated) backbone's features C1..C5
    and ASPP on C5. Returns (features, aspp_output)."""
    features, _ = build_backbone(
        backbone,
        inputs,
        output_stride=output_stride,
        multigrid=resolve_multigrid(backbone, multigrid, owner=owner),
        backbone_kwargs=_backbone_kwargs(backbone, backbone_kwargs, norm),
        owner=owner,
    )
    rates = rates_for_output_stride(output_stride) if rates is None else rates
    aspp_filters = check_positive_int("aspp_filters", aspp_filters, owner=owner)
    x = ASPP(
        aspp_filters,
        rates,
        norm=norm,
        activation=activation,
        dropout=dropout,
        separable=separable,
        name="aspp",
    )(features["C5"])
    return features, x


@register("deeplabv3", task="segmentation", paper=DEEPLABV3_PAPER)
def DeepLabV3(
    input_shape=(512, 512, 3),
    num_classes=21,
    *,
    backbone="resnet50",
    output_stride=16,
    multigrid=(1, 2, 4),
    aspp_filters=256,
    rates=None,
    norm="batch",
    activation="relu",
    dropout=0.1,
    separable=False,
    final_activation=None,
    backbone_kwargs=None,
    name="deeplabv3",
):
    """Build DeepLabv3: a dilated ResNet, ASPP on its last feature map, a 1x1 classifier and a
    bilinear resize to the input size (Chen et al. 2017).

    Args:
        input_shape: (height, width, channels); height and width may be None (any size at run
            time), known ones must be >= 2 * output_stride.
        num_classes: output channels (>= 1).
        backbone: a ResNet name ("resnet18" ... "resnet152v2"; built flat and dilated inside
            this model) or a functional backbone model declaring FeatureTap features C1..C5
            (its output stride must equal `output_stride`).
        output_stride: 8, 16 (the paper's default for training) or 32: stride of C5.
        multigrid: stage 5 unit rates (the paper: (1, 2, 4)); None for none. Cut to the
            number of stage 5 blocks for a ResNet name, ignored for a backbone model.
        aspp_filters: channels of ASPP (the paper: 256).
        rates: ASPP atrous rates; None = `rates_for_output_stride(output_stride)`
            ((6, 12, 18) at 16, (12, 24, 36) at 8).
        norm: normalization of the head and (unless `backbone_kwargs` sets it) of a ResNet
            built by name.
        activation: activation of the head.
        dropout: dropout after ASPP's projection (0.1).
        separable: depthwise-separable atrous convs in ASPP.
        final_activation: None for logits, or "softmax" / "sigmoid".
        backbone_kwargs: further arguments of the ResNet built by name (e.g. se_ratio).
        name: model name.

    Returns:
        `keras.Model` with input "image" and output "logits" (batch, H, W, num_classes),
        float32 also under mixed precision.

    Raises:
        ValueError: an unknown backbone, an output stride outside 8 / 16 / 32, an input below
            the minimum size, or another invalid argument (the message says which).
    """
    owner = "DeepLabV3"
    shape, num_classes, norm, activation, final_activation = _common_checks(
        owner, input_shape, num_classes, output_stride, norm, activation, final_activation
    )
    inputs = keras.Input(shape=shape, name="image")
    _, x = _encoder(
        inputs,
        backbone,
        output_stride,
        multigrid,
        backbone_kwargs,
        rates,
        aspp_filters,
        norm=norm,
        activation=activation,
        dropout=dropout,
        separable=separable,
        owner=owner,
    )
    outputs = logits_head(x, num_classes, inputs, final_activation)
    return keras.Model(inputs, outputs, name=name)


@register("deeplabv3plus", task="segmentation", paper=DEEPLABV3PLUS_PAPER)
def DeepLabV3Plus(
    input_shape=(512, 512, 3),
    num_classes=21,
    *,
    backbone="resnet50",
    output_stride=16,
    multigrid=(1, 2, 4),
    aspp_filters=256,
    rates=None,
    low_level_filters=48,
    decoder_filters=256,
    norm="batch",
    activation="relu",
    dropout=0.1,
    separable=False,
    final_activation=None,
    backbone_kwargs=None,
    name="deeplabv3plus",
):
    """Build DeepLabv3+: DeepLabv3's encoder with a decoder refining object boundaries with the
    stride-4 feature map C2 (Chen et al. 2018).

    The ASPP output is resized to C2's runtime size and concatenated with C2 reduced to
    `low_level_filters` (48) channels by a 1x1 conv-BN-ReLU (fewer low-level channels keep the
    rich encoder features from being outweighed); two 3x3 conv-BN-ReLU (`decoder_filters`,
    256; depthwise-separable with `separable=True`) refine, a 1x1 conv classifies, and a
    bilinear resize gives the input size.

    Args:
        input_shape, num_classes, backbone, output_stride, multigrid, aspp_filters, rates,
        norm, activation, dropout, separable, final_activation, backbone_kwargs, name: as
            `DeepLabV3` (the paper's Xception backbone is not provided). `separable=True`
            makes both ASPP's atrous branches and the two 3x3 decoder convs depthwise-separable
            (3x3 depthwise conv -> norm -> act -> 1x1 conv-norm-act, layers
            "decoder_conv<i>_depthwise" / "_pointwise"), as the paper applies depthwise-separable
            convolution "to both ASPP and decoder modules" (section 4).
        low_level_filters: channels C2 is reduced to (the paper: 48).
        decoder_filters: channels of the two 3x3 decoder convs (the paper: 256).

    Returns:
        `keras.Model` with input "image" and output "logits" (batch, H, W, num_classes),
        float32 also under mixed precision.

    Raises:
        ValueError: as `DeepLabV3`.
    """
    owner = "DeepLabV3Plus"
    shape, num_classes, norm, activation, final_activation = _common_checks(
        owner, input_shape, num_classes, output_stride, norm, activation, final_activation
    )
    low_level_filters = check_positive_int("low_level_filters", low_level_filters, owner=owner)
    decoder_filters = check_positive_int("decoder_filters", decoder_filters, owner=owner)
    inputs = keras.Input(shape=shape, name="image")
    features, x = _encoder(
        inputs,
        backbone,
        output_stride,
        multigrid,
        backbone_kwargs,
        rates,
        aspp_filters,
        norm=norm,
        activation=activation,
        dropout=dropout,
        separable=separable,
        owner=owner,
    )
    conv_kwargs = {"norm": norm, "activation": activation}
    low = ConvNormAct(low_level_filters, 1, name="decoder_low_level", **conv_kwargs)(features["C2"])
    x = ResizeLike(name="decoder_upsample")([x, low])
    x = keras.layers.Concatenate(name="decoder_concat")([x, low])
    for i in (1, 2):
        if separable:
            x = _separable_conv(x, decoder_filters, f"decoder_conv{i}", norm, activation)
        else:
            x = ConvNormAct(decoder_filters, 3, name=f"decoder_conv{i}", **conv_kwargs)(x)
    outputs = logits_head(x, num_classes, inputs, final_activation)
    return keras.Model(inputs, outputs, name=name)

"""PSPNet (Zhao et al. 2017, "Pyramid Scene Parsing Network", CVPR) on a dilated ResNet.

    image -> dilated ResNet (output stride 8) -> C5 (C channels)
    pyramid pooling module: for each bin size b in `bins` (the paper: 1, 2, 3, 6):
        adaptive average pool C5 to b x b -> 1x1 conv-BN-ReLU (C / len(bins) channels)
        -> bilinear resize to C5's runtime size
    concat [C5, the pooled levels] -> 3x3 conv-BN-ReLU (512) -> dropout (0.1) -> 1x1 classifier
    -> bilinear resize to the image size

Decisions:
- Adaptive pooling uses PyTorch's bin edges (`dlmodels.layers.AdaptiveAveragePooling2D`): exact
  average pooling when C5's size is static and divisible by the bin, averaging matrices built
  from the runtime size otherwise (non-divisible or `None` sizes), so an ONNX export with
  dynamic height and width pools exactly like Keras at every size.
- Minimum input: known spatial sizes >= max(bins) * output_stride (48 for the paper's bins at
  output stride 8), so C5 has at least as many cells as the finest bin grid and no bin repeats a
  cell. Smaller `None` sizes still run (bins then overlap).
- The auxiliary loss on stage 4 (the paper's deep supervision for training) is not part of this
  inference model.
"""

from __future__ import annotations

import keras

from dlmodels._validation import check_choice, check_positive_int
from dlmodels.errors import UserError
from dlmodels.layers.conv import ConvNormAct, validate_activation, validate_norm
from dlmodels.layers.resize import AdaptiveAveragePooling2D, ResizeLike
from dlmodels.models.backbone import build_backbone
from dlmodels.models.deeplab import (
    OUTPUT_STRIDES,
    _backbone_kwargs,
    check_segmentation_input,
    logits_head,
    resolve_multigrid,
)
from dlmodels.models.registry import register
from dlmodels.models.unet_plus_plus import check_dropout

PAPER = "Zhao et al. 2017, Pyramid Scene Parsing Network (CVPR)"


@register("pspnet", task="segmentation", paper=PAPER)
def PSPNet(
    input_shape=(473, 473, 3),
    num_classes=21,
    *,
    bins=(1, 2, 3, 6),
    backbone="resnet50",
    output_stride=8,
    multigrid=None,
    head_filters=512,
    norm="batch",
    activation="relu",
    dropout=0.1,
    final_activation=None,
    backbone_kwargs=None,
    name="pspnet",
):
    """Build PSPNet: a dilated ResNet, the pyramid pooling module on C5, a 3x3 conv, a 1x1
    classifier and a bilinear resize to the input size (Zhao et al. 2017).

    Args:
        input_shape: (height, width, channels); height and width may be None, known ones must
            be >= max(bins) * output_stride.
        num_classes: output channels (>= 1).
        bins: pyramid bin sizes, distinct positive ints (the paper: (1, 2, 3, 6)); each level
            has C5's channels / len(bins) channels (at least 1).
        backbone: a ResNet name (built flat inside the model and dilated) or a functional
            backbone model declaring FeatureTap features (output stride = `output_stride`).
        output_stride: 8 (the paper), 16 or 32: stride of C5.
        multigrid: optional stage 5 unit rates for a ResNet name (the paper: None).
        head_filters: channels of the 3x3 conv after the concatenation (the paper: 512).
        norm: normalization of the head and (unless `backbone_kwargs` sets it) of the ResNet.
        activation: activation of the head.
        dropout: dropout before the classifier (the paper: 0.1).
        final_activation: None for logits, or "softmax" / "sigmoid".
        backbone_kwargs: further arguments of the ResNet built by name.
        name: model name.

    Returns:
        `keras.Model` with input "image" and output "logits" (batch, H, W, num_classes),
        float32 also under mixed precision.

    Raises:
        ValueError: an unknown backbone, an output stride outside 8 / 16 / 32, bad bins, an
            input below the minimum, or another invalid argument (the message says which).
    """
    owner = "PSPNet"
    check_choice("output_stride", output_stride, OUTPUT_STRIDES, owner=owner)
    num_classes = check_positive_int("num_classes", num_classes, owner=owner)
    head_filters = check_positive_int("head_filters", head_filters, owner=owner)
    norm = validate_norm(norm, owner=owner)
    activation = validate_activation(activation, owner=owner)
    final_activation = validate_activation(final_activation, name="final_activation", owner=owner)
    try:
        bins = tuple(bins)
    except TypeError:
        bins = ()
    if not bins or len(set(bins)) != len(bins):
        raise UserError(
            f"{owner}: `bins` must be a non-empty sequence of distinct bin sizes, got {bins!r}; "
            "the paper uses (1, 2, 3, 6)."
        )
    bins = tuple(check_positive_int("bins", b, owner=owner) for b in bins)
    dropout = check_dropout("dropout", dropout, owner=owner)
    finest = max(bins)
    shape = check_segmentation_input(
        input_shape,
        max(2, finest) * output_stride,
        owner=owner,
        why=f"max(2, largest bin {finest}) x output_stride {output_stride}: C5 must have at "
        "least as many cells as the finest bin grid",
    )
    inputs = keras.Input(shape=shape, name="image")
    features, _ = build_backbone(
        backbone,
        inputs,
        output_stride=output_stride,
        multigrid=resolve_multigrid(backbone, multigrid, owner=owner),
        backbone_kwargs=_backbone_kwargs(backbone, backbone_kwargs, norm),
        owner=owner,
    )
    c5 = features["C5"]
    level_filters = max(1, c5.shape[-1] // len(bins))
    conv_kwargs = {"norm": norm, "activation": activation}
    levels = [c5]
    for b in bins:
        x = AdaptiveAveragePooling2D(b, name=f"ppm_pool{b}")(c5)
        x = ConvNormAct(level_filters, 1, name=f"ppm_conv{b}", **conv_kwargs)(x)
        levels.append(ResizeLike(name=f"ppm_upsample{b}")([x, c5]))
    x = keras.layers.Concatenate(name="ppm_concat")(levels)
    x = ConvNormAct(head_filters, 3, name="head_conv", **conv_kwargs)(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    outputs = logits_head(x, num_classes, inputs, final_activation)
    return keras.Model(inputs, outputs, name=name)

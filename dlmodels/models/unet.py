"""U-Net (Ronneberger et al. 2015, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI).

A contracting path of `depth` levels (two 3x3 conv + ReLU, then 2x2 max pooling, doubling the
filters), a bottleneck, and an expanding path (2x2 "up-convolution" halving the filters,
concatenation with the skip connection, two 3x3 conv + ReLU), then a 1x1 conv to `num_classes`.
The paper's model is `UNet(depth=4, base_filters=64, norm=None, dropout=0.5)` with one
deliberate difference: convolutions use "same" padding, so the output has the input's size and no
overlap-tile cropping is needed (the paper uses unpadded convolutions, 572 -> 388).
"""

from __future__ import annotations

import keras

from dlmodels._validation import check_choice, check_positive_int
from dlmodels.layers.conv import ConvNormAct, validate_activation, validate_norm
from dlmodels.models.registry import register

UPSAMPLING = ("transpose", "bilinear")


def check_divisible_input(input_shape, depth: int, *, owner: str = "UNet"):
    """Raise ValueError unless every known spatial size is divisible by 2**depth."""
    factor = 2**depth
    for axis, size in zip(("height", "width"), input_shape[:2], strict=True):
        if size is not None and size % factor:
            lower, upper = size // factor * factor, (size // factor + 1) * factor
            raise ValueError(
                f"{owner}: `input_shape`={tuple(input_shape)} has {axis} {size}, which a U-Net of "
                f"`depth`={depth} cannot divide: every spatial size must be a multiple of "
                f"2**depth = {factor}. Resize or pad to {lower or factor} or {upper}, or lower "
                "`depth`."
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
    # (transposed convs stay fp32 in onnxruntime's static quantization).
    x = keras.layers.UpSampling2D(2, interpolation="bilinear", name=f"{prefix}_resize")(x)
    return keras.layers.Conv2D(
        filters, 2, padding="same", kernel_initializer=kernel_initializer, name=f"{prefix}_up"
    )(x)


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
    name="unet",
):
    """Build a U-Net as a functional `keras.Model` mapping "image" to per-pixel "logits".

    Args:
        input_shape: (height, width, channels); height and width may be None (any size that is a
            multiple of 2**depth at run time) and must be multiples of 2**depth when given.
        num_classes: output channels of the final 1x1 conv (>= 1).
        depth: number of 2x2 max-pooling steps (the paper: 4).
        base_filters: filters of the first level, doubled at each level (the paper: 64).
        norm: normalization after each conv ("batch", "sync_batch", "group", "layer",
            "instance" or None; the paper: None).
        activation: Keras activation name (the paper: "relu").
        upsampling: "transpose" (2x2 transposed conv, stride 2) or "bilinear" (bilinear resize
            then 2x2 conv); both halve the filters.
        dropout: dropout rate at the end of the contracting path (the paper: 0.5).
        final_activation: None for logits, or "softmax" / "sigmoid".
        kernel_initializer: initializer of every conv (the paper: He normal).
        name: model name.

    Returns:
        `keras.Model` with input "image" (batch, H, W, C) and output "logits"
        (batch, H, W, num_classes) in float32 (also under a mixed-precision policy).
    """
    owner = "UNet"
    if len(tuple(input_shape)) != 3:
        raise ValueError(
            f"{owner}: `input_shape` must be (height, width, channels), got {input_shape!r}."
        )
    depth = check_positive_int("depth", depth, owner=owner)
    base_filters = check_positive_int("base_filters", base_filters, owner=owner)
    num_classes = check_positive_int("num_classes", num_classes, owner=owner)
    norm = validate_norm(norm, owner=owner)
    activation = validate_activation(activation, owner=owner)
    upsampling = check_choice("upsampling", upsampling, UPSAMPLING, owner=owner)
    final_activation = validate_activation(final_activation, name="final_activation", owner=owner)
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"{owner}: `dropout` must be in [0, 1), got {dropout!r}.")
    check_divisible_input(tuple(input_shape), depth, owner=owner)
    if input_shape[-1] is None:
        raise ValueError(f"{owner}: the channel count of `input_shape` must be known.")

    conv_kwargs = {"norm": norm, "activation": activation, "kernel_initializer": kernel_initializer}
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    skips = []
    for level in range(1, depth + 1):
        x = _double_conv(x, base_filters * 2 ** (level - 1), f"enc{level}", conv_kwargs)
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="bottleneck_dropout")(x)
    x = _double_conv(x, base_filters * 2**depth, "bottleneck", conv_kwargs)
    for level in range(depth, 0, -1):
        filters = base_filters * 2 ** (level - 1)
        x = _upsample(x, filters, f"dec{level}", upsampling, kernel_initializer)
        x = keras.layers.Concatenate(name=f"dec{level}_concat")([skips[level - 1], x])
        x = _double_conv(x, filters, f"dec{level}", conv_kwargs)
    x = keras.layers.Conv2D(num_classes, 1, name="head_conv")(x)
    # float32 output layer: keeps logits / probabilities in fp32 under mixed_float16.
    outputs = keras.layers.Activation(final_activation or "linear", dtype="float32", name="logits")(
        x
    )
    return keras.Model(inputs, outputs, name=name)

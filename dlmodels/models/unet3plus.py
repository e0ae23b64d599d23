"""UNet 3+ (Huang et al. 2020, "UNet 3+: A Full-Scale Connected UNet for Medical Image
Segmentation", ICASSP).

Five encoder levels X_En^1..X_En^5 (two 3x3 conv + BN + ReLU each, 2x2 max pooling between
levels, filters 64..1024) and four decoder nodes X_De^4..X_De^1 with full-scale skip
connections: X_De^i gathers *every* scale,

- the encoder maps X_En^1..X_En^{i-1} (finer), max-pooled down to level i,
- X_En^i (same scale) directly,
- the decoder maps X_De^{i+1}..X_De^5 (coarser; X_De^5 = X_En^5), bilinearly upsampled,

each through a 3x3 conv to `cat_channels` (64) + BN + ReLU; the five maps are concatenated
(5 x 64 = 320 channels) and fused by a 3x3 conv (320 filters) + BN + ReLU. Full-scale deep
supervision puts a 3x3 conv head on each decoder node and on X_En^5, bilinearly upsampled to the
input size. The classification-guided module (CGM) predicts from X_En^5 whether the organ is in
the image and multiplies the segmentation maps by that decision (see `UNet3Plus`).

With filters (64, 128, 256, 512, 1024), cat_channels 64, batch norm, 3 input channels and one
class the model has 26.97 M trainable parameters, the paper's Table 1 figure for UNet 3+ (the
authors' convs also have a bias before each BN, 6,528 more, still 26.97 M; ours do not, as a
bias before batch norm is cancelled by it).
"""

from __future__ import annotations

import keras
from keras import ops

from dlmodels._validation import check_positive_int
from dlmodels.errors import UserError
from dlmodels.layers.conv import ConvNormAct, validate_activation, validate_norm
from dlmodels.models.registry import register
from dlmodels.models.unet import _double_conv
from dlmodels.models.unet_plus_plus import (
    check_backbone_depth,
    check_dropout,
    check_input_shape,
    encoder_from_backbone,
    level_filters,
    output_activation,
    output_head,
)

PAPER = (
    "Huang et al. 2020, UNet 3+: A Full-Scale Connected UNet for Medical Image Segmentation "
    "(ICASSP)"
)


@keras.saving.register_keras_serializable(package="dlmodels")
class ClassGuidedGate(keras.layers.Layer):
    """Multiply segmentation maps by the classification-guided module's decision (UNet 3+).

    Computes `seg * argmax(cls)` per sample: `cls` holds the CGM's two probabilities
    (organ absent, organ present), so the maps pass unchanged where the CGM says "present" and
    become zero where it says "absent" (Huang et al. 2020, section 2.3; the authors' code does
    the same to the pre-sigmoid maps). The argmax has no gradient: the CGM is trained by its
    own loss on its output, the segmentation by the gated maps.

    Inputs: `[seg, cls]`, seg (batch, H, W, C) and cls (batch, 2).

    Returns:
        A tensor of seg's shape.
    """

    def call(self, inputs):
        seg, cls = inputs
        # argmax over (absent, present), ties to "absent" like argmax; written as a comparison
        # because keras.ops.argmax lowers to Bitcast / BitwiseAnd, which tf2onnx cannot export.
        present = ops.cast(ops.greater(cls[..., 1], cls[..., 0]), seg.dtype)
        return seg * ops.reshape(present, (-1, 1, 1, 1))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])


@register("unet3plus", task="segmentation", paper=PAPER)
def UNet3Plus(
    input_shape=(320, 320, 3),
    num_classes=2,
    *,
    depth=4,
    filters=None,
    base_filters=64,
    cat_channels=64,
    norm="batch",
    activation="relu",
    deep_supervision=False,
    class_guided=False,
    cgm_dropout=0.5,
    final_activation=None,
    backbone=None,
    backbone_kwargs=None,
    kernel_initializer="he_normal",
    name="unet3plus",
):
    """Build UNet 3+ as a functional `keras.Model` mapping "image" to per-pixel logits.

    Full-scale skips give every decoder node fine detail and coarse semantics at once with
    fewer parameters than U-Net / UNet++ (every scale is reduced to `cat_channels`).

    The classification-guided module (`class_guided=True`): Dropout(`cgm_dropout`), a 1x1 conv
    to 2 channels, global max pooling and a sigmoid on X_En^5 give the output "cgm"
    (batch, 2) = (P(organ absent), P(organ present)); every segmentation head is multiplied
    *in the graph* by argmax(cgm) in {0, 1} (`ClassGuidedGate`), before its final activation,
    as the authors' code does (so with final_activation="sigmoid" an "absent" image gives 0.5
    everywhere, with logits 0). Train "cgm" with binary cross-entropy on image-level labels.

    Args:
        input_shape: (height, width, channels); height and width may be None and must be
            multiples of 2**depth when given (of 32 with a backbone).
        num_classes: channels of every segmentation head (>= 1). The default 2 (background,
            foreground) trains with the default softmax cross-entropy and metrics, like
            `UNet`; the paper's binary masks use 1 channel with a sigmoid
            (`num_classes=1`, which then needs a binary loss and metrics).
        depth: pooling steps, depth + 1 encoder levels (the paper: 4, five levels).
        filters: encoder filters, one int per level (the paper: (64, 128, 256, 512, 1024));
            None uses base_filters * 2**level. Not allowed with a backbone.
        base_filters: filters of the first level when `filters` is None (ignored with a
            backbone, whose channels are used).
        cat_channels: channels each scale is reduced to before the concatenation (the
            paper: 64); the fusion conv has (depth + 1) * cat_channels filters.
        norm: normalization after each conv ("batch" as the paper, ..., or None).
        activation: Keras activation name (the paper: "relu").
        deep_supervision: return the heads of X_De^1..X_De^depth and X_En^{depth+1} as outputs
            "logits", "logits_2" ... "logits_<depth+1>" (all at the input size; the first, the
            full-resolution decoder's, is the main output); False returns "logits"
            from X_De^1 only.
        class_guided: add the classification-guided module: output "cgm" (last output) and
            gated segmentation heads.
        cgm_dropout: dropout rate in the CGM (the authors' code: 0.5).
        final_activation: None for logits, or "softmax" / "sigmoid" on every segmentation head.
        backbone: None (the encoder above), or a ResNet name / backbone model declaring
            FeatureTap features: the encoder levels are then C1..C_{depth+1} (strides 2..32),
            and each head is bilinearly upsampled to the input size.
        backbone_kwargs: further arguments of the named ResNet builder.
        kernel_initializer: initializer of every conv: blocks, heads and the CGM's 1x1 conv.
        name: model name.

    Returns:
        `keras.Model` with input "image" (batch, H, W, C) and output "logits"
        (batch, H, W, num_classes); with `deep_supervision` a list "logits", "logits_2" ...
        "logits_<depth+1>"; with `class_guided` the list ends with "cgm" (batch, 2). Every
        output is float32, also under a mixed-precision policy.
    """
    owner = "UNet3Plus"
    depth = check_positive_int("depth", depth, owner=owner)
    check_backbone_depth(depth, backbone, backbone_kwargs, owner=owner)
    input_shape = check_input_shape(input_shape, depth, backbone, owner=owner)
    num_classes = check_positive_int("num_classes", num_classes, owner=owner)
    if backbone is not None and filters is not None:
        raise UserError(
            f"{owner}: `filters`={filters!r} sets the encoder's filters, but with "
            f"`backbone`={getattr(backbone, 'name', backbone)!r} the backbone is the encoder. "
            "Drop `filters` (or the backbone)."
        )
    if backbone is None:
        filters = level_filters(filters, base_filters, depth, owner=owner)
    cat_channels = check_positive_int("cat_channels", cat_channels, owner=owner)
    norm = validate_norm(norm, owner=owner)
    activation = validate_activation(activation, owner=owner)
    final_activation = validate_activation(final_activation, name="final_activation", owner=owner)
    cgm_dropout = check_dropout("cgm_dropout", cgm_dropout, owner=owner)
    levels = depth + 1

    conv_kwargs = {"norm": norm, "activation": activation, "kernel_initializer": kernel_initializer}
    inputs = keras.Input(shape=input_shape, name="image")
    # 1-based as in the paper: en[n] = X_En^n, de[n] = X_De^n, de[levels] = X_En^levels.
    en, de = {}, {}
    if backbone is None:
        x = inputs
        for n in range(1, levels + 1):
            if n > 1:
                x = keras.layers.MaxPooling2D(2, name=f"en{n - 1}_pool")(x)
            x = _double_conv(x, filters[n - 1], f"en{n}", conv_kwargs)
            en[n] = x
        strides = [2 ** (n - 1) for n in range(1, levels + 1)]
    else:
        features, strides = encoder_from_backbone(
            backbone, inputs, depth, backbone_kwargs, owner=owner
        )
        en = {n: features[n - 1] for n in range(1, levels + 1)}
    stride = {n: strides[n - 1] for n in range(1, levels + 1)}
    de[levels] = en[levels]

    for n in range(depth, 0, -1):
        parts = []
        for m in range(1, levels + 1):
            if m < n:
                src, tag = en[m], f"en{m}"
                src = keras.layers.MaxPooling2D(
                    stride[n] // stride[m], name=f"de{n}_from_{tag}_pool"
                )(src)
            elif m == n:
                src, tag = en[m], f"en{m}"
            else:
                tag = f"de{m}" if m < levels else f"en{m}"
                src = keras.layers.UpSampling2D(
                    stride[m] // stride[n], interpolation="bilinear", name=f"de{n}_from_{tag}_up"
                )(de[m])
            parts.append(
                ConvNormAct(cat_channels, 3, name=f"de{n}_from_{tag}_conv", **conv_kwargs)(src)
            )
        x = keras.layers.Concatenate(name=f"de{n}_concat")(parts)
        de[n] = ConvNormAct(levels * cat_channels, 3, name=f"de{n}_fuse", **conv_kwargs)(x)

    cgm = None
    if class_guided:
        x = keras.layers.Dropout(cgm_dropout, name="cgm_dropout")(en[levels])
        x = keras.layers.Conv2D(2, 1, kernel_initializer=kernel_initializer, name="cgm_conv")(x)
        x = keras.layers.GlobalMaxPooling2D(name="cgm_pool")(x)
        cgm = keras.layers.Activation("sigmoid", dtype="float32", name="cgm")(x)

    def make_head(n, out_name):
        x = output_head(
            de[n],
            num_classes,
            3,
            stride[n],
            prefix=f"head{n}",
            kernel_initializer=kernel_initializer,
        )
        if cgm is not None:
            x = ClassGuidedGate(name=f"head{n}_gate")([x, cgm])
        return output_activation(x, final_activation, out_name)

    if deep_supervision:
        # The full-resolution head X_De^1 is the one to predict with: named "logits", the
        # convention by which the Trainer's metrics and exports pick a model's main output.
        outputs = [
            make_head(n, "logits" if n == 1 else f"logits_{n}") for n in range(1, levels + 1)
        ]
    else:
        outputs = [make_head(1, "logits")]
    if cgm is not None:
        outputs.append(cgm)
    return keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0], name=name)

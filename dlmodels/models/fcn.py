"""FCN (Long, Shelhamer & Darrell 2015, "Fully Convolutional Networks for Semantic Segmentation",
CVPR) on a ResNet backbone.

    FCN-32s: score(C5)                                        -> resize to the image
    FCN-16s: up2(score(C5)) cropped to C4 + score(C4)         -> resize to the image
    FCN-8s:  up2(FCN-16s fused map) cropped to C3 + score(C3) -> resize to the image

score = 1x1 conv to `num_classes`; up2 = learned 2x upsampling, a 4x4 stride-2 transposed conv
initialised to bilinear interpolation (section 3.3: "initialized to bilinear upsampling, and then
learned"); the final upsampling is fixed bilinear interpolation, as the paper's last layer
("fixed to bilinear interpolation"). The skip score layers start at zero (section 4.2: the
new parameters are zero-initialized), so at initialization the skips add nothing and training
learns what the finer levels contribute.

Decisions:
- The backbone runs at output stride 32 (C3, C4, C5 at strides 8, 16, 32), the paper's nets.
- Cropping: ResNet sizes round up (an input of 100 gives C3 13, C4 7, C5 4), so the upsampled
  map can be one cell larger than the skip it is fused with; the extra last row / column is
  dropped (`CropLike`), the paper's crop layer with offset 0 for these 'same'-padded maps.
- The final resize and the crops read runtime sizes: `None` spatial sizes work, also in ONNX.
- Minimum input: known spatial sizes >= 32 (C5 at least one cell of 32 x 32 pixels).
"""

from __future__ import annotations

import keras

from dlmodels._validation import check_choice, check_positive_int
from dlmodels.layers.conv import validate_activation, validate_norm
from dlmodels.layers.resize import BilinearUpsampling, CropLike, ResizeLike
from dlmodels.models.backbone import build_backbone
from dlmodels.models.deeplab import _backbone_kwargs, check_segmentation_input
from dlmodels.models.registry import register

VARIANTS = ("32s", "16s", "8s")
MIN_INPUT = 32
PAPER = "Long, Shelhamer & Darrell 2015, Fully Convolutional Networks for Semantic Segmentation"


@register("fcn", task="segmentation", paper=PAPER)
def FCN(
    input_shape=(512, 512, 3),
    num_classes=21,
    *,
    variant="8s",
    backbone="resnet50",
    norm="batch",
    final_activation=None,
    backbone_kwargs=None,
    name=None,
):
    """Build FCN-32s / 16s / 8s on a ResNet (Long et al. 2015).

    Args:
        input_shape: (height, width, channels); height and width may be None, known ones must
            be >= 32.
        num_classes: output channels (>= 1).
        variant: "8s" (default, the paper's best), "16s" or "32s": the finest skip fused.
        backbone: a ResNet name (built flat inside the model, output stride 32) or a functional
            backbone model declaring FeatureTap features C3, C4, C5 with output stride 32.
        norm: normalization of a ResNet built by name (unless `backbone_kwargs` sets it).
        final_activation: None for logits, or "softmax" / "sigmoid".
        backbone_kwargs: further arguments of the ResNet built by name.
        name: model name (default "fcn<variant>", e.g. "fcn8s").

    Returns:
        `keras.Model` with input "image" and output "logits" (batch, H, W, num_classes),
        float32 also under mixed precision.

    Raises:
        ValueError: an unknown variant or backbone, an input below 32 pixels, or another
            invalid argument (the message says which).
    """
    owner = "FCN"
    variant = check_choice("variant", variant, VARIANTS, owner=owner)
    num_classes = check_positive_int("num_classes", num_classes, owner=owner)
    norm = validate_norm(norm, owner=owner)
    final_activation = validate_activation(final_activation, name="final_activation", owner=owner)
    shape = check_segmentation_input(
        input_shape, MIN_INPUT, owner=owner, why="the stride of C5: C5 must have one full cell"
    )
    inputs = keras.Input(shape=shape, name="image")
    features, _ = build_backbone(
        backbone,
        inputs,
        output_stride=32,
        backbone_kwargs=_backbone_kwargs(backbone, backbone_kwargs, norm),
        owner=owner,
    )
    head = keras.layers.Conv2D(num_classes, 1, name="score_c5")(features["C5"])
    skips = {"32s": [], "16s": ["C4"], "8s": ["C4", "C3"]}[variant]
    x = head
    for skip in skips:
        level = skip.lower()
        up = keras.layers.Conv2DTranspose(
            num_classes,
            4,
            strides=2,
            padding="same",
            use_bias=False,
            kernel_initializer=BilinearUpsampling(),
            name=f"upsample_to_{level}",
        )(x)
        score = keras.layers.Conv2D(
            num_classes, 1, kernel_initializer="zeros", name=f"score_{level}"
        )(features[skip])
        up = CropLike(name=f"crop_to_{level}")([up, score])
        x = keras.layers.Add(name=f"fuse_{level}")([up, score])
    x = ResizeLike(name="upsample")([x, inputs])
    # float32 output layer: keeps logits / probabilities in fp32 under mixed_float16.
    outputs = keras.layers.Activation(final_activation or "linear", dtype="float32", name="logits")(
        x
    )
    return keras.Model(inputs, outputs, name=name or f"fcn{variant}")

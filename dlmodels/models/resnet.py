"""ResNet v1 (He et al. 2015, "Deep Residual Learning for Image Recognition", CVPR) and ResNet v2
(He et al. 2016, "Identity Mappings in Deep Residual Networks", ECCV), with the dilated variants
of DeepLabv3 (Chen et al. 2017, "Rethinking Atrous Convolution for Semantic Image Segmentation")
and declared multi-scale features for dense-prediction decoders.

Layout (every variant; C1..C5 are `FeatureTap` layers, the backbone contract of
`dlmodels.models.backbone`):

    image -> stem_conv (7x7/2, 64) -> C1 stride 2
          -> stem_pool (3x3/2 max)                                     stride 4
          -> stage2 (64)  -> C2   stride 4
          -> stage3 (128) -> C3   stride 8
          -> stage4 (256) -> C4   stride 16
          -> stage5 (512) -> C5   stride 32           (x4 channels for bottleneck blocks)
          -> [post_norm, post_act]  (v2 only: the pre-activation stack ends un-normalized;
                                     C5 is tapped after them)
          -> avg_pool -> predictions (logits by default)

With `output_stride` 16 / 8 the strides of C4 / C5 become min(16 or 32, output_stride).

Decisions, so ported weights and exported graphs behave like the references:
- Stem padding: the 7x7/2 conv zero-pads 3 then convolves "valid"; the max pool zero-pads 1 then
  pools "valid" ("stem_conv_pad", "stem_pool_pad"), as keras.applications and the Caffe/Torch
  models (symmetric padding; TF "same" would pad bottom/right only on even sizes). In v1 the pool
  follows a ReLU, so zero padding equals the -inf padding of torchvision.
- v2 stem: the conv alone (no norm / activation: the first block pre-activates), as TF-slim and
  keras.applications ResNetV2.
- Downsampling: the first block of stages 3, 4 and 5 has stride 2 (both papers). Bottleneck
  stride placement defaults to the paper of each variant: v1 strides the first 1x1 conv (the
  authors' Caffe models, keras.applications ResNet50), v2 strides the 3x3 conv (the authors'
  Torch code, TF-slim); `stride_in_1x1=False` gives torchvision's "v1.5".
- Output: logits (`classifier_activation=None`), the library's convention (see
  `dlmodels.models.outputs`): losses take `from_logits=True`, and exported graphs carry no
  softmax a server would have to undo. keras.applications defaults to "softmax"; pass
  `classifier_activation="softmax"` for its behaviour.
- Dilation (`output_stride` 16 / 8): every block of a stage whose stride is removed uses the
  stage's dilation rate (2 / 4), as DeepLabv3 and the TF Model Garden's dilated ResNet;
  `multigrid` multiplies the last stage's per-block rates.
"""

from __future__ import annotations

import keras

from dlmodels._validation import check_choice, check_positive_int
from dlmodels.layers.conv import (
    ConvNormAct,
    make_activation,
    make_norm,
    validate_activation,
    validate_norm,
)
from dlmodels.layers.features import FeatureTap
from dlmodels.layers.residual import BottleneckBlock, ResidualBlock
from dlmodels.models.registry import register

BLOCK_TYPES = {"basic": ResidualBlock, "bottleneck": BottleneckBlock}
STAGE_FILTERS = (64, 128, 256, 512)
OUTPUT_STRIDES = (8, 16, 32)
POOLINGS = (None, "avg", "max")
FEATURE_NAMES = ("C2", "C3", "C4", "C5")

_V1_PAPER = "He et al. 2015, Deep Residual Learning for Image Recognition (CVPR 2016)"
_V2_PAPER = "He et al. 2016, Identity Mappings in Deep Residual Networks (ECCV 2016)"


def feature_strides(output_stride: int = 32, *, include_c1: bool = False) -> dict[str, int]:
    """Stride of C2..C5 (and C1 with `include_c1`) of a ResNet with the given `output_stride`.

    The table a ResNet's `FeatureTap` layers declare; for a built model prefer
    `dlmodels.models.feature_strides(model)`, which reads the taps.

    Args:
        output_stride: 8, 16 or 32.
        include_c1: also return C1 (the stem conv output, stride 2).

    Returns:
        `{"C2": 4, "C3": 8, "C4": min(16, output_stride), "C5": min(32, output_stride)}`, with
        `"C1": 2` first when `include_c1`.
    """
    check_choice("output_stride", output_stride, OUTPUT_STRIDES, owner="feature_strides")
    strides = {"C1": 2} if include_c1 else {}
    strides.update({"C2": 4, "C3": 8, "C4": min(16, output_stride), "C5": min(32, output_stride)})
    return strides


def _stage_plan(stage_repeats, output_stride, multigrid):
    """[(stage, filters, first-block stride, per-block dilation rates)] for stages 2..5."""
    plan, current, dilation = [], 4, 1
    for stage, (filters, repeats) in enumerate(
        zip(STAGE_FILTERS, stage_repeats, strict=True), start=2
    ):
        stride = 1 if stage == 2 else 2
        if current * stride > output_stride:
            dilation *= stride
            stride = 1
        else:
            current *= stride
        units = tuple(multigrid) if (stage == 5 and multigrid) else (1,) * repeats
        plan.append((stage, filters, stride, tuple(dilation * u for u in units)))
    return plan


def ResNet(
    block_type,
    stage_repeats,
    *,
    preact=False,
    include_top=True,
    num_classes=1000,
    pooling=None,
    input_shape=(224, 224, 3),
    input_tensor=None,
    classifier_activation=None,
    output_stride=32,
    multigrid=None,
    norm="batch",
    activation="relu",
    se_ratio=None,
    stochastic_depth_rate=0.0,
    stride_in_1x1=None,
    use_bias=False,
    norm_epsilon=1e-5,
    norm_momentum=0.9,
    kernel_initializer="he_normal",
    kernel_regularizer=None,
    name="resnet",
):
    """Build a ResNet (v1 with `preact=False`, v2 with `preact=True`) as a functional keras.Model.

    The shared builder behind `ResNet18` ... `ResNet152V2`; see the module docstring for the
    layout and the decisions (stem padding, stride placement, dilation).

    Args:
        block_type: "basic" (two 3x3 convs) or "bottleneck" (1x1-3x3-1x1, 4x expansion).
        stage_repeats: four positive ints, the blocks of stages 2..5 (ResNet-50: (3, 4, 6, 3)).
        preact: full pre-activation blocks and a final `post_norm` (He et al. 2016).
        include_top: end with global average pooling and the `predictions` Dense layer.
        num_classes: classes of `predictions` (>= 1; used only with include_top).
        pooling: None, "avg" or "max" global pooling of the last feature map. With include_top
            None means "avg" (as keras.applications); without it None returns the feature map.
        input_shape: (height, width, channels); height and width may be None.
        input_tensor: optional Keras tensor to use as the input instead of a new `keras.Input`.
        classifier_activation: None (logits, the default and the library's convention),
            "softmax" (probabilities, keras.applications' default) or another activation name.
        output_stride: 32 (classification), 16 or 8: strides replaced by dilation in the last
            stage (16) or the last two stages (8), DeepLabv3 (Chen et al. 2017).
        multigrid: None or per-block unit rates of stage 5 (one per block, e.g. (1, 2, 4)),
            multiplied by the stage's dilation rate (DeepLabv3).
        norm, activation: of every block and the stem ("batch", ..., None; "relu").
        se_ratio: squeeze-and-excitation ratio of every block (Hu et al. 2018) or None.
        stochastic_depth_rate: drop rate of the last block; block l of L gets rate * l / L, the
            linear decay rule of Huang et al. 2016.
        stride_in_1x1: bottleneck stride placement; None = the paper's (v1 True, v2 False).
        use_bias: conv biases: False (torchvision), True (every conv, keras.applications
            ResNet50), None (only convs not followed by a norm, keras.applications ResNet50V2).
        norm_epsilon, norm_momentum: normalization constants (keras.applications: 1.001e-5).
        kernel_initializer, kernel_regularizer: of every conv and the classifier kernel.
        name: model name.

    Returns:
        `keras.Model` with input "image" and output "predictions" (batch, num_classes): logits
        unless `classifier_activation` says otherwise (`dlmodels.models.output_kind` reads
        which), float32 also under mixed precision. Without the top: the pooled features
        (batch, C) or the last feature map. Every variant declares its features C1..C5 as
        `FeatureTap` layers (strides 2, 4, 8, 16, 32, or lower with `output_stride`), read by
        `dlmodels.models.feature_model` / `backbone_features` / `feature_strides`.
    """
    owner = name or "ResNet"
    block_cls = BLOCK_TYPES[check_choice("block_type", block_type, tuple(BLOCK_TYPES), owner=owner)]
    stage_repeats = tuple(stage_repeats)
    if len(stage_repeats) != 4:
        raise ValueError(
            f"{owner}: `stage_repeats` must have 4 entries (stages 2..5), got {stage_repeats!r}."
        )
    for r in stage_repeats:
        check_positive_int("stage_repeats", r, owner=owner)
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(
            f"{owner}: `output_stride`={output_stride!r} is not supported. Allowed values: "
            "{8, 16, 32} (32 = no dilation; 16 / 8 dilate the last one / two stages)."
        )
    if multigrid is not None:
        multigrid = tuple(multigrid)
        for u in multigrid:
            check_positive_int("multigrid", u, owner=owner)
        if len(multigrid) != stage_repeats[3]:
            raise ValueError(
                f"{owner}: `multigrid`={multigrid!r} needs one unit rate per block of stage 5 "
                f"({stage_repeats[3]} blocks), e.g. {(1, 2, 4)[: stage_repeats[3]]!r}."
            )
    pooling = check_choice("pooling", pooling, POOLINGS, owner=owner)
    if include_top:
        num_classes = check_positive_int("num_classes", num_classes, owner=owner)
        classifier_activation = validate_activation(
            classifier_activation, name="classifier_activation", owner=owner
        )
    norm = validate_norm(norm, owner=owner)
    activation = validate_activation(activation, owner=owner)
    if not 0.0 <= float(stochastic_depth_rate) < 1.0:
        raise ValueError(
            f"{owner}: `stochastic_depth_rate` must be in [0, 1), got {stochastic_depth_rate!r}."
        )
    if use_bias not in (None, True, False):
        raise ValueError(
            f"{owner}: `use_bias`={use_bias!r} is not supported. Allowed values: False, True, None."
        )

    if input_tensor is not None:
        if not keras.backend.is_keras_tensor(input_tensor):
            input_tensor = keras.Input(tensor=input_tensor, name="image")
        inputs = keras.utils.get_source_inputs(input_tensor)
        x = input_tensor
    else:
        input_shape = tuple(input_shape)
        if len(input_shape) != 3 or input_shape[-1] is None:
            raise ValueError(
                f"{owner}: `input_shape` must be (height, width, channels) with known channels, "
                f"got {input_shape!r}."
            )
        inputs = keras.Input(shape=input_shape, name="image")
        x = inputs

    norm_kwargs = {"epsilon": norm_epsilon, "momentum": norm_momentum}
    stem_bias = (norm is None or preact) if use_bias is None else use_bias
    x = keras.layers.ZeroPadding2D(3, name="stem_conv_pad")(x)
    x = ConvNormAct(
        64,
        7,
        strides=2,
        padding="valid",
        use_bias=stem_bias,
        norm=None if preact else norm,
        activation=None if preact else activation,
        norm_epsilon=norm_epsilon,
        norm_momentum=norm_momentum,
        kernel_initializer=kernel_initializer,
        kernel_regularizer=kernel_regularizer,
        name="stem_conv",
    )(x)
    # C1 is the stem conv output before the pool: the stride-2 skip U-Net-style decoders need.
    x = FeatureTap(2, name="C1")(x)
    x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)

    total = sum(stage_repeats)
    index = 0
    block_kwargs = {
        "preact": preact,
        "norm": norm,
        "activation": activation,
        "se_ratio": se_ratio,
        "use_bias": use_bias,
        "norm_epsilon": norm_epsilon,
        "norm_momentum": norm_momentum,
        "kernel_initializer": kernel_initializer,
        "kernel_regularizer": kernel_regularizer,
    }
    if block_cls is BottleneckBlock:
        block_kwargs["stride_in_1x1"] = stride_in_1x1
    strides = feature_strides(output_stride)
    for stage, filters, stride, rates in _stage_plan(stage_repeats, output_stride, multigrid):
        if stage > 2:
            x = FeatureTap(strides[f"C{stage - 1}"], name=f"C{stage - 1}")(x)
        for b, rate in enumerate(rates):
            index += 1
            x = block_cls(
                filters,
                strides=stride if b == 0 else 1,
                dilation_rate=rate,
                stochastic_depth_rate=float(stochastic_depth_rate) * index / total,
                name=f"stage{stage}_block{b + 1}",
                **block_kwargs,
            )(x)
    if preact:
        post_norm = make_norm(norm, channels=x.shape[-1], name="post_norm", **norm_kwargs)
        if post_norm is not None:
            x = post_norm(x)
        post_act = make_activation(activation, name="post_act")
        if post_act is not None:
            x = post_act(x)
    x = FeatureTap(strides["C5"], name="C5")(x)

    if include_top:
        if pooling == "max":
            x = keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
        else:
            x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        # float32 head: probabilities / logits stay fp32 under mixed_float16.
        x = keras.layers.Dense(
            num_classes,
            activation=classifier_activation,
            kernel_initializer="glorot_uniform",
            kernel_regularizer=kernel_regularizer,
            dtype="float32",
            name="predictions",
        )(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    return keras.Model(inputs, x, name=name)


def resnet_features(model, *, include_c1=False, name=None):
    """A functional model mapping the image of a ResNet to its named stage outputs.

    Kept for existing callers; it is `feature_model(model, ["C2", "C3", "C4", "C5"])`, which
    reads the model's `FeatureTap` layers (no layer-name parsing) and works for any backbone.

    Returns `keras.Model(image -> {"C2", "C3", "C4", "C5"})` sharing `model`'s layers (and
    weights): C2..C5 are the outputs of stages 2..5 (strides 4, 8, 16, 32, or lower with
    `output_stride`, see `feature_strides`). For v2 models C5 is taken after `post_norm` /
    `post_act`, so every decoder sees a normalized last feature map; C2..C4 are the raw stage
    sums, as TF-slim's end points.

    Args:
        model: a model built by `ResNet` / `ResNet50` / ... (with or without the top).
        include_c1: also return C1, the stem conv output (stride 2).
        name: name of the new model (default: "<model name>_features").
    """
    from dlmodels.models.backbone import feature_model

    names = (["C1"] if include_c1 else []) + list(FEATURE_NAMES)
    try:
        return feature_model(model, names, name=name)
    except ValueError as err:
        raise ValueError(
            f"resnet_features: `model`={getattr(model, 'name', model)!r} does not declare the "
            f"features {names}; pass a model built by dlmodels.models.ResNet*. ({err})"
        ) from None


def _variant(name, block_type, repeats, preact, paper):
    doc_name = name.replace("resnet", "ResNet").replace("v2", "V2")

    @register(name, task="classification", paper=paper)
    def build(**kwargs):
        kwargs.setdefault("name", name)
        return ResNet(block_type, repeats, preact=preact, **kwargs)

    build.__name__ = build.__qualname__ = doc_name
    kind = "pre-activation (v2)" if preact else "post-activation (v1)"
    build.__doc__ = (
        f"{doc_name}: {kind} {block_type} blocks, stage repeats {list(repeats)} ({paper}).\n\n"
        "Keyword arguments as `ResNet` (include_top, num_classes, pooling, input_shape, "
        "input_tensor, classifier_activation, output_stride, multigrid, norm, activation, "
        "se_ratio, stochastic_depth_rate, stride_in_1x1, use_bias, ...).\n\n"
        "Returns:\n    a functional `keras.Model` with input 'image' and output 'predictions' "
        "(logits by default; classifier_activation='softmax' for probabilities), declaring "
        "features C1..C5 (FeatureTap)."
    )
    return build


ResNet18 = _variant("resnet18", "basic", (2, 2, 2, 2), False, _V1_PAPER)
ResNet34 = _variant("resnet34", "basic", (3, 4, 6, 3), False, _V1_PAPER)
ResNet50 = _variant("resnet50", "bottleneck", (3, 4, 6, 3), False, _V1_PAPER)
ResNet101 = _variant("resnet101", "bottleneck", (3, 4, 23, 3), False, _V1_PAPER)
ResNet152 = _variant("resnet152", "bottleneck", (3, 8, 36, 3), False, _V1_PAPER)
ResNet50V2 = _variant("resnet50v2", "bottleneck", (3, 4, 6, 3), True, _V2_PAPER)
ResNet101V2 = _variant("resnet101v2", "bottleneck", (3, 4, 23, 3), True, _V2_PAPER)
ResNet152V2 = _variant("resnet152v2", "bottleneck", (3, 8, 36, 3), True, _V2_PAPER)

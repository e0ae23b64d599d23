"""Residual blocks of ResNet: the basic block and the bottleneck block, post- or pre-activation.

Post-activation (ResNet v1, He et al. 2015, "Deep Residual Learning for Image Recognition"):

    y = act(F(x) + shortcut(x))
    F = norm-conv chains ending in a norm (no activation before the addition)
    shortcut = x (identity) or norm(conv1x1_stride(x)) (projection, the paper's option B)

Pre-activation (ResNet v2, He et al. 2016, "Identity Mappings in Deep Residual Networks", the
"full pre-activation" unit of their figure 4e):

    p = act(norm(x))
    y = F(p) + shortcut          (no activation after the addition)
    F = conv(p), then (norm -> act -> conv) for every further conv
    shortcut = x (identity, the raw input) or conv1x1_stride(p) (projection of the
               pre-activated input, as in the authors' Torch code and TF-slim / Keras ResNetV2)

Both blocks also take the additions later ResNets use: dilation (Yu & Koltun 2016; Chen et al.
2017, DeepLabv3), squeeze-and-excitation on the residual branch before the addition (Hu et al.
2018, "Squeeze-and-Excitation Networks") and stochastic depth (Huang et al. 2016, "Deep Networks
with Stochastic Depth") in its inverted form (the kept branch is scaled by 1/(1-p) in training,
as in timm and the TF Model Garden, so inference is the plain block). Its noise comes from a
`keras.random.SeedGenerator`; under tf.distribute use dlmodels' Trainer, which gives each replica
its own noise (with plain `model.fit` all replicas share a mask).

Padding: a strided convolution with a kernel larger than 1 zero-pads (k-1)//2 on every side and
then convolves "valid", the sampling grid of the papers' Caffe/Torch models, torchvision and
keras.applications; TensorFlow's "same" would pad only bottom/right on even sizes, which shifts
the grid and breaks ported weights. Output sizes are identical (ceil(n / stride)). Unstrided
convolutions use "same" (symmetric for odd kernels, also when dilated).
"""

from __future__ import annotations

import keras
from keras import ops

from dlmodels._validation import check_positive_int, check_strides_dilation, normalize_tuple
from dlmodels.layers.conv import make_activation, make_norm, validate_activation, validate_norm


def _check_rate(name, value, *, low_inclusive, high, high_inclusive, owner, hint):
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = (value >= 0.0 if low_inclusive else value > 0.0) and (
            value <= high if high_inclusive else value < high
        )
    if not ok:
        interval = (
            ("[" if low_inclusive else "(") + f"0, {high:g}" + ("]" if high_inclusive else ")")
        )
        raise ValueError(f"{owner}: `{name}` must be a number in {interval}, got {value!r}. {hint}")
    return value


class _ResidualBase(keras.layers.Layer):
    """Shared argument handling, shortcut, squeeze-excitation and stochastic depth."""

    expansion = 1

    def __init__(
        self,
        filters,
        strides=1,
        dilation_rate=1,
        preact=False,
        norm="batch",
        activation="relu",
        se_ratio=None,
        stochastic_depth_rate=0.0,
        use_projection=None,
        use_bias=False,
        norm_groups=32,
        norm_epsilon=1e-5,
        norm_momentum=0.9,
        kernel_initializer="he_normal",
        kernel_regularizer=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.filters = check_positive_int("filters", filters, owner=owner)
        self.strides = normalize_tuple("strides", strides, 2, owner=owner)
        self.dilation_rate = normalize_tuple("dilation_rate", dilation_rate, 2, owner=owner)
        check_strides_dilation(self.strides, self.dilation_rate, owner=owner)
        self.preact = bool(preact)
        self.norm = validate_norm(norm, owner=owner)
        self.activation = validate_activation(activation, owner=owner)
        if se_ratio is not None:
            se_ratio = _check_rate(
                "se_ratio",
                se_ratio,
                low_inclusive=False,
                high=1.0,
                high_inclusive=True,
                owner=owner,
                hint="Hu et al.'s reduction r=16 is se_ratio=0.0625; None disables SE.",
            )
        self.se_ratio = se_ratio
        self.stochastic_depth_rate = _check_rate(
            "stochastic_depth_rate",
            stochastic_depth_rate,
            low_inclusive=True,
            high=1.0,
            high_inclusive=False,
            owner=owner,
            hint="0 disables it; Huang et al. drop the last block with 0.5.",
        )
        if use_projection not in (None, True, False):
            raise ValueError(
                f"{owner}: `use_projection`={use_projection!r} is not supported. Allowed values: "
                "None (projection iff the shape changes), True, False."
            )
        self.use_projection = use_projection
        if use_bias not in (None, True, False):
            raise ValueError(
                f"{owner}: `use_bias`={use_bias!r} is not supported. Allowed values: False (no "
                "conv bias), True (every conv), None (only convs not followed by a norm)."
            )
        self.use_bias = use_bias
        self.norm_groups = check_positive_int("norm_groups", norm_groups, owner=owner)
        self.norm_epsilon = float(norm_epsilon)
        self.norm_momentum = float(norm_momentum)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.seed = seed
        self.out_channels = self.filters * self.expansion

        # Stride-free shortcut pieces depend on the input channels: created in build().
        self.shortcut_conv = None
        self.shortcut_norm = None
        self.preact_norm = self.preact_act = None
        if self.preact:
            self.preact_norm = self._norm("preact_norm")
            self.preact_act = self._act("preact_act")
        self.se_reduce = self.se_expand = None
        if self.se_ratio is not None:
            hidden = max(1, round(self.out_channels * self.se_ratio))
            self.se_reduce = keras.layers.Conv2D(
                hidden,
                1,
                activation="relu",
                kernel_initializer=self.kernel_initializer,
                kernel_regularizer=self.kernel_regularizer,
                name="se_reduce",
                dtype=self.dtype_policy,
            )
            self.se_expand = keras.layers.Conv2D(
                self.out_channels,
                1,
                activation="sigmoid",
                kernel_initializer=self.kernel_initializer,
                kernel_regularizer=self.kernel_regularizer,
                name="se_expand",
                dtype=self.dtype_policy,
            )
        self.seed_generator = None
        if self.stochastic_depth_rate > 0.0:
            self.seed_generator = keras.random.SeedGenerator(seed)
        self.out_act = None if self.preact else self._act("out_act")

    # -- factories -------------------------------------------------------------------------
    def _bias(self, followed_by_norm):
        if self.use_bias is None:
            return self.norm is None or not followed_by_norm
        return self.use_bias

    def _conv(self, filters, kernel_size, strides, dilation_rate, name, followed_by_norm):
        """(padding layer or None, Conv2D); strided k>1 convs pad symmetrically (see module)."""
        pad = None
        padding = "same"
        if max(strides) > 1 and kernel_size > 1:
            p = (kernel_size - 1) // 2
            pad = keras.layers.ZeroPadding2D(p, name=f"{name}_pad", dtype=self.dtype_policy)
            padding = "valid"
        conv = keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            dilation_rate=dilation_rate,
            use_bias=self._bias(followed_by_norm),
            kernel_initializer=self.kernel_initializer,
            kernel_regularizer=self.kernel_regularizer,
            name=name,
            dtype=self.dtype_policy,
        )
        return pad, conv

    def _norm(self, name, channels=None):
        return make_norm(
            self.norm,
            channels=channels,
            groups=self.norm_groups,
            epsilon=self.norm_epsilon,
            momentum=self.norm_momentum,
            name=name,
            dtype=self.dtype_policy,
        )

    def _act(self, name):
        return make_activation(self.activation, name=name, dtype=self.dtype_policy)

    # -- the residual branch, defined by subclasses as a list of steps ---------------------
    def _branch_steps(self):
        """[(pad, conv, norm, act)] applied in order; post: conv-norm-act, pre: norm-act-conv."""
        raise NotImplementedError

    # -- Keras API -------------------------------------------------------------------------
    def _needs_projection(self, in_channels):
        changes = in_channels != self.out_channels or max(self.strides) > 1
        if self.use_projection is None:
            return changes
        if not self.use_projection and in_channels != self.out_channels:
            raise ValueError(
                f"{self.name}: `use_projection`=False but the input has {in_channels} channels "
                f"and the block outputs {self.out_channels}; an identity shortcut cannot change "
                "the channel count. Use use_projection=None (auto) or True."
            )
        return self.use_projection

    def build(self, input_shape):
        in_channels = input_shape[-1]
        if in_channels is None:
            raise ValueError(
                f"{self.name}: the channel axis of the input must be known, got shape "
                f"{tuple(input_shape)}."
            )
        if self._needs_projection(in_channels):
            _, self.shortcut_conv = self._conv(
                self.out_channels,
                1,
                self.strides,
                (1, 1),
                "shortcut_conv",
                followed_by_norm=not self.preact,
            )
            if not self.preact:
                self.shortcut_norm = self._norm("shortcut_norm", self.out_channels)
        shape = tuple(input_shape)
        if self.preact_norm is not None:
            self.preact_norm.build(shape)
        if self.shortcut_conv is not None:
            self.shortcut_conv.build(shape)
            if self.shortcut_norm is not None:
                self.shortcut_norm.build(self.shortcut_conv.compute_output_shape(shape))
        for pad, conv, norm, _ in self._branch_steps():
            if self.preact and norm is not None:
                norm.build(shape)
            if pad is not None:
                shape = pad.compute_output_shape(shape)
            conv.build(shape)
            shape = conv.compute_output_shape(shape)
            if not self.preact and norm is not None:
                norm.build(shape)
        if self.se_reduce is not None:
            pooled = (shape[0], 1, 1, self.out_channels)
            self.se_reduce.build(pooled)
            self.se_expand.build(self.se_reduce.compute_output_shape(pooled))

    def _shortcut(self, inputs, preactivated, training):
        if self.shortcut_conv is not None:
            s = self.shortcut_conv(preactivated if self.preact else inputs)
            if self.shortcut_norm is not None:
                s = self.shortcut_norm(s, training=training)
            return s
        if max(self.strides) > 1:  # identity with stride (use_projection=False): subsample
            return inputs[:, :: self.strides[0], :: self.strides[1], :]
        return inputs

    def call(self, inputs, training=None):
        x = inputs
        if self.preact:
            if self.preact_norm is not None:
                x = self.preact_norm(x, training=training)
            if self.preact_act is not None:
                x = self.preact_act(x)
        shortcut = self._shortcut(inputs, x, training)
        for i, (pad, conv, norm, act) in enumerate(self._branch_steps()):
            if self.preact and i > 0:
                if norm is not None:
                    x = norm(x, training=training)
                if act is not None:
                    x = act(x)
            if pad is not None:
                x = pad(x)
            x = conv(x)
            if not self.preact:
                if norm is not None:
                    x = norm(x, training=training)
                if act is not None:
                    x = act(x)
        if self.se_reduce is not None:
            scale = ops.mean(x, axis=(1, 2), keepdims=True)
            x = x * self.se_expand(self.se_reduce(scale))
        if training and self.stochastic_depth_rate > 0.0:
            keep = 1.0 - self.stochastic_depth_rate
            noise = keras.random.uniform(
                (ops.shape(x)[0], 1, 1, 1), seed=self.seed_generator, dtype=x.dtype
            )
            x = x * ops.floor(keep + noise) / keep
        x = x + shortcut
        if self.out_act is not None:
            x = self.out_act(x)
        return x

    def compute_output_shape(self, input_shape):
        def down(n, s):
            return None if n is None else -(-n // s)

        return (
            input_shape[0],
            down(input_shape[1], self.strides[0]),
            down(input_shape[2], self.strides[1]),
            self.out_channels,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "strides": self.strides,
                "dilation_rate": self.dilation_rate,
                "preact": self.preact,
                "norm": self.norm,
                "activation": self.activation,
                "se_ratio": self.se_ratio,
                "stochastic_depth_rate": self.stochastic_depth_rate,
                "use_projection": self.use_projection,
                "use_bias": self.use_bias,
                "norm_groups": self.norm_groups,
                "norm_epsilon": self.norm_epsilon,
                "norm_momentum": self.norm_momentum,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "seed": self.seed,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="dlmodels")
class ResidualBlock(_ResidualBase):
    """The basic residual block: two 3x3 convolutions (expansion 1), post- or pre-activation.

    ResNet-18/34 of He et al. 2015 ("Deep Residual Learning for Image Recognition") with
    `preact=False`; the full pre-activation unit of He et al. 2016 ("Identity Mappings in Deep
    Residual Networks") with `preact=True`. The stride is on the first 3x3 convolution; both 3x3
    convolutions use `dilation_rate`. See the module docstring for the exact equations.

    Args:
        filters: channels of both convolutions and of the output (>= 1).
        strides: int or (h, w); stride of the first 3x3 conv and of the projection shortcut.
        dilation_rate: int or (h, w) of both 3x3 convs; cannot be > 1 together with strides > 1.
            With strides=1 the output has the input's spatial size.
        preact: False for the post-activation unit (v1), True for full pre-activation (v2).
        norm: "batch", "sync_batch", "group", "layer", "instance" or None.
        activation: Keras activation name or None (the papers: "relu").
        se_ratio: None, or squeeze-and-excitation (Hu et al. 2018) on the residual branch before
            the addition with a hidden width of round(out_channels * se_ratio), in (0, 1]
            (the paper's reduction r=16 is se_ratio=1/16).
        stochastic_depth_rate: probability in [0, 1) of dropping the whole residual branch of a
            sample in training (Huang et al. 2016); kept branches are scaled by 1/(1-p), so
            inference computes the plain block.
        use_projection: None (1x1 projection shortcut iff the stride is > 1 or the channel count
            changes), True (always), False (identity; a stride then subsamples the input).
        use_bias: False (no conv bias: every conv feeds a norm or the addition), True (bias on
            every conv, as keras.applications ResNet), None (bias only on convs not followed
            by a norm, as keras.applications ResNetV2).
        norm_groups: groups of group norm.
        norm_epsilon, norm_momentum: normalization constants (momentum in the Keras sense).
        kernel_initializer, kernel_regularizer: of every convolution.
        seed: seed of the stochastic-depth noise (a `keras.random.SeedGenerator`, whose state
            is a replicated variable with aggregation "none"). Under tf.distribute use dlmodels'
            Trainer, which folds the replica id into every seed generator's state at start so
            each replica draws its own noise; with plain `model.fit` all replicas share a mask
            (the same samples' branches are dropped on every replica).

    Returns:
        A tensor (batch, ceil(H / stride), ceil(W / stride), filters).
    """

    expansion = 1

    def __init__(self, filters, strides=1, **kwargs):
        super().__init__(filters, strides, **kwargs)
        f = self.filters
        self.pad1, self.conv1 = self._conv(
            f, 3, self.strides, self.dilation_rate, "conv1", followed_by_norm=True
        )
        self.norm1 = self._norm("norm1", f)
        self.act1 = self._act("act1")
        self.pad2, self.conv2 = self._conv(
            f, 3, (1, 1), self.dilation_rate, "conv2", followed_by_norm=not self.preact
        )
        self.norm2 = None if self.preact else self._norm("norm2", f)

    def _branch_steps(self):
        if self.preact:  # norm_i / act_i sit before conv_{i+1}
            return [
                (self.pad1, self.conv1, None, None),
                (self.pad2, self.conv2, self.norm1, self.act1),
            ]
        return [
            (self.pad1, self.conv1, self.norm1, self.act1),
            (self.pad2, self.conv2, self.norm2, None),
        ]


@keras.saving.register_keras_serializable(package="dlmodels")
class BottleneckBlock(_ResidualBase):
    """The bottleneck block: 1x1 -> 3x3 -> 1x1 convolutions, output 4 * `filters` channels.

    ResNet-50/101/152 of He et al. 2015 ("Deep Residual Learning for Image Recognition") with
    `preact=False`; the full pre-activation bottleneck of He et al. 2016 ("Identity Mappings in
    Deep Residual Networks") with `preact=True`. The 3x3 convolution uses `dilation_rate`.

    Where the stride goes (`stride_in_1x1`): the authors' released Caffe ResNet-50/101/152 (and
    keras.applications ResNet50) stride the first 1x1 convolution (True); torchvision's
    "ResNet v1.5", the authors' Torch pre-activation code (fb.resnet.torch) and TF-slim /
    keras.applications ResNetV2 stride the 3x3 convolution (False). The default None picks the
    form of the paper each variant comes from: True for `preact=False`, False for `preact=True`.
    Parameter counts are the same either way.

    Args:
        filters: the bottleneck width (>= 1); the block outputs 4 * filters channels.
        stride_in_1x1: see above; None = `not preact`.
        Other arguments: as `ResidualBlock`.

    Returns:
        A tensor (batch, ceil(H / stride), ceil(W / stride), 4 * filters).
    """

    expansion = 4

    def __init__(self, filters, strides=1, stride_in_1x1=None, **kwargs):
        super().__init__(filters, strides, **kwargs)
        self.stride_in_1x1 = (not self.preact) if stride_in_1x1 is None else bool(stride_in_1x1)
        f = self.filters
        s1, s3 = (self.strides, (1, 1)) if self.stride_in_1x1 else ((1, 1), self.strides)
        self.pad1, self.conv1 = self._conv(f, 1, s1, (1, 1), "conv1", followed_by_norm=True)
        self.norm1 = self._norm("norm1", f)
        self.act1 = self._act("act1")
        self.pad2, self.conv2 = self._conv(
            f, 3, s3, self.dilation_rate, "conv2", followed_by_norm=True
        )
        self.norm2 = self._norm("norm2", f)
        self.act2 = self._act("act2")
        self.pad3, self.conv3 = self._conv(
            self.out_channels, 1, (1, 1), (1, 1), "conv3", followed_by_norm=not self.preact
        )
        self.norm3 = None if self.preact else self._norm("norm3", self.out_channels)

    def _branch_steps(self):
        if self.preact:
            return [
                (self.pad1, self.conv1, None, None),
                (self.pad2, self.conv2, self.norm1, self.act1),
                (self.pad3, self.conv3, self.norm2, self.act2),
            ]
        return [
            (self.pad1, self.conv1, self.norm1, self.act1),
            (self.pad2, self.conv2, self.norm2, self.act2),
            (self.pad3, self.conv3, self.norm3, None),
        ]

    def get_config(self):
        config = super().get_config()
        config["stride_in_1x1"] = self.stride_in_1x1
        return config

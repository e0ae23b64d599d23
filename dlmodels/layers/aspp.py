"""Atrous Spatial Pyramid Pooling (Chen et al. 2017, "Rethinking Atrous Convolution for Semantic
Image Segmentation", DeepLabv3, section 3.3).

Five parallel branches on the backbone's last feature map, concatenated and projected:

    x -> 1x1 conv-BN-ReLU                         (filters)
      -> 3x3 conv-BN-ReLU, dilation rates[0]      (filters)
      -> 3x3 conv-BN-ReLU, dilation rates[1]      (filters)
      -> 3x3 conv-BN-ReLU, dilation rates[2]      (filters)
      -> global average pool -> 1x1 conv-BN-ReLU -> bilinear resize to x's runtime H x W
    concat (5 * filters) -> 1x1 conv-BN-ReLU (filters) -> dropout

The image-level branch is the paper's answer to atrous rates close to the feature size, where a
3x3 atrous filter degenerates to its centre tap. Rates (6, 12, 18) belong to output stride 16 and
double to (12, 24, 36) at output stride 8 (`rates_for_output_stride`). DeepLabv3+ (Chen et al.
2018) makes the atrous branches depthwise-separable (`separable=True`: 3x3 depthwise atrous conv
-BN-ReLU, then 1x1 conv-BN-ReLU).

BatchNorm on the image-level branch sees one value per channel and image; at inference it uses
its moving statistics, so batch size 1 is fine. Training it needs batches of several images.
"""

from __future__ import annotations

import keras

from dlmodels._validation import check_choice, check_positive_int
from dlmodels.errors import UserError
from dlmodels.layers.conv import (
    ConvNormAct,
    make_activation,
    make_norm,
    validate_activation,
    validate_norm,
)
from dlmodels.layers.resize import ResizeLike

OUTPUT_STRIDES = (8, 16, 32)
BASE_RATES = (6, 12, 18)
"""The paper's rates at output stride 16."""


def rates_for_output_stride(output_stride: int) -> tuple[int, int, int]:
    """ASPP atrous rates for a backbone `output_stride`: (6, 12, 18) at 16, (12, 24, 36) at 8
    (DeepLabv3: "the rates are doubled when output_stride = 8"), and (3, 6, 9) at 32 (the same
    rule: the rate in input pixels, rate * output_stride, stays constant)."""
    check_choice("output_stride", output_stride, OUTPUT_STRIDES, owner="rates_for_output_stride")
    return tuple(r * 16 // output_stride for r in BASE_RATES)


@keras.saving.register_keras_serializable(package="dlmodels")
class ASPP(keras.layers.Layer):
    """Atrous Spatial Pyramid Pooling with image-level features (DeepLabv3, Chen et al. 2017).

    Args:
        filters: channels of every branch and of the output (the paper: 256).
        rates: dilation rates of the 3x3 atrous branches, one branch per rate (the paper: three,
            (6, 12, 18) at output stride 16; see `rates_for_output_stride`).
        norm: normalization after every conv ("batch", ..., None).
        activation: activation after every normalization (the paper: "relu").
        dropout: dropout rate after the projection, in [0, 1) (the reference code: 0.1).
        separable: depthwise-separable atrous branches (DeepLabv3+, Chen et al. 2018).
        norm_groups, norm_epsilon, norm_momentum: normalization constants.
        kernel_initializer, kernel_regularizer: of every conv.

    Returns:
        (batch, H, W, filters): same spatial size as the input, for any (also dynamic) size.
    """

    rates_for_output_stride = staticmethod(rates_for_output_stride)

    def __init__(
        self,
        filters=256,
        rates=BASE_RATES,
        norm="batch",
        activation="relu",
        dropout=0.1,
        separable=False,
        norm_groups=32,
        norm_epsilon=1e-5,
        norm_momentum=0.9,
        kernel_initializer="he_normal",
        kernel_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.filters = check_positive_int("filters", filters, owner=owner)
        if isinstance(rates, int) or not rates:
            raise ValueError(
                f"{owner}: `rates` must be a non-empty sequence of dilation rates, got "
                f"{rates!r}. The paper uses (6, 12, 18) at output stride 16 and (12, 24, 36) "
                "at 8 (ASPP.rates_for_output_stride)."
            )
        self.rates = tuple(check_positive_int("rates", r, owner=owner) for r in rates)
        self.norm = validate_norm(norm, owner=owner)
        self.activation = validate_activation(activation, owner=owner)
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, int | float)
            or not 0.0 <= dropout < 1.0
        ):
            raise ValueError(f"{owner}: `dropout` must be a number in [0, 1), got {dropout!r}.")
        self.dropout = float(dropout)
        if separable not in (True, False):
            raise UserError(
                f"{owner}: `separable` must be True (depthwise-separable atrous branches, "
                f"DeepLabv3+) or False (plain 3x3 atrous convs), got {separable!r}."
            )
        self.separable = bool(separable)
        self.norm_groups = check_positive_int("norm_groups", norm_groups, owner=owner)
        self.norm_epsilon = float(norm_epsilon)
        self.norm_momentum = float(norm_momentum)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)

        def unit(name, kernel_size=1, dilation_rate=1):
            return ConvNormAct(
                self.filters,
                kernel_size,
                dilation_rate=dilation_rate,
                norm=self.norm,
                activation=self.activation,
                norm_groups=self.norm_groups,
                norm_epsilon=self.norm_epsilon,
                norm_momentum=self.norm_momentum,
                kernel_initializer=self.kernel_initializer,
                kernel_regularizer=self.kernel_regularizer,
                name=name,
                dtype=self.dtype_policy,
            )

        self.conv1x1 = unit("conv1x1")
        self.atrous = []
        self.depthwise = []
        self.depthwise_norms = []
        self.depthwise_acts = []
        for i, rate in enumerate(self.rates, start=1):
            if self.separable:
                self.depthwise.append(
                    keras.layers.DepthwiseConv2D(
                        3,
                        padding="same",
                        dilation_rate=rate,
                        use_bias=self.norm is None,
                        depthwise_initializer=self.kernel_initializer,
                        depthwise_regularizer=self.kernel_regularizer,
                        name=f"atrous{i}_depthwise",
                        dtype=self.dtype_policy,
                    )
                )
                # The depthwise conv keeps the input's channels; group norm checks divisibility
                # when it is built.
                self.depthwise_norms.append(
                    make_norm(
                        self.norm,
                        groups=self.norm_groups,
                        epsilon=self.norm_epsilon,
                        momentum=self.norm_momentum,
                        name=f"atrous{i}_depthwise_norm",
                        dtype=self.dtype_policy,
                    )
                )
                self.depthwise_acts.append(
                    make_activation(
                        self.activation, name=f"atrous{i}_depthwise_act", dtype=self.dtype_policy
                    )
                )
                self.atrous.append(unit(f"atrous{i}_pointwise"))
            else:
                self.atrous.append(unit(f"atrous{i}", 3, rate))
        self.pool = keras.layers.GlobalAveragePooling2D(
            keepdims=True, name="image_pool", dtype=self.dtype_policy
        )
        self.pool_conv = unit("image_pool_conv")
        self.pool_resize = ResizeLike(name="image_pool_resize", dtype=self.dtype_policy)
        self.concat = keras.layers.Concatenate(name="concat", dtype=self.dtype_policy)
        self.project = unit("project")
        self.drop = keras.layers.Dropout(self.dropout, name="dropout", dtype=self.dtype_policy)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(
                f"{self.name}: the channel axis of the input must be known, got shape "
                f"{tuple(input_shape)}."
            )
        self.conv1x1.build(input_shape)
        for i, branch in enumerate(self.atrous):
            if self.separable:
                self.depthwise[i].build(input_shape)
                if self.depthwise_norms[i] is not None:
                    self.depthwise_norms[i].build(input_shape)
            branch.build(input_shape)
        pooled_shape = (input_shape[0], 1, 1, channels)
        self.pool_conv.build(pooled_shape)
        self.project.build((*input_shape[:-1], self.filters * (len(self.rates) + 2)))

    def call(self, inputs, training=None):
        branches = [self.conv1x1(inputs, training=training)]
        for i, branch in enumerate(self.atrous):
            x = inputs
            if self.separable:
                x = self.depthwise[i](x)
                if self.depthwise_norms[i] is not None:
                    x = self.depthwise_norms[i](x, training=training)
                if self.depthwise_acts[i] is not None:
                    x = self.depthwise_acts[i](x)
            branches.append(branch(x, training=training))
        pooled = self.pool_conv(self.pool(inputs), training=training)
        branches.append(self.pool_resize([pooled, inputs]))
        x = self.project(self.concat(branches), training=training)
        return self.drop(x, training=training)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "rates": self.rates,
                "norm": self.norm,
                "activation": self.activation,
                "dropout": self.dropout,
                "separable": self.separable,
                "norm_groups": self.norm_groups,
                "norm_epsilon": self.norm_epsilon,
                "norm_momentum": self.norm_momentum,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            }
        )
        return config


__all__ = ["ASPP", "BASE_RATES", "OUTPUT_STRIDES", "rates_for_output_stride"]

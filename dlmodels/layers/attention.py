"""Additive attention gate of Attention U-Net (Oktay et al. 2018, "Attention U-Net: Learning Where
to Look for the Pancreas", MIDL).

A skip connection `x` (fine grid, H x W) is weighted by attention coefficients computed from `x`
and a gating signal `g` taken from the coarser decoder level (H/2 x W/2), the paper's eq. (1)-(2):

    theta = W_x * x                 2x2 convolution, stride 2, no bias: x onto g's grid
    phi   = W_g * g + b_g           1x1 convolution with bias
    q     = psi * relu(theta + phi) + b_psi      1x1 convolution to one channel
    alpha = sigmoid(q)              (batch, H/2, W/2, 1), in (0, 1)
    alpha' = bilinear 2x upsampling of alpha    back onto x's grid (half-pixel centres,
                                                 edge-clamped: keras.layers.UpSampling2D)
    output = x * alpha'             alpha' broadcast over the channels of x

This is the grid-attention form of the authors' code (ozan-oktay/Attention-Gated-Networks,
`GridAttentionBlock2D` with sub-sample factor 2): the stride-2 `W_x` brings x down to the gating
grid and the coefficients are resampled back (the paper: "trilinear interpolation" in 3-D). The
authors' optional output transform (1x1 conv + batch norm after the product) is left out: the
layer returns exactly `x * alpha'`, and the U-Net's decoder convolutions follow it anyway.
"""

from __future__ import annotations

import keras
from keras import ops

from dlmodels._validation import check_positive_int
from dlmodels.errors import UserError


@keras.saving.register_keras_serializable(package="dlmodels")
class AttentionGate(keras.layers.Layer):
    """Additive attention gate (Oktay et al. 2018): `x * upsample(sigmoid(q(x, g)))`.

    Inputs are `[x, g]`: the skip feature map `x` (batch, H, W, C_x) with even H and W, and the
    gating signal `g` (batch, H/2, W/2, C_g) from one level deeper. See the module docstring for
    the equations.

    Args:
        filters: channels of the intermediate space F_int of `W_x`, `W_g` (>= 1); None means
            max(1, C_x // 2), the fallback of the authors' `GridAttentionBlock` when it is given
            no `inter_channels`. Their Attention U-Net passes F_int = C_x (`inter_size=
            filters[l]`), which `AttentionUNet` does too.
        return_attention: also return the coefficients `alpha` on x's grid (after upsampling),
            (batch, H, W, 1), e.g. to plot where the model looks.
        kernel_initializer, kernel_regularizer: of the three convolutions.

    Returns:
        `x * alpha` (batch, H, W, C_x), or `[x * alpha, alpha]` with `return_attention=True`.
    """

    def __init__(
        self,
        filters=None,
        return_attention=False,
        kernel_initializer="he_normal",
        kernel_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.filters = (
            None if filters is None else check_positive_int("filters", filters, owner=owner)
        )
        if return_attention not in (True, False):
            raise UserError(
                f"{owner}: `return_attention` must be True or False, got {return_attention!r}."
            )
        self.return_attention = bool(return_attention)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.theta = self.phi = None
        self.psi = keras.layers.Conv2D(
            1,
            1,
            use_bias=True,
            kernel_initializer=self.kernel_initializer,
            kernel_regularizer=self.kernel_regularizer,
            name="psi",
            dtype=self.dtype_policy,
        )
        self.upsample = keras.layers.UpSampling2D(
            2, interpolation="bilinear", name="alpha_upsample", dtype=self.dtype_policy
        )

    def _check_shapes(self, input_shape):
        if not isinstance(input_shape, list | tuple) or len(input_shape) != 2:
            raise UserError(
                f"{self.name}: AttentionGate takes two inputs [x, g] (skip feature map, gating "
                f"signal), got input shape {input_shape!r}."
            )
        x_shape, g_shape = (tuple(s) for s in input_shape)
        if len(x_shape) != 4 or len(g_shape) != 4:
            raise UserError(
                f"{self.name}: x and g must be 4-D (batch, H, W, C), got shapes {x_shape} and "
                f"{g_shape}."
            )
        if x_shape[-1] is None or g_shape[-1] is None:
            raise UserError(
                f"{self.name}: the channel axes of x and g must be known, got shapes {x_shape} "
                f"and {g_shape}."
            )
        for axis, xs, gs in zip(("height", "width"), x_shape[1:3], g_shape[1:3], strict=True):
            if xs is not None and xs % 2:
                raise UserError(
                    f"{self.name}: x has odd {axis} {xs}; the gate downsamples x by 2 (stride-2 "
                    "W_x) and upsamples the coefficients by 2, so x's height and width must be "
                    "even."
                )
            if xs is not None and gs is not None and gs * 2 != xs:
                raise UserError(
                    f"{self.name}: the gating signal g must have half the {axis} of x (one "
                    f"level coarser), got x {x_shape} and g {g_shape}."
                )
        return x_shape, g_shape

    def build(self, input_shape):
        x_shape, g_shape = self._check_shapes(input_shape)
        filters = self.filters or max(1, x_shape[-1] // 2)
        self.theta = keras.layers.Conv2D(
            filters,
            2,
            strides=2,
            use_bias=False,
            kernel_initializer=self.kernel_initializer,
            kernel_regularizer=self.kernel_regularizer,
            name="theta_x",
            dtype=self.dtype_policy,
        )
        self.phi = keras.layers.Conv2D(
            filters,
            1,
            use_bias=True,
            kernel_initializer=self.kernel_initializer,
            kernel_regularizer=self.kernel_regularizer,
            name="phi_g",
            dtype=self.dtype_policy,
        )
        self.theta.build(x_shape)
        self.phi.build(g_shape)
        inter = self.phi.compute_output_shape(g_shape)
        self.psi.build(inter)

    def attention(self, x, g):
        """The coefficients alpha on x's grid, (batch, H, W, 1), in (0, 1)."""
        f = ops.relu(self.theta(x) + self.phi(g))
        alpha = ops.sigmoid(self.psi(f))
        return self.upsample(alpha)

    def call(self, inputs):
        x, g = inputs
        alpha = self.attention(x, g)
        out = x * alpha
        if self.return_attention:
            return [out, alpha]
        return out

    def compute_output_shape(self, input_shape):
        x_shape = tuple(input_shape[0])
        if self.return_attention:
            return [x_shape, (*x_shape[:-1], 1)]
        return x_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "return_attention": self.return_attention,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            }
        )
        return config

"""Convolution + normalization + activation, and the norm / activation factories every block uses.

Normalization choices follow the papers the models come from: batch norm (Ioffe & Szegedy 2015,
"Batch Normalization: Accelerating Deep Network Training by Reducing Internal Covariate Shift"),
synchronized batch norm across replicas (needed for small per-replica batches under
tf.distribute), group norm (Wu & He 2018, "Group Normalization"), layer norm over channels
(Ba et al. 2016) and instance norm (Ulyanov et al. 2016), the last as group norm with one group
per channel.
"""

from __future__ import annotations

import keras

from dlmodels._validation import (
    check_choice,
    check_positive_int,
    check_strides_dilation,
    normalize_tuple,
)

NORMS = ("batch", "sync_batch", "group", "layer", "instance", None)
"""Allowed values of every `norm` argument in the library (`"none"` is accepted for None)."""

LEAKY_RELU_SLOPE = 0.01
"""`activation="leaky_relu"` uses this negative slope (PyTorch's and nnU-Net's default; Keras'
function default is 0.2). Pass `activation="leaky_relu_0.2"`-style names for other slopes."""


def _canonical_norm(norm):
    if isinstance(norm, str) and norm.lower() == "none":
        return None
    return norm


def validate_norm(norm, *, name: str = "norm", owner: str = ""):
    """Return the canonical norm choice or raise ValueError naming the allowed values."""
    norm = _canonical_norm(norm)
    return check_choice(name, norm, NORMS, owner=owner)


def _leaky_slope(activation: str):
    """`leaky_relu` -> 0.01; `leaky_relu_0.2` -> 0.2; anything else -> None."""
    if activation == "leaky_relu":
        return LEAKY_RELU_SLOPE
    if activation.startswith("leaky_relu_"):
        try:
            return float(activation[len("leaky_relu_") :])
        except ValueError:
            return None
    return None


def validate_activation(activation, *, name: str = "activation", owner: str = ""):
    """Return the activation name (None for no activation) or raise a ValueError."""
    if activation is None or activation == "linear":
        return None
    where = f"{owner}: " if owner else ""
    if not isinstance(activation, str):
        raise ValueError(
            f"{where}`{name}` must be a Keras activation name such as 'relu', 'swish', "
            f"'leaky_relu' or None, got {activation!r}."
        )
    if _leaky_slope(activation) is not None:
        return activation
    try:
        keras.activations.get(activation)
    except (ValueError, TypeError):
        raise ValueError(
            f"{where}`{name}`={activation!r} is not a Keras activation. Use a name from "
            "keras.activations (e.g. 'relu', 'gelu', 'swish', 'sigmoid', 'softmax', 'tanh'), "
            "'leaky_relu' (slope 0.01), 'leaky_relu_<slope>' or None."
        ) from None
    return activation


def make_activation(activation, *, name=None, dtype=None):
    """A Keras layer applying `activation`, or None when `activation` is None / 'linear'."""
    activation = validate_activation(activation)
    if activation is None:
        return None
    slope = _leaky_slope(activation)
    if slope is not None:
        return keras.layers.LeakyReLU(negative_slope=slope, name=name, dtype=dtype)
    if activation == "relu":
        return keras.layers.ReLU(name=name, dtype=dtype)
    return keras.layers.Activation(activation, name=name, dtype=dtype)


def make_norm(
    norm,
    *,
    channels: int | None = None,
    groups: int = 32,
    epsilon: float = 1e-5,
    momentum: float = 0.9,
    name=None,
    dtype=None,
):
    """A normalization layer for channels-last feature maps, or None for `norm=None`.

    Args:
        norm: one of `NORMS`.
        channels: number of channels; needed by "group" (to check divisibility) and "instance".
        groups: groups of "group" norm; must divide `channels`.
        epsilon: added to the variance.
        momentum: moving-average momentum of batch norm (Keras convention: 0.9 keeps 90 %).
    """
    norm = validate_norm(norm)
    if norm is None:
        return None
    if norm in ("batch", "sync_batch"):
        return keras.layers.BatchNormalization(
            epsilon=epsilon,
            momentum=momentum,
            synchronized=norm == "sync_batch",
            name=name,
            dtype=dtype,
        )
    if norm == "layer":
        return keras.layers.LayerNormalization(axis=-1, epsilon=epsilon, name=name, dtype=dtype)
    if norm == "instance":
        return keras.layers.GroupNormalization(groups=-1, epsilon=epsilon, name=name, dtype=dtype)
    # group
    if channels is not None and channels % groups:
        raise ValueError(
            f"`norm_groups`={groups} must divide the number of channels ({channels}) for "
            "norm='group'. Pick norm_groups among the divisors of the channel count."
        )
    return keras.layers.GroupNormalization(groups=groups, epsilon=epsilon, name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package="dlmodels")
class ConvNormAct(keras.layers.Layer):
    """2-D convolution followed by normalization and activation (or the reverse with `preact`).

    The unit every CNN in the library is built from. In the default order (`preact=False`) it
    computes `act(norm(conv(x)))`, the form of ResNet v1 (He et al. 2015, "Deep Residual Learning
    for Image Recognition") and U-Net (Ronneberger et al. 2015). With `preact=True` it computes
    `conv(act(norm(x)))`, the full pre-activation ordering of He et al. 2016 ("Identity Mappings
    in Deep Residual Networks").

    Args:
        filters: output channels (>= 1).
        kernel_size: int or (h, w).
        strides: int or (h, w).
        dilation_rate: int or (h, w); dilation with stride 1 keeps the spatial size under
            `padding="same"` (Yu & Koltun 2016, "Multi-Scale Context Aggregation by Dilated
            Convolutions").
        padding: "same" or "valid".
        groups: convolution groups; must divide input and output channels.
        use_bias: conv bias; None means "only when there is no norm right after the conv".
        norm: one of "batch", "sync_batch", "group", "layer", "instance", None.
        activation: a Keras activation name, "leaky_relu" (slope 0.01), "leaky_relu_<slope>"
            or None.
        preact: norm and activation before the conv instead of after it.
        norm_groups: groups of group norm.
        norm_epsilon, norm_momentum: normalization constants (momentum in the Keras sense).
        kernel_initializer, kernel_regularizer: as in `keras.layers.Conv2D`.

    Returns:
        A tensor of shape (batch, H', W', filters).
    """

    def __init__(
        self,
        filters,
        kernel_size=3,
        strides=1,
        dilation_rate=1,
        padding="same",
        groups=1,
        use_bias=None,
        norm="batch",
        activation="relu",
        preact=False,
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
        self.kernel_size = normalize_tuple("kernel_size", kernel_size, 2, owner=owner)
        self.strides = normalize_tuple("strides", strides, 2, owner=owner)
        self.dilation_rate = normalize_tuple("dilation_rate", dilation_rate, 2, owner=owner)
        self.padding = check_choice("padding", padding, ("same", "valid"), owner=owner)
        self.groups = check_positive_int("groups", groups, owner=owner)
        self.norm = validate_norm(norm, owner=owner)
        self.activation = validate_activation(activation, owner=owner)
        self.preact = bool(preact)
        self.norm_groups = check_positive_int("norm_groups", norm_groups, owner=owner)
        self.norm_epsilon = float(norm_epsilon)
        self.norm_momentum = float(norm_momentum)
        check_strides_dilation(self.strides, self.dilation_rate, owner=owner)
        if self.filters % self.groups:
            raise ValueError(
                f"{owner}: `groups`={self.groups} must divide `filters`={self.filters}."
            )
        self.use_bias = (self.norm is None or self.preact) if use_bias is None else bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)

        self.conv = keras.layers.Conv2D(
            self.filters,
            self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            groups=self.groups,
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            kernel_regularizer=self.kernel_regularizer,
            name="conv",
            dtype=self.dtype_policy,
        )
        # A pre-activation unit normalizes its *input*, whose channel count is known at build.
        self.norm_layer = None
        if not self.preact:
            self.norm_layer = make_norm(
                self.norm,
                channels=self.filters,
                groups=self.norm_groups,
                epsilon=self.norm_epsilon,
                momentum=self.norm_momentum,
                name="norm",
                dtype=self.dtype_policy,
            )
        self.act = make_activation(self.activation, name="act", dtype=self.dtype_policy)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(
                f"{self.name}: the channel axis of the input must be known, got shape "
                f"{tuple(input_shape)}."
            )
        if channels % self.groups:
            raise ValueError(
                f"{self.name}: `groups`={self.groups} must divide the input channels ({channels})."
            )
        if self.preact:
            self.norm_layer = make_norm(
                self.norm,
                channels=channels,
                groups=self.norm_groups,
                epsilon=self.norm_epsilon,
                momentum=self.norm_momentum,
                name="norm",
                dtype=self.dtype_policy,
            )
            if self.norm_layer is not None:
                self.norm_layer.build(input_shape)
            self.conv.build(input_shape)
        else:
            self.conv.build(input_shape)
            out_shape = self.conv.compute_output_shape(input_shape)
            if self.norm_layer is not None:
                self.norm_layer.build(out_shape)

    def call(self, inputs, training=None):
        x = inputs
        if self.preact:
            if self.norm_layer is not None:
                x = self.norm_layer(x, training=training)
            if self.act is not None:
                x = self.act(x)
            return self.conv(x)
        x = self.conv(x)
        if self.norm_layer is not None:
            x = self.norm_layer(x, training=training)
        if self.act is not None:
            x = self.act(x)
        return x

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "dilation_rate": self.dilation_rate,
                "padding": self.padding,
                "groups": self.groups,
                "use_bias": self.use_bias,
                "norm": self.norm,
                "activation": self.activation,
                "preact": self.preact,
                "norm_groups": self.norm_groups,
                "norm_epsilon": self.norm_epsilon,
                "norm_momentum": self.norm_momentum,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            }
        )
        return config

"""Spatial resampling for dense-prediction heads: resize or crop to another tensor's runtime size,
adaptive average pooling to a fixed grid, and the bilinear initializer of learned upsampling.

Segmentation decoders (DeepLabv3/v3+, FCN, PSPNet) bring coarse maps back to the size of a finer
map or of the image. With `None` spatial dimensions that size is only known at run time, and the
stride arithmetic of a ResNet rounds up (a 248-pixel input gives C2 62, C5 16 at output stride
16, and 16 * 16 != 248), so a fixed upsampling factor would miss. These layers read the target
size from the reference tensor's runtime shape instead; traced by tf2onnx the size becomes a
`Shape -> Slice` subgraph, so an ONNX file exported with dynamic height and width resizes
correctly for every input size.

Conventions (why): bilinear resizing uses half-pixel centers (`align_corners=False`), the
convention of TensorFlow 2's `tf.image.resize`, PyTorch's `F.interpolate(align_corners=False)`
and ONNX `Resize` with `coordinate_transformation_mode="half_pixel"`, which is what tf2onnx emits
for it. Adaptive average pooling uses PyTorch's bin edges (`AdaptiveAvgPool2d`): bin i of b over
n cells spans [floor(i * n / b), ceil((i + 1) * n / b)).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from dlmodels._validation import check_choice, normalize_tuple

INTERPOLATIONS = ("bilinear", "nearest")


def _check_pair(layer, inputs):
    if not isinstance(inputs, list | tuple) or len(inputs) != 2:
        raise ValueError(
            f"{layer.name}: call the layer on [x, reference] (two rank-4 tensors), got "
            f"{type(inputs).__name__}."
        )
    return inputs


@keras.saving.register_keras_serializable(package="dlmodels")
class ResizeLike(keras.layers.Layer):
    """Resize `x` to the runtime height and width of `reference`: `ResizeLike()([x, reference])`.

    Bilinear interpolation uses half-pixel centers (align_corners=False, no antialiasing), as
    `tf.image.resize`, PyTorch's `interpolate(align_corners=False)` and the DeepLab / PSPNet
    reference heads; exported to ONNX it becomes `Resize` with
    `coordinate_transformation_mode="half_pixel"` and a size read from `reference`'s shape, so
    dynamic spatial sizes work after export too.

    Args:
        interpolation: "bilinear" (default; checked against numpy and through ONNX by the
            tests) or "nearest" (TensorFlow's half-pixel nearest; its ONNX export is not
            checked).

    Returns:
        `x` resized to (batch, H_ref, W_ref, C_x), in the layer's compute dtype.
    """

    def __init__(self, interpolation="bilinear", **kwargs):
        super().__init__(**kwargs)
        self.interpolation = check_choice(
            "interpolation", interpolation, INTERPOLATIONS, owner=type(self).__name__
        )
        self._build_at_init()

    def call(self, inputs):
        x, reference = _check_pair(self, inputs)
        # keras.ops.image.resize wants Python ints; a size known only at run time (None
        # spatial dims) needs the TensorFlow op, which takes the size as a tensor.
        size = tf.shape(reference)[1:3]
        y = tf.image.resize(x, size, method=self.interpolation, antialias=False)
        # tf.image.resize returns float32 for bilinear; keep the layer's compute dtype (float16
        # under mixed precision).
        return ops.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        x_shape, ref_shape = input_shape
        return (x_shape[0], ref_shape[1], ref_shape[2], x_shape[-1])

    def get_config(self):
        config = super().get_config()
        config["interpolation"] = self.interpolation
        return config


@keras.saving.register_keras_serializable(package="dlmodels")
class CropLike(keras.layers.Layer):
    """Crop `x` to the runtime height and width of `reference` (top-left aligned).

    FCN (Long et al. 2015) crops each 2x-upsampled score map to the skip map it is summed with;
    with stride arithmetic that rounds up (an odd-sized C4 of 7 under a C5 of 4), the upsampled
    map is one cell larger, and the extra last row / column is dropped. `x` must be at least as
    large as `reference` (checked when both sizes are static).

    Returns:
        `x[:, :H_ref, :W_ref, :]`.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._build_at_init()

    def call(self, inputs):
        x, reference = _check_pair(self, inputs)
        size = ops.shape(reference)
        return x[:, : size[1], : size[2], :]

    def compute_output_shape(self, input_shape):
        x_shape, ref_shape = input_shape
        for axis in (1, 2):
            big, small = x_shape[axis], ref_shape[axis]
            if big is not None and small is not None and big < small:
                raise ValueError(
                    f"{self.name}: cannot crop a map of spatial shape {x_shape[1:3]} to the "
                    f"larger {ref_shape[1:3]}."
                )
        return (x_shape[0], ref_shape[1], ref_shape[2], x_shape[-1])


def adaptive_pool_edges(size: int, bins: int) -> list[tuple[int, int]]:
    """PyTorch's AdaptiveAvgPool bin edges: [(floor(i*size/bins), ceil((i+1)*size/bins))]."""
    return [((i * size) // bins, -((-(i + 1) * size) // bins)) for i in range(bins)]


@keras.saving.register_keras_serializable(package="dlmodels")
class AdaptiveAveragePooling2D(keras.layers.Layer):
    """Average-pool a (batch, H, W, C) map to a fixed (bins_h, bins_w) grid, for any H and W.

    The pooling of PSPNet's pyramid pooling module (Zhao et al. 2017, "Pyramid Scene Parsing
    Network"), with PyTorch's `AdaptiveAvgPool2d` bin edges: output cell (i, j) is the mean of
    rows [floor(i*H/bh), ceil((i+1)*H/bh)) and columns [floor(j*W/bw), ceil((j+1)*W/bw)) (bins
    overlap when the size is not divisible, and repeat cells when bins > size).

    Two exact computations:
    - static H (W) divisible by bins: plain average pooling with kernel = stride = H / bins
      (ONNX `AveragePool`);
    - otherwise (sizes not divisible, or `None` sizes only known at run time): the mean over a
      rectangle is the mean over its rows of the mean over its columns, so the layer multiplies
      by two averaging matrices, P_h (bh x H) and P_w (bw x W), whose rows hold 1 / bin length
      on the bin's cells. The matrices are computed from the *runtime* size with integer ops, so
      a model with dynamic spatial size pools exactly at every size, in Keras and after ONNX
      export (`Range`, comparisons and `MatMul`); static non-divisible sizes take the same path.

    Args:
        output_size: int or (bins_h, bins_w), each >= 1.

    Returns:
        (batch, bins_h, bins_w, C) in the layer's compute dtype.
    """

    def __init__(self, output_size, **kwargs):
        super().__init__(**kwargs)
        self.output_size = normalize_tuple("output_size", output_size, 2, owner=type(self).__name__)
        self._build_at_init()

    def _pool_axis(self, x, axis, bins):
        """Average-pool `x` (batch, H, W, C) along spatial `axis` (1 or 2) into `bins` cells."""
        static = x.shape[axis]
        if static is not None and static % bins == 0:
            k = static // bins
            pool = (k, 1) if axis == 1 else (1, k)
            return ops.average_pool(x, pool, strides=pool, padding="valid")
        n = ops.shape(x)[axis]
        i = ops.arange(bins, dtype="int32")
        start = ops.floor_divide(i * n, bins)
        end = ops.floor_divide((i + 1) * n + bins - 1, bins)
        cells = ops.arange(n, dtype="int32")
        inside = ops.logical_and(
            ops.greater_equal(cells[None, :], start[:, None]),
            ops.less(cells[None, :], end[:, None]),
        )
        weights = ops.cast(inside, "float32") / ops.cast(end - start, "float32")[:, None]
        weights = ops.cast(weights, x.dtype)  # (bins, n)
        if axis == 1:
            return ops.einsum("bh,nhwc->nbwc", weights, x)
        return ops.einsum("bw,nhwc->nhbc", weights, x)

    def call(self, inputs):
        x = self._pool_axis(inputs, 1, self.output_size[0])
        return self._pool_axis(x, 2, self.output_size[1])

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.output_size, input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config["output_size"] = self.output_size
        return config


def bilinear_upsampling_kernel(kernel_size: int, channels: int) -> np.ndarray:
    """The (k, k, channels, channels) transposed-conv kernel that upsamples each channel
    bilinearly (channel c to channel c only): FCN's initialization (Long et al. 2015).

    With `kernel_size = 2 * factor` and `strides = factor`, `padding="same"`, the transposed
    convolution equals half-pixel bilinear resizing by `factor` away from the border (the
    border rows see zero padding instead of the replicated edge)."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = np.arange(kernel_size)
    filt1d = 1.0 - np.abs(og - center) / factor
    filt = np.outer(filt1d, filt1d)
    kernel = np.zeros((kernel_size, kernel_size, channels, channels), dtype="float32")
    for c in range(channels):
        kernel[:, :, c, c] = filt
    return kernel


@keras.saving.register_keras_serializable(package="dlmodels")
class BilinearUpsampling(keras.initializers.Initializer):
    """Initializer of a `Conv2DTranspose` kernel (k, k, out, in) to per-channel bilinear
    upsampling, as FCN initializes its learned 2x upsampling (Long et al. 2015, section 3.3).
    Needs a square kernel and out == in channels."""

    def __call__(self, shape, dtype=None):
        kh, kw, out_ch, in_ch = shape
        if kh != kw or out_ch != in_ch:
            raise ValueError(
                "BilinearUpsampling: the kernel must be square with as many output as input "
                f"channels, got shape {tuple(shape)}."
            )
        return ops.convert_to_tensor(
            bilinear_upsampling_kernel(int(kh), int(in_ch)), dtype=dtype or "float32"
        )

    def get_config(self):
        return {}


__all__ = [
    "AdaptiveAveragePooling2D",
    "BilinearUpsampling",
    "CropLike",
    "ResizeLike",
    "adaptive_pool_edges",
    "bilinear_upsampling_kernel",
]

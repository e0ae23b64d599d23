"""Multiply-accumulate counts of a model's inference graph (the "GMACs" of the zoo tables).

Counted from TensorFlow's traced graph, not from layer types, so layers that nest convolutions
(ConvNormAct, residual blocks, ASPP, attention gates) are counted exactly: one MAC per
multiply-add of a convolution, transposed convolution, depthwise convolution or matrix
product. Normalization, activations, pooling, resizing and additions are not counted (the
convention of the papers' and torchvision's tables, where they are < 1% for these models).
Work inside `tf.while_loop` bodies (recurrent layers) is not counted.

A dilated convolution is counted as the convolution the layer defines (output positions x
kernel taps x input channels). On CPU TensorFlow lowers it to `SpaceToBatchND` -> a VALID
convolution -> `BatchToSpaceND`, which pads the input up to a multiple of the rate and crops
surplus outputs away afterwards: that lowering's extra outputs are not counted (onnxruntime and
OpenVINO run the dilated convolution itself; tf2onnx folds the pattern back into one `Conv`).

`count_macs(..., effective=True)` counts, for `Conv2D` and `DepthwiseConv2dNative`, only the
(output position, kernel tap) pairs whose input coordinate lies inside the input: taps that read
padding (SAME / EXPLICIT padding, the zeros a `SpaceToBatchND` lowering adds, a zero `Pad` /
`ZeroPadding2D` feeding the convolution) are left out. A 3x3 convolution of rate 18 on a 16x16
map with SAME padding reads real data with its centre tap only: 1/9 of the nominal count. The
count factorises over the spatial axes and is exact per axis. Transposed convolutions, 3-D
convolutions and matrix products count the same in both modes.
"""

from __future__ import annotations

import numpy as np


def _elements(shape) -> int:
    dims = shape.as_list()
    if any(d is None for d in dims):
        raise ValueError(f"count_macs needs static shapes; found {dims}")
    return int(np.prod(dims, dtype=np.int64))


def _static(tensor):
    import tensorflow as tf

    value = tf.get_static_value(tensor)
    return None if value is None else np.asarray(value)


def axis_valid_pairs(
    size: int, kernel: int, out: int, *, stride: int = 1, dilation: int = 1, pad_before: int = 0
) -> int:
    """(output position, kernel tap) pairs of one convolution axis whose input coordinate
    `o * stride - pad_before + t * dilation` lies inside the input `[0, size)`, for output
    positions `o < out` and taps `t < kernel`."""
    o = np.arange(out, dtype=np.int64)[:, None]
    t = np.arange(kernel, dtype=np.int64)[None, :]
    index = o * stride - pad_before + t * dilation
    return int(np.count_nonzero((index >= 0) & (index < size)))


def same_pad_before(size: int, kernel: int, stride: int, dilation: int) -> int:
    """TensorFlow's SAME padding before the first element of one axis (the smaller half when
    the total is odd: TensorFlow pads more after)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2


def _zero_pad(op):
    """(input tensor, paddings) when `op` is a constant zero `Pad`/`PadV2`, else None."""
    if op.type not in ("Pad", "PadV2"):
        return None
    paddings = _static(op.inputs[1])
    if paddings is None:
        return None
    if op.type == "PadV2":
        value = _static(op.inputs[2])
        if value is None or float(value) != 0.0:
            return None
    return op.inputs[0], paddings


def _conv2d_axes(op):
    """The convolution `op` (Conv2D / DepthwiseConv2dNative) defines, per spatial axis:
    (batch, output channels, input channels per output MAC, [(size, kernel, out, stride,
    dilation, pad_before)] for H and W), undoing TensorFlow's SpaceToBatchND lowering of
    dilated convolutions and a constant zero `Pad` feeding it."""
    fmt = op.get_attr("data_format").decode()
    spatial = (2, 3) if fmt == "NCHW" else (1, 2)
    channel = 1 if fmt == "NCHW" else 3
    strides, dilations = op.get_attr("strides"), op.get_attr("dilations")
    padding = op.get_attr("padding").decode()
    x_shape = op.inputs[0].shape.as_list()
    k_shape = op.inputs[1].shape.as_list()
    y_shape = op.outputs[0].shape.as_list()
    for dims in (x_shape, y_shape):
        if any(d is None for d in dims):
            raise ValueError(f"count_macs needs static shapes; found {dims}")
    # Depthwise: one input channel per output channel; Conv2D: the input channels per group.
    per_mac = 1 if op.type == "DepthwiseConv2dNative" else int(k_shape[2])
    batch, channels = int(y_shape[0]), int(y_shape[channel])
    axes = []
    for i, a in enumerate(spatial):
        k, s, d = int(k_shape[i]), int(strides[a]), int(dilations[a])
        n, m = int(x_shape[a]), int(y_shape[a])
        if padding == "SAME":
            p = same_pad_before(n, k, s, d)
        elif padding == "EXPLICIT":
            p = int(op.get_attr("explicit_paddings")[2 * a])
        else:
            p = 0
        axes.append([n, k, m, s, d, p])
    source = op.inputs[0].op
    if source.type == "SpaceToBatchND" and fmt == "NHWC":
        block, pads = _static(source.inputs[1]), _static(source.inputs[2])
        crops = None
        for consumer in op.outputs[0].consumers():
            if consumer.type == "BatchToSpaceND":
                crops = _static(consumer.inputs[2])
                out_shape = consumer.outputs[0].shape.as_list()
        lowered = block is not None and pads is not None and crops is not None
        # SpaceToBatchND only serves stride-1 convolutions.
        if lowered and block.size == 2 and all(ax[3] == 1 for ax in axes):
            x_shape = source.inputs[0].shape.as_list()
            batch = int(out_shape[0])
            for i, (_, k, m, _, d, p) in enumerate(axes):
                b = int(block[i])
                # Output q of the interleaved (uncropped) result reads padded input
                # q + t * b * d, i.e. original input q + t * b * d - pads[i, 0]; the logical
                # outputs are q in [crops[i, 0], b * m - crops[i, 1]).
                axes[i] = [
                    int(x_shape[1 + i]),
                    k,
                    b * m - int(crops[i][0]) - int(crops[i][1]),
                    1,
                    b * d,
                    p + int(pads[i][0]) - int(crops[i][0]),
                ]
            source = source.inputs[0].op
    padded = _zero_pad(source)
    if padded is not None:
        x, paddings = padded
        for i, a in enumerate(spatial):
            axes[i][0] = int(x.shape.as_list()[a])
            axes[i][5] += int(paddings[a][0])
    return batch, channels, per_mac, [tuple(ax) for ax in axes]


def _op_macs(op, effective=False) -> int:
    kind = op.type
    if kind in ("Conv2D", "DepthwiseConv2dNative"):
        batch, channels, per_mac, axes = _conv2d_axes(op)
        total = batch * channels * per_mac
        for n, k, m, s, d, p in axes:
            if effective:
                total *= axis_valid_pairs(n, k, m, stride=s, dilation=d, pad_before=p)
            else:
                total *= m * k
        return int(total)
    if kind == "Conv3D":
        kernel = op.inputs[1].shape.as_list()
        return _elements(op.outputs[0].shape) * int(np.prod(kernel[:-1]))
    if kind in ("Conv2DBackpropInput", "Conv3DBackpropInputV2"):
        # Transposed convolution: every input element meets every kernel tap and output channel.
        kernel = op.inputs[1].shape.as_list()  # (kh, kw, out_channels, in_channels)
        return _elements(op.inputs[2].shape) * int(np.prod(kernel[:-1]))
    if kind == "MatMul":
        a, b = op.inputs[0].shape.as_list(), op.inputs[1].shape.as_list()
        m = a[1] if op.get_attr("transpose_a") else a[0]
        k = a[0] if op.get_attr("transpose_a") else a[1]
        n = b[0] if op.get_attr("transpose_b") else b[1]
        return int(m) * int(k) * int(n)
    if kind in ("BatchMatMulV2", "BatchMatMulV3"):
        a = op.inputs[0].shape.as_list()
        k = a[-2] if op.get_attr("adj_x") else a[-1]
        return _elements(op.outputs[0].shape) * int(k)
    return 0


def count_macs(model, input_shape=None, *, batch: int = 1, effective: bool = False) -> int:
    """Multiply-accumulates of one inference of `model` on `batch` inputs.

    Args:
        model: a Keras model with one input (TensorFlow backend).
        input_shape: per-example input shape, e.g. (64, 64, 3); default: the model's, which must
            then be fully known.
        batch: batch size of the traced call (MACs scale linearly with it).
        effective: count only the convolution taps that read inside the input, not padding
            (see the module docstring); False: every tap (the papers' convention).

    Returns:
        The MAC count (divide by 1e9 for GMACs).

    Raises:
        ValueError: the model has several inputs, or a spatial size is unknown.
    """
    import tensorflow as tf

    if len(model.inputs) != 1:
        raise ValueError(f"count_macs takes single-input models; {model.name!r} has several")
    shape = tuple(input_shape) if input_shape is not None else tuple(model.inputs[0].shape[1:])
    if any(d is None for d in shape):
        raise ValueError(
            f"count_macs: `input_shape`={shape} has unknown sizes; pass a concrete input_shape"
        )
    spec = tf.TensorSpec((batch, *shape), model.inputs[0].dtype)
    graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec).graph
    return graph_macs(graph, effective=effective)


def graph_macs(graph, *, effective: bool = False) -> int:
    """Multiply-accumulates of every operation of a traced TensorFlow graph (e.g.
    `tf.function(fn).get_concrete_function(spec).graph`), counted as `count_macs` does."""
    return int(sum(_op_macs(op, effective) for op in graph.get_operations()))

"""Multiply-accumulate counts of a model's inference graph (the "GMACs" of the zoo tables).

Counted from TensorFlow's traced graph, not from layer types, so layers that nest convolutions
(ConvNormAct, residual blocks, ASPP, attention gates) are counted exactly: one MAC per
multiply-add of a convolution, transposed convolution, depthwise convolution or matrix
product. Normalization, activations, pooling, resizing and additions are not counted (the
convention of the papers' and torchvision's tables, where they are < 1% for these models).
Work inside `tf.while_loop` bodies (recurrent layers) is not counted.
"""

from __future__ import annotations

import numpy as np


def _elements(shape) -> int:
    dims = shape.as_list()
    if any(d is None for d in dims):
        raise ValueError(f"count_macs needs static shapes; found {dims}")
    return int(np.prod(dims, dtype=np.int64))


def _op_macs(op) -> int:
    kind = op.type
    if kind in ("Conv2D", "Conv3D"):
        kernel = op.inputs[1].shape.as_list()
        return _elements(op.outputs[0].shape) * int(np.prod(kernel[:-1]))
    if kind == "DepthwiseConv2dNative":
        kh, kw = op.inputs[1].shape.as_list()[:2]
        return _elements(op.outputs[0].shape) * kh * kw
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


def count_macs(model, input_shape=None, *, batch: int = 1) -> int:
    """Multiply-accumulates of one inference of `model` on `batch` inputs.

    Args:
        model: a Keras model with one input (TensorFlow backend).
        input_shape: per-example input shape, e.g. (64, 64, 3); default: the model's, which must
            then be fully known.
        batch: batch size of the traced call (MACs scale linearly with it).

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
    return int(sum(_op_macs(op) for op in graph.get_operations()))

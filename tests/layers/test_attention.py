"""AttentionGate against Oktay et al. 2018's equations computed in numpy with the layer's weights.

alpha = sigmoid(psi . relu(W_x *2x2/s2 x + W_g . g + b_g) + b_psi), bilinearly upsampled x2
(half-pixel centres, edge-clamped), output = x * alpha.
"""

import keras
import numpy as np
import pytest

from dlmodels.layers.attention import AttentionGate
from tests.helpers import run_layer_test


def np_upsample2_bilinear(a):
    """2x bilinear upsampling with half-pixel centres along H and W, edges clamped: output pixel
    2k samples source k - 1/4, output 2k + 1 samples k + 1/4."""
    for axis in (1, 2):
        n = a.shape[axis]
        prev = np.take(a, np.clip(np.arange(n) - 1, 0, n - 1), axis=axis)
        nxt = np.take(a, np.clip(np.arange(n) + 1, 0, n - 1), axis=axis)
        even = 0.75 * a + 0.25 * prev
        odd = 0.75 * a + 0.25 * nxt
        a = np.stack([even, odd], axis=axis + 1)
        shape = list(even.shape)
        shape[axis] = 2 * n
        a = a.reshape(shape)
    return a


def np_gate(layer, x, g, f_int):
    """The reference with the layer's weights, whose shapes are checked against the F_int the
    caller expects (written in the test, not read from the layer)."""
    w_x = keras.ops.convert_to_numpy(layer.theta.kernel).astype("float64")  # (2, 2, Cx, F)
    w_g = keras.ops.convert_to_numpy(layer.phi.kernel)[0, 0].astype("float64")  # (Cg, F)
    b_g = keras.ops.convert_to_numpy(layer.phi.bias).astype("float64")
    psi = keras.ops.convert_to_numpy(layer.psi.kernel)[0, 0].astype("float64")  # (F, 1)
    b_psi = keras.ops.convert_to_numpy(layer.psi.bias).astype("float64")
    cx, cg = x.shape[-1], g.shape[-1]
    assert (w_x.shape, w_g.shape, b_g.shape) == ((2, 2, cx, f_int), (cg, f_int), (f_int,))
    assert (psi.shape, b_psi.shape) == ((f_int, 1), (1,))
    x, g = x.astype("float64"), g.astype("float64")
    theta = sum(x[:, i::2, j::2] @ w_x[i, j] for i in range(2) for j in range(2))
    q = np.maximum(theta + g @ w_g + b_g, 0.0) @ psi + b_psi
    alpha = np_upsample2_bilinear(1.0 / (1.0 + np.exp(-q)))
    return x * alpha, alpha


def _inputs(seed=0, size=8, cx=6, cg=10):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, size, size, cx)).astype("float32")
    g = rng.standard_normal((2, size // 2, size // 2, cg)).astype("float32")
    return x, g


def test_attention_gate_matches_numpy_reference():
    x, g = _inputs()
    layer = AttentionGate(filters=5, kernel_initializer="glorot_normal")
    layer([x, g])  # build
    layer.psi.bias.assign(np.array([0.3], "float32"))  # non-zero b_psi in the check
    phi_bias = np.linspace(-0.5, 0.5, 5).astype("float32")
    layer.phi.bias.assign(phi_bias)
    out = keras.ops.convert_to_numpy(layer([x, g]))
    ref, alpha_ref = np_gate(layer, x, g, 5)
    assert layer.theta.kernel.shape == (2, 2, 6, 5) and not layer.theta.use_bias
    np.testing.assert_allclose(out, ref, atol=1e-5)
    alpha = keras.ops.convert_to_numpy(layer.attention(x, g))
    np.testing.assert_allclose(alpha, alpha_ref, atol=1e-5)
    assert alpha.shape == (2, 8, 8, 1)
    # the coefficients are a real attention map: strictly inside (0, 1) and not constant
    assert alpha.min() > 0.0 and alpha.max() < 1.0 and alpha.std() > 1e-3
    np.testing.assert_allclose(out, x * alpha, atol=1e-6)


def test_attention_gate_return_attention_and_default_filters():
    x, g = _inputs(seed=1)
    layer = AttentionGate(return_attention=True)
    out, alpha = (keras.ops.convert_to_numpy(t) for t in layer([x, g]))
    # filters=None: C_x // 2 = 6 // 2, GridAttentionBlock's fallback without inter_channels
    # (AttentionUNet passes F_int = C_x explicitly, see tests/models/test_unet_variants.py)
    np.testing.assert_allclose(out, x * alpha, atol=1e-6)
    np.testing.assert_allclose(out, np_gate(layer, x, g, 3)[0], atol=1e-5)
    assert layer.compute_output_shape([x.shape, g.shape]) == [x.shape, (2, 8, 8, 1)]


def test_attention_gate_layer_harness():
    run_layer_test(
        AttentionGate,
        {"filters": 4},
        [((None, 8, 8, 6), "float32"), ((None, 4, 4, 10), "float32")],
        (2, 8, 8, 6),
    )


@pytest.mark.parametrize(
    "shapes, match",
    [
        ([(None, 8, 8, 6), (None, 8, 8, 10)], r"half the height of x"),
        ([(None, 7, 8, 6), (None, 4, 4, 10)], r"odd height 7.*must be even"),
        ([(None, 8, 8, None), (None, 4, 4, 10)], r"channel axes"),
    ],
)
def test_attention_gate_bad_shapes(shapes, match):
    inputs = [keras.Input(batch_shape=s) for s in shapes]
    with pytest.raises(ValueError, match=match):
        AttentionGate()(inputs)


def test_attention_gate_bad_arguments():
    with pytest.raises(ValueError, match=r"AttentionGate: `filters` must be a positive integer.*0"):
        AttentionGate(filters=0)
    with pytest.raises(ValueError, match=r"two inputs \[x, g\]"):
        AttentionGate()(keras.Input((8, 8, 3)))

"""FCN and PSPNet: harness (save, mixed precision, ONNX parity), FCN-8s against a numpy
recomputation of its skip fusion, the bilinear initialization of the learned upsampling,
adaptive average pooling against a numpy AdaptiveAvgPool2d (Keras static / dynamic and ONNX),
parameter counts by hand, argument errors."""

import os
import tempfile

import keras
import numpy as np
import onnxruntime as ort
import pytest

import dlmodels.models.fcn  # registers "fcn"
import dlmodels.models.pspnet  # noqa: F401  (registers "pspnet")
from dlmodels import export
from dlmodels.layers.resize import (
    AdaptiveAveragePooling2D,
    BilinearUpsampling,
    CropLike,
    ResizeLike,
    adaptive_pool_edges,
    bilinear_upsampling_kernel,
)
from dlmodels.models import registry
from dlmodels.models.fcn import FCN
from dlmodels.models.pspnet import PSPNet
from dlmodels.models.resnet import ResNet18
from tests.helpers import run_layer_test, run_model_test
from tests.models.test_deeplab import _bilinear_reference


def _randomize_fcn_skips(model, seed=0):
    """The skip scores start at zero (the paper); give them and the upsampling kernels random
    values so the parity checks see every path."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.name.startswith(("score_c3", "score_c4", "upsample_to_")):
            layer.set_weights(
                [rng.normal(0, 0.2, w.shape).astype("float32") for w in layer.weights]
            )
    return model


# -- FCN ---------------------------------------------------------------------------------------
def test_fcn8s_harness():
    """40x40: C3 5, C4 3, C5 2, so both crops drop a row and a column (4 -> 3, 6 -> 5)."""
    run_model_test(
        lambda: _randomize_fcn_skips(FCN((40, 40, 3), 3, variant="8s", backbone="resnet18")),
        (1, 40, 40, 3),
        (1, 40, 40, 3),
        saved_model=False,  # SavedModel of these layers is covered by the DeepLab tests
    )


def _transposed_conv_2x(x, kernel):
    """numpy conv2d_transpose, stride 2, 4x4 kernel (kh, kw, out, in), 'same' padding: scatter
    x[i] * k[a] to position 2i + a of a (2n + 2) map, then drop one border cell each side."""
    n, h, w, _ = x.shape
    full = np.zeros((n, 2 * h + 2, 2 * w + 2, kernel.shape[2]))
    for a in range(4):
        for b in range(4):
            full[:, a : a + 2 * h : 2, b : b + 2 * w : 2] += x @ kernel[a, b].T
    return full[:, 1 : 1 + 2 * h, 1 : 1 + 2 * w]


def test_fcn8s_equals_numpy_skip_fusion():
    """FCN-8s on a 72x56 input (C3 9x7, C4 5x4, C5 3x2: crops on both axes) recomputed in
    numpy from the backbone features and the model's weights: score = 1x1 conv, up = stride-2
    transposed conv, crop to the skip, sum, and a half-pixel bilinear resize to the image."""
    model = _randomize_fcn_skips(FCN((72, 56, 3), 3, variant="8s", backbone="resnet18"))
    feats = keras.Model(model.input, [model.get_layer(c).output for c in ("C3", "C4", "C5")])
    x = np.random.default_rng(1).standard_normal((1, 72, 56, 3)).astype("float32")
    c3, c4, c5 = (keras.ops.convert_to_numpy(t).astype("float64") for t in feats(x))

    def score(name, c):
        kernel, bias = model.get_layer(name).get_weights()
        return c @ kernel[0, 0] + bias

    fused = score("score_c5", c5)
    for level, c in (("c4", c4), ("c3", c3)):
        up = _transposed_conv_2x(fused, model.get_layer(f"upsample_to_{level}").get_weights()[0])
        skip = score(f"score_{level}", c)
        fused = up[:, : skip.shape[1], : skip.shape[2]] + skip
    expected = np.stack([_bilinear_reference(fused[0, :, :, k], 72, 56) for k in range(3)], axis=-1)
    got = keras.ops.convert_to_numpy(model(x, training=False))[0]
    np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, np.max(np.abs(expected))))


def test_bilinear_initialization_is_bilinear_upsampling():
    """The 4x4 stride-2 transposed conv initialised by BilinearUpsampling equals a half-pixel
    bilinear 2x resize away from the one-cell border (where it sees zero padding), per channel."""
    taps = np.array([0.25, 0.75, 0.75, 0.25])
    kernel = bilinear_upsampling_kernel(4, 2)
    np.testing.assert_allclose(kernel[:, :, 1, 1], np.outer(taps, taps))
    assert not kernel[:, :, 0, 1].any()  # channel c feeds channel c only
    x = np.random.default_rng(2).standard_normal((1, 6, 7, 2)).astype("float32")
    up = keras.layers.Conv2DTranspose(
        2, 4, strides=2, padding="same", use_bias=False, kernel_initializer=BilinearUpsampling()
    )
    got = keras.ops.convert_to_numpy(up(x))
    resized = keras.ops.convert_to_numpy(ResizeLike()([x, got]))
    assert got.shape == (1, 12, 14, 2)
    np.testing.assert_allclose(got[:, 1:-1, 1:-1], resized[:, 1:-1, 1:-1], atol=1e-6)
    assert np.max(np.abs(got[:, 0] - resized[:, 0])) > 0.01  # the border differs indeed
    with pytest.raises(ValueError, match="square with as many output as input channels"):
        BilinearUpsampling()((4, 4, 2, 3))


def test_fcn_variants_parameter_counts_by_hand():
    """ResNet-18, 3 classes. 16s adds the 4x4 up-conv (4*4*3*3 = 144, no bias) and score_c4
    (256*3 + 3 = 771): 915; 8s adds another up-conv and score_c3 (128*3 + 3 = 387): 531.
    32s is the backbone plus score_c5 (512*3 + 3)."""
    counts = {
        v: FCN((None, None, 3), 3, variant=v, backbone="resnet18").count_params()
        for v in ("32s", "16s", "8s")
    }
    backbone = ResNet18(include_top=False, input_shape=(None, None, 3)).count_params()
    assert counts["32s"] == backbone + 512 * 3 + 3
    assert counts["16s"] - counts["32s"] == 915
    assert counts["8s"] - counts["16s"] == 531


def test_fcn_dynamic_size_and_crop():
    model = FCN((None, None, 3), 2, variant="8s", backbone="resnet18")
    for h, w in [(40, 40), (100, 36)]:
        assert model(np.zeros((1, h, w, 3), "float32")).shape == (1, h, w, 2)
    assert model.name == "fcn8s"
    x = np.arange(2 * 5 * 6 * 1, dtype="float32").reshape(2, 5, 6, 1)
    cropped = keras.ops.convert_to_numpy(CropLike()([x, np.zeros((2, 4, 3, 7), "float32")]))
    np.testing.assert_array_equal(cropped, x[:, :4, :3])


# -- adaptive average pooling ------------------------------------------------------------------
def _adaptive_pool_reference(x, bh, bw):
    """PyTorch AdaptiveAvgPool2d in numpy: cell (i, j) averages rows
    [floor(i*H/bh), ceil((i+1)*H/bh)) and columns likewise."""
    n, h, w, c = x.shape
    out = np.zeros((n, bh, bw, c))
    for i in range(bh):
        r0, r1 = int(np.floor(i * h / bh)), int(np.ceil((i + 1) * h / bh))
        for j in range(bw):
            c0, c1 = int(np.floor(j * w / bw)), int(np.ceil((j + 1) * w / bw))
            out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return out


CASES = [
    ((7, 10), (1, 1)),
    ((7, 10), (2, 2)),
    ((7, 10), (3, 6)),
    ((12, 12), (3, 3)),
    ((12, 9), (6, 3)),
    ((4, 5), (6, 6)),
    ((13, 1), (2, 1)),
]


@pytest.mark.parametrize("size, bins", CASES)
def test_adaptive_pooling_equals_numpy_reference(size, bins):
    """Static sizes (average-pool path when divisible, matrix path otherwise) and the same layer
    in a model with None spatial dims (matrix path from the runtime size)."""
    x = np.random.default_rng(3).standard_normal((2, *size, 3)).astype("float32")
    expected = _adaptive_pool_reference(x.astype("float64"), *bins)
    static = keras.ops.convert_to_numpy(AdaptiveAveragePooling2D(bins)(x))
    np.testing.assert_allclose(static, expected, atol=1e-5)
    inputs = keras.Input((None, None, 3))
    dynamic = keras.Model(inputs, AdaptiveAveragePooling2D(bins)(inputs))
    np.testing.assert_allclose(dynamic.predict(x, verbose=0), expected, atol=1e-5)
    assert adaptive_pool_edges(size[0], bins[0])[-1][1] == size[0]


def test_adaptive_pooling_onnx_with_dynamic_size_equals_numpy():
    inputs = keras.Input((None, None, 2), name="image")
    outputs = [AdaptiveAveragePooling2D(b, name=f"pool{b}")(inputs) for b in (1, 2, 3, 6)]
    model = keras.Model(inputs, outputs)
    with tempfile.TemporaryDirectory() as tmp:
        path = export.to_onnx(model, os.path.join(tmp, "pool.onnx"))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for h, w in [(7, 10), (12, 12), (4, 5), (33, 17)]:
            x = np.random.default_rng(h).standard_normal((2, h, w, 2)).astype("float32")
            for b, got in zip((1, 2, 3, 6), session.run(None, {"image": x}), strict=True):
                np.testing.assert_allclose(got, _adaptive_pool_reference(x, b, b), atol=1e-5)


@pytest.mark.parametrize("size", [(8, 8), (7, 10)])
def test_adaptive_pooling_harness(size):
    run_layer_test(
        AdaptiveAveragePooling2D,
        {"output_size": (2, 3)},
        (2, *size, 4),
        (2, 2, 3, 4),
        train_step=False,  # no weights
    )


# -- PSPNet ------------------------------------------------------------------------------------
def test_pspnet_harness():
    """56x56 at output stride 8: C5 is 7x7, so bins 2, 3 and 6 take the averaging-matrix path
    (7 is divisible by none of them) and bin 1 average pooling, all through ONNX parity."""
    run_model_test(
        lambda: PSPNet((56, 56, 3), 3, backbone="resnet18", head_filters=16),
        (1, 56, 56, 3),
        (1, 56, 56, 3),
        saved_model=False,  # SavedModel of these layers is covered by the DeepLab tests
    )


def test_pspnet_dynamic_size():
    """None spatial dims: the pyramid pools C5 from its runtime size (matrix path) and the
    output has the input's size, also for sizes whose C5 is not divisible by the bins."""
    model = PSPNet((None, None, 3), 2, backbone="resnet18", head_filters=8)
    for h, w in [(48, 48), (60, 44)]:
        assert model(np.zeros((1, h, w, 3), "float32")).shape == (1, h, w, 2)


def test_pyramid_pooling_module_equals_numpy():
    """The concatenated pyramid [C5, level_1, level_2, level_3, level_6] recomputed in numpy
    from C5 and the model's weights (random BatchNorm statistics): adaptive average pooling
    (PyTorch bin edges), 1x1 conv + BatchNorm (inference) + ReLU, half-pixel bilinear resize to
    C5's size. The model has None spatial dims, so every level pools with matrices built from
    the runtime size; the 60x44 input gives an 8x6 C5, whose rows bins 3 and 6 do not divide.
    """
    from tests.helpers import randomize_norm_statistics

    model = PSPNet((None, None, 3), 2, backbone="resnet18", head_filters=8)
    randomize_norm_statistics(model)
    probe = keras.Model(
        model.input, [model.get_layer("C5").output, model.get_layer("ppm_concat").output]
    )
    x = np.random.default_rng(4).standard_normal((1, 60, 44, 3)).astype("float32")
    c5, got = (keras.ops.convert_to_numpy(t).astype("float64") for t in probe(x, training=False))
    assert c5.shape[1:3] == (8, 6)
    levels = [c5]
    for b in (1, 2, 3, 6):
        unit = model.get_layer(f"ppm_conv{b}")
        (kernel,) = unit.conv.get_weights()
        gamma, beta, mean, var = unit.norm_layer.get_weights()
        pooled = _adaptive_pool_reference(c5, b, b) @ kernel[0, 0]
        pooled = np.maximum((pooled - mean) / np.sqrt(var + 1e-5) * gamma + beta, 0.0)
        up = np.stack(
            [_bilinear_reference(pooled[0, :, :, k], 8, 6) for k in range(pooled.shape[-1])],
            axis=-1,
        )
        levels.append(up[None])
    expected = np.concatenate(levels, axis=-1)
    np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, np.max(np.abs(expected))))


def test_pspnet_parameter_count_by_hand():
    """ResNet-18 C5 has 512 channels; 4 bins -> 128 channels per level. Per level: 1x1 conv
    512*128 + BN 4*128; head: 3x3 conv over 512 + 4*128 = 1024 channels to 16 + BN 4*16;
    classifier 16*3 + 3."""
    model = PSPNet((None, None, 3), 3, backbone="resnet18", head_filters=16)
    backbone = ResNet18(include_top=False, input_shape=(None, None, 3)).count_params()
    head = 4 * (512 * 128 + 4 * 128) + (9 * 1024 * 16 + 4 * 16) + (16 * 3 + 3)
    assert model.count_params() == backbone + head
    assert model.get_layer("ppm_concat").output.shape[-1] == 1024


def test_registry_entries():
    for name, builder, author in [("fcn", FCN, "Long"), ("pspnet", PSPNet, "Zhao")]:
        entry = registry.entry(name)
        assert entry.builder is builder and entry.task == "segmentation"
        assert author in entry.paper


@pytest.mark.parametrize(
    "builder, kwargs, message",
    [
        (FCN, {"variant": "4s"}, r"FCN: `variant`='4s' is not supported.*'32s', '16s', '8s'"),
        (
            FCN,
            {"input_shape": (16, 64, 3)},
            r"FCN: `input_shape`=\(16, 64, 3\) has height 16, "
            r"below the minimum 32",
        ),
        (FCN, {"backbone": "vgg16"}, r"FCN: `backbone`='vgg16' is not a known backbone"),
        (PSPNet, {"output_stride": 4}, r"PSPNet: `output_stride`=4 is not supported.*8, 16, 32"),
        (PSPNet, {"bins": ()}, r"PSPNet: `bins` must be a non-empty sequence of distinct"),
        (PSPNet, {"bins": (2, 2)}, r"PSPNet: `bins` must be a non-empty sequence of distinct"),
        (PSPNet, {"bins": (1, 0)}, r"PSPNet: `bins` must be a positive integer"),
        (
            PSPNet,
            {"input_shape": (40, 48, 3)},
            r"PSPNet: `input_shape`=\(40, 48, 3\) has height "
            r"40, below the minimum 48 \(max\(2, largest bin 6\) x output_stride 8",
        ),
        (PSPNet, {"backbone": "vgg16"}, r"PSPNet: `backbone`='vgg16' is not a known backbone"),
        (PSPNet, {"dropout": 1.5}, r"PSPNet: `dropout` must be a rate in \[0, 1\), got 1.5"),
        (PSPNet, {"dropout": "0.1x"}, r"PSPNet: `dropout` must be a rate in \[0, 1\), got '0.1x'"),
        (PSPNet, {"dropout": None}, r"PSPNet: `dropout` must be a rate in \[0, 1\), got None"),
        (PSPNet, {"dropout": True}, r"PSPNet: `dropout` must be a rate in \[0, 1\), got True"),
        (PSPNet, {"multigrid": (2,)}, r"PSPNet: `multigrid`=\(2,\) must hold one positive int"),
    ],
)
def test_argument_errors(builder, kwargs, message):
    from dlmodels.errors import UserError

    args = {"input_shape": (64, 64, 3), "num_classes": 3, "backbone": "resnet18", **kwargs}
    with pytest.raises(UserError, match=message):
        builder(**args)

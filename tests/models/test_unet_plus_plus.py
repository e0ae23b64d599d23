"""UNet++ (Zhou et al. 2018): nested dense skips, deep supervision, pruning to L^k, backbones."""

import keras
import numpy as np
import pytest

import dlmodels
from dlmodels.models import output_kind
from dlmodels.models.unet_plus_plus import UNetPlusPlus, prune
from tests.helpers import randomize_norm_statistics, run_model_test


def conv(k, cin, cout, bias):
    return k * k * cin * cout + (cout if bias else 0)


def block(cin, cout, norm):
    """Two 3x3 convs; with batch norm no conv bias and 4 * cout norm variables each."""
    if norm:
        return conv(3, cin, cout, False) + 4 * cout + conv(3, cout, cout, False) + 4 * cout
    return conv(3, cin, cout, True) + conv(3, cout, cout, True)


def hand_count(k, filters, channels, classes, heads, norm=True):
    """Parameters of UNet++ L^k from the node equations of the paper's section 2: encoder nodes
    X^{i,0}; X^{i,j} = H(concat(X^{i,0..j-1}, up(X^{i+1,j-1}))) with a 2x2 transposed conv
    (with bias) from the filters of level i + 1 to those of level i and (j + 1) * f_i input
    channels of H; `heads` 1x1 convs (with bias) on X^{0,*}."""
    total = sum(
        block(channels if i == 0 else filters[i - 1], filters[i], norm) for i in range(k + 1)
    )
    for j in range(1, k + 1):
        for i in range(k - j + 1):
            total += conv(2, filters[i + 1], filters[i], True)
            total += block((j + 1) * filters[i], filters[i], norm)
    return total + heads * conv(1, filters[0], classes, True)


def _x(shape=(2, 32, 32, 3), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


@pytest.mark.parametrize("deep_supervision, upsampling", [(False, "transpose"), (True, "bilinear")])
def test_unet_plus_plus_harness(deep_supervision, upsampling):
    shape = (2, 32, 32, 4)
    run_model_test(
        lambda: UNetPlusPlus(
            (32, 32, 3),
            4,
            depth=2,
            base_filters=4,
            upsampling=upsampling,
            deep_supervision=deep_supervision,
        ),
        (2, 32, 32, 3),
        [shape, shape] if deep_supervision else shape,
    )


def test_unet_plus_plus_resnet18_backbone_harness():
    model = run_model_test(
        lambda: UNetPlusPlus((64, 64, 3), 2, depth=4, base_filters=4, backbone="resnet18"),
        (2, 64, 64, 3),
        (2, 64, 64, 2),
    )
    # X^{i,0} are the ResNet's C1..C5 taps; the head (on X^{0,4}, stride 2) is upsampled by 2
    sources = _concat_sources(model, "x0_1_concat")
    assert sources == ["C1", "x0_1_up"]
    assert _concat_sources(model, "x3_1_concat") == ["C4", "x3_1_up"]
    assert model.get_layer("x3_1_up").input.shape[1:3] == (2, 2)  # C5 of a 64x64 input
    assert model.get_layer("head4_upsample").size == (2, 2)


def _concat_sources(model, name):
    layer = model.get_layer(name)
    return [t._keras_history[0].name for t in layer._inbound_nodes[0].input_tensors]


def test_nested_dense_skip_wiring():
    """X^{i,j} concatenates X^{i,0}, ..., X^{i,j-1} and up(X^{i+1,j-1}): j + 1 inputs."""
    depth, f = 3, (4, 8, 16, 32)
    model = UNetPlusPlus((32, 32, 3), 2, depth=depth, filters=f, deep_supervision=True)
    concats = [layer.name for layer in model.layers if layer.name.endswith("_concat")]
    assert len(concats) == depth * (depth + 1) // 2  # nodes with j >= 1 and i + j <= depth
    for j in range(1, depth + 1):
        for i in range(depth - j + 1):
            name = f"x{i}_{j}_concat"
            want = [f"x{i}_{k}_conv2" for k in range(j)] + [f"x{i}_{j}_up"]
            assert _concat_sources(model, name) == want, name
            up = model.get_layer(f"x{i}_{j}_up")
            assert up.input is model.get_layer(f"x{i + 1}_{j - 1}_conv2").output
            assert model.get_layer(name).output.shape[-1] == (j + 1) * f[i]
    # the main head X^{0,depth} first (what `outputs[0]` readers get), then heads 1..depth-1
    assert model.output_names == ["logits", "logits_1", "logits_2"]
    for j in (1, 2, 3):
        assert model.get_layer(f"head{j}_conv").input is model.get_layer(f"x0_{j}_conv2").output
    heads = [t._keras_history[0].input._keras_history[0].name for t in model.outputs]
    assert heads == ["head3_conv", "head1_conv", "head2_conv"]


@pytest.mark.parametrize("k", [1, 2])
def test_pruning_matches_full_model_head_and_hand_count(k):
    depth, f = 3, (4, 8, 16, 32)
    full = UNetPlusPlus((32, 32, 3), 3, depth=depth, filters=f, deep_supervision=True)
    randomize_norm_statistics(full)
    x = _x()
    outs = [np.asarray(o) for o in full(x, training=False)]
    full_out = dict(zip(full.output_names, outs, strict=True))
    assert list(full_out) == ["logits", "logits_1", "logits_2"]

    pruned = prune(full, k)
    assert pruned.output_names == ["logits"]
    np.testing.assert_allclose(pruned(x, training=False), full_out[f"logits_{k}"], atol=1e-6)
    # pruning to the deepest head gives the main output, the full model's first
    np.testing.assert_allclose(prune(full, depth)(x, training=False), full_out["logits"], atol=1e-6)

    # L^k keeps the nodes with i + j <= k only
    nodes = {
        tuple(int(v) for v in layer.name[1:-6].split("_"))
        for layer in pruned.layers
        if layer.name.startswith("x") and layer.name.endswith("_conv1")
    }
    assert nodes == {(i, j) for i in range(k + 1) for j in range(k + 1 - i)}

    full_count = hand_count(depth, f, 3, 3, heads=depth)
    assert full.count_params() == full_count == 35_445
    assert pruned.count_params() == hand_count(k, f, 3, 3, heads=1) < full_count
    assert pruned.count_params() == {1: 1_823, 2: 8_459}[k]

    # built directly as L^k, with the full model's weights loaded by layer name
    direct = UNetPlusPlus((32, 32, 3), 3, depth=depth, filters=f, head=k)
    assert direct.count_params() == pruned.count_params()
    for layer in direct.layers:
        if layer.weights:
            layer.set_weights(full.get_layer(layer.name).get_weights())
    np.testing.assert_allclose(direct(x, training=False), full_out[f"logits_{k}"], atol=1e-6)


def test_paper_parameter_count():
    """The paper's Table 1: UNet++ (filters 32..512, no norm, deep supervision) has 9.04 M
    parameters (one input channel, one class)."""
    model = UNetPlusPlus((None, None, 1), 1, norm=None, deep_supervision=True)
    count = hand_count(4, (32, 64, 128, 256, 512), 1, 1, heads=4, norm=False)
    assert model.count_params() == count == 9_041_700
    assert round(count / 1e6, 2) == 9.04


def test_output_kind_of_every_head_and_of_the_pruned_model():
    model = UNetPlusPlus(
        (32, 32, 3), 3, depth=2, base_filters=4, deep_supervision=True, final_activation="softmax"
    )
    assert output_kind(model) == ["softmax", "softmax"]
    assert [model.get_layer(n).dtype_policy.compute_dtype for n in model.output_names] == [
        "float32",
        "float32",
    ]
    pruned = prune(model, 1)
    assert output_kind(pruned) == "softmax"
    probs = np.asarray(pruned(_x()))
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    assert output_kind(UNetPlusPlus((32, 32, 3), 3, depth=2, base_filters=4)) == "logits"


def test_any_input_size_and_registry():
    assert "unet_plus_plus" in dlmodels.models.list()
    assert "UNet++" in dlmodels.models.entry("unet_plus_plus").paper
    model = dlmodels.models.get(
        "unet_plus_plus", input_shape=(None, None, 3), num_classes=2, depth=2, base_filters=4
    )
    for size in (16, 40):
        assert model(np.zeros((1, size, size, 3), "float32")).shape == (1, size, size, 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"input_shape": (30, 32, 3)},
            r"`input_shape`=\(30, 32, 3\).*height 30.*4.*pad to 28 or 32",
        ),
        (
            {"input_shape": (48, 64, 3), "backbone": "resnet18"},
            r"`input_shape`=\(48, 64, 3\).*height 48.*multiple of 32.*32 or 64",
        ),
        ({"input_shape": (32, 32)}, r"`input_shape` must be \(height, width, channels\)"),
        ({"head": 3}, r"`head`=3.*1\.\.2"),
        ({"head": 1, "deep_supervision": True}, r"`head`=1.*deep_supervision"),
        ({"filters": (4, 8)}, r"`filters`=\(4, 8\).*3 for `depth`=2"),
        ({"depth": 5, "input_shape": (64, 64, 3), "backbone": "resnet18"}, r"`depth`=5.*1\.\.4"),
        ({"backbone": "vgg16", "input_shape": (64, 64, 3)}, r"`backbone`='vgg16'.*resnet18"),
        ({"backbone_kwargs": {"norm": None}}, r"`backbone_kwargs`.*without a `backbone`"),
        ({"upsampling": "nearest"}, r"`upsampling`='nearest'"),
        ({"dropout": 1.0}, r"`dropout` must be a rate in \[0, 1\), got 1\.0"),
        ({"base_filters": 0}, r"`base_filters`.*positive.*0"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs = {"input_shape": (32, 32, 3), "num_classes": 2, "depth": 2, "base_filters": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        UNetPlusPlus(**kwargs)


def test_prune_errors():
    plain = UNetPlusPlus((32, 32, 3), 2, depth=2, base_filters=4)
    with pytest.raises(ValueError, match=r"`head`=1.*heads are \[2\].*deep_supervision=True"):
        prune(plain, 1)
    assert prune(plain, 2).count_params() == plain.count_params()
    with pytest.raises(ValueError, match=r"not a UNetPlusPlus"):
        prune(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]), 1)


def test_kernel_initializer_reaches_every_head():
    model = UNetPlusPlus(
        (32, 32, 3), 2, depth=2, base_filters=2, deep_supervision=True, kernel_initializer="ones"
    )
    for name in ("head1_conv", "head2_conv"):
        kernel = np.asarray(model.get_layer(name).kernel)
        np.testing.assert_array_equal(kernel, np.ones(kernel.shape), err_msg=name)

"""Segmentation losses (cross-entropy, Dice, focal, weighted sums) and confusion-matrix metrics
against float64 numpy references written from the papers' equations with explicit loops; label
range errors as the user sees them, eagerly and inside tf.function."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from dlmodels import losses, metrics
from dlmodels.training import resolve_strategy

VOID = 255
TOL = {"rtol": 1e-6, "atol": 1e-6}
# (labels shape, classes): a classifier, 2-D segmentation, a volume. Ignore indices: none, a void
# label outside the classes (255) and one inside them (0), which only a mask can remove.
SHAPES = [((5,), 3), ((2, 5, 6), 4), ((2, 3, 4, 5), 3)]


def _data(shape, c, void=None, seed=0):
    """Random labels (about 30% void when `void` is set, every example keeping valid ones) and
    float32 logits scaled so that some probabilities are close to 0 and 1."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, shape)
    if void is not None:
        drop = rng.uniform(size=shape) < 0.3
        drop.reshape(shape[0], -1)[:, 0] = False
        labels[drop] = void
    logits = (rng.standard_normal((*shape, c)) * 2).astype("float32")
    return labels, logits


def _softmax64(logits):
    x = np.asarray(logits, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _examples(labels, probs, ignore):
    """Per example: (kept labels (N,), kept probabilities (N, C)), explicit flattening."""
    c = probs.shape[-1]
    for lab, p in zip(labels, probs, strict=True):
        lab, p = np.reshape(lab, -1), np.reshape(p, (-1, c))
        keep = lab != ignore if ignore is not None else np.ones(lab.shape, bool)
        yield lab[keep], p[keep]


def np_cross_entropy(labels, probs, ignore=None, weights=None):
    out = []
    for lab, p in _examples(labels, probs, ignore):
        w = np.ones(len(lab)) if weights is None else np.asarray(weights, np.float64)[lab]
        ce = np.array([-np.log(p[i, lab[i]]) for i in range(len(lab))])
        out.append((w * ce).sum() / w.sum() if len(lab) else 0.0)
    return np.array(out)


def np_dice(labels, probs, ignore=None, smooth=1.0):
    """V-Net eq. 1 with smoothing, one class at a time, mean over all classes."""
    out = []
    for lab, p in _examples(labels, probs, ignore):
        scores = []
        for c in range(probs.shape[-1]):
            t = (lab == c).astype(np.float64)
            denom = p[:, c].sum() + t.sum() + smooth
            scores.append((2 * (p[:, c] * t).sum() + smooth) / denom if denom > 0 else 1.0)
        out.append(1.0 - np.mean(scores))
    return np.array(out)


def np_focal(labels, probs, ignore=None, gamma=2.0, alpha=None):
    """Lin et al. 2017 eq. 5, softmax form, mean over the kept pixels."""
    out = []
    for lab, p in _examples(labels, probs, ignore):
        values = []
        for i in range(len(lab)):
            pt = p[i, lab[i]]
            a = 1.0 if alpha is None else (alpha if np.isscalar(alpha) else alpha[lab[i]])
            values.append(-a * (1 - pt) ** gamma * np.log(pt))
        out.append(np.mean(values) if values else 0.0)
    return np.array(out)


def np_scores(labels, pred, c, ignore=None, weight=None):
    """(per-class IoU with NaN when absent, mean IoU, mean Dice, pixel accuracy) by counting
    boolean masks, without a confusion matrix."""
    labels, pred = np.reshape(labels, -1), np.reshape(pred, -1)
    weight = np.ones(labels.shape) if weight is None else np.reshape(weight, -1).astype(float)
    keep = (labels != ignore) if ignore is not None else np.ones(labels.shape, bool)
    iou, dice = [], []
    for k in range(c):
        tp = (weight * ((labels == k) & (pred == k) & keep)).sum()
        fp = (weight * ((labels != k) & (pred == k) & keep)).sum()
        fn = (weight * ((labels == k) & (pred != k) & keep)).sum()
        iou.append(tp / (tp + fp + fn) if tp + fp + fn > 0 else np.nan)
        dice.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else np.nan)
    accuracy = (weight * ((labels == pred) & keep)).sum() / (weight * keep).sum()
    iou, dice = np.array(iou), np.array(dice)
    return iou, np.nanmean(iou), np.nanmean(dice), accuracy


def _grid(shapes, ignores, options):
    """Run the test body for every (shape, ignore, option) combination inside one test (one
    Keras session set-up instead of one per case); a failure names its case."""

    def decorate(body):
        def test():
            for (shape, c), ignore, option in itertools.product(shapes, ignores, options):
                try:
                    body(shape, c, ignore, option)
                except AssertionError as error:
                    raise AssertionError(
                        f"case shape={shape} ignore={ignore} {option!r}"
                    ) from error

        test.__name__, test.__doc__ = body.__name__, body.__doc__
        return test

    return decorate


# -- cross-entropy ---------------------------------------------------------------------------
@_grid(SHAPES, [None, VOID, 0], [False, True])
def test_cross_entropy_matches_numpy(shape, c, ignore, weighted):
    labels, logits = _data(shape, c, ignore, seed=len(shape))
    weights = [0.5, 2.0, 1.0, 3.0][:c] if weighted else None
    expected = np_cross_entropy(labels, _softmax64(logits), ignore, weights)
    loss = losses.SparseCrossEntropy(ignore_index=ignore, class_weights=weights, reduction=None)
    np.testing.assert_allclose(loss(labels, logits), expected, **TOL)
    probs = _softmax64(logits).astype("float32")
    from_probs = losses.SparseCrossEntropy(
        from_logits=False, ignore_index=ignore, class_weights=weights, reduction=None
    )
    np.testing.assert_allclose(from_probs(labels, probs), expected, rtol=1e-5, atol=1e-6)


def test_class_weighted_mean_is_normalized_by_the_weight_sum():
    # One example, two pixels of classes 0 and 1, weights 1 and 3: PyTorch's weighted mean is
    # (ce0 + 3 ce1) / (1 + 3), not / 2 pixels.
    logits = np.array([[[2.0, 0.0], [0.5, -0.5]]], "float32")
    labels = np.array([[0, 1]])
    p = _softmax64(logits)[0]
    ce0, ce1 = -np.log(p[0, 0]), -np.log(p[1, 1])
    loss = losses.SparseCrossEntropy(class_weights=[1.0, 3.0], reduction=None)
    assert float(loss(labels, logits)[0]) == pytest.approx((ce0 + 3 * ce1) / 4, rel=1e-6)
    assert abs((ce0 + 3 * ce1) / 2 - (ce0 + 3 * ce1) / 4) > 0.1
    scaled = losses.SparseCrossEntropy(class_weights=[10.0, 30.0], reduction=None)
    np.testing.assert_allclose(scaled(labels, logits), loss(labels, logits), rtol=1e-6)
    with pytest.raises(ValueError, match="class_weights` has 3 entries but `y_pred` has 2"):
        losses.SparseCrossEntropy(class_weights=[1.0, 2.0, 3.0])(labels, logits)


# -- Dice ------------------------------------------------------------------------------------
@_grid(SHAPES[1:], [None, VOID, 0], [1.0, 1e-3])
def test_dice_matches_numpy(shape, c, ignore, smooth):
    labels, logits = _data(shape, c, ignore, seed=7)
    probs64 = _softmax64(logits)
    expected = np_dice(labels, probs64, ignore, smooth)
    loss = losses.DiceLoss(from_logits=True, smooth=smooth, ignore_index=ignore, reduction=None)
    np.testing.assert_allclose(loss(labels, logits), expected, **TOL)
    from_probs = losses.DiceLoss(
        from_logits=False, smooth=smooth, ignore_index=ignore, reduction=None
    )
    np.testing.assert_allclose(from_probs(labels, probs64.astype("float32")), expected, **TOL)


def test_dice_smooth_zero_counts_an_empty_class_as_one():
    # Class 2 appears in neither labels nor (one-hot) predictions: 0/0 -> dice 1, not NaN.
    labels = np.array([[0, 1, 1, VOID]])
    probs = np.eye(3, dtype="float32")[[[0, 1, 0, 2]]]
    loss = losses.DiceLoss(from_logits=False, smooth=0.0, ignore_index=VOID, reduction=None)
    # class 0: 2*1/(2+1); class 1: 2*1/(1+2); class 2 (only at the void pixel, removed): 1.
    expected = 1 - np.mean([2 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(loss(labels, probs), [expected], **TOL)
    np.testing.assert_allclose(np_dice(labels, probs, VOID, 0.0), [expected], **TOL)


# -- focal -----------------------------------------------------------------------------------
@_grid(SHAPES, [None, VOID, 0], [(2.0, None), (2.0, 0.25), (0.5, "per_class")])
def test_focal_matches_numpy(shape, c, ignore, gamma_alpha):
    gamma, alpha = gamma_alpha
    labels, logits = _data(shape, c, ignore, seed=11)
    if alpha == "per_class":
        alpha = [0.25, 0.5, 1.0, 2.0][:c]
    expected = np_focal(labels, _softmax64(logits), ignore, gamma, alpha)
    loss = losses.FocalLoss(gamma=gamma, alpha=alpha, ignore_index=ignore, reduction=None)
    np.testing.assert_allclose(loss(labels, logits), expected, **TOL)
    from_probs = losses.FocalLoss(
        from_logits=False, gamma=gamma, alpha=alpha, ignore_index=ignore, reduction=None
    )
    probs = _softmax64(logits).astype("float32")
    np.testing.assert_allclose(from_probs(labels, probs), expected, rtol=1e-5, atol=1e-6)


def test_focal_reduces_to_cross_entropy_and_agrees_with_keras():
    labels, logits = _data((2, 5, 6), 4, seed=3)
    ce = losses.SparseCrossEntropy(reduction=None)(labels, logits)
    np.testing.assert_allclose(losses.FocalLoss(gamma=0.0, reduction=None)(labels, logits), ce)
    keras_focal = keras.losses.CategoricalFocalCrossentropy(
        alpha=0.25, gamma=2.0, from_logits=True, reduction=None
    )(np.eye(4)[labels], logits)
    ours = losses.FocalLoss(alpha=0.25, reduction=None)(labels, logits)
    np.testing.assert_allclose(ours, np.mean(keras_focal, axis=(1, 2)), rtol=1e-5)
    # Focusing shrinks the loss of well-classified pixels: FL <= CE everywhere.
    assert np.all(np.asarray(losses.FocalLoss(reduction=None)(labels, logits)) < np.asarray(ce))


# -- weighted sums ---------------------------------------------------------------------------
def test_combined_loss_is_the_weighted_sum_per_example():
    labels, logits = _data((3, 5, 6), 4, VOID, seed=5)
    probs = _softmax64(logits)
    weights = [1.0, 2.0, 0.5, 1.0]
    combined = losses.CombinedLoss(
        [
            (losses.FocalLoss(alpha=weights), 0.7),
            (losses.DiceLoss(from_logits=True), 0.3),
            (losses.SparseCrossEntropy(class_weights=weights), 0.5),
        ],
        ignore_index=VOID,
        reduction=None,
    )
    expected = (
        0.7 * np_focal(labels, probs, VOID, 2.0, weights)
        + 0.3 * np_dice(labels, probs, VOID)
        + 0.5 * np_cross_entropy(labels, probs, VOID, weights)
    )
    got = combined(labels, logits)
    assert got.shape == (3,)
    np.testing.assert_allclose(got, expected, **TOL)
    # Terms that disagree on from_logits read the same y_pred differently: refused.
    with pytest.raises(ValueError, match="from_logits"):
        losses.CombinedLoss([(losses.DiceLoss(from_logits=False), 1.0), ("ce", 1.0)])
    # by name every term follows the library's logits convention, "dice" included
    assert losses.CombinedLoss([("dice", 1.0), ("ce", 1.0)]).from_logits is True
    mean = losses.CombinedLoss(combined.get_config()["losses"], ignore_index=VOID)
    assert float(mean(labels, logits)) == pytest.approx(expected.mean(), rel=1e-6)


def test_combined_loss_takes_keras_terms_per_example():
    labels, logits = _data((2, 4, 4), 3, seed=2)
    keras_ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    combined = losses.CombinedLoss([(keras_ce, 2.0), (losses.FocalLoss(), 1.0)], reduction=None)
    assert combined.from_logits is True and combined.ignore_index is None
    probs = _softmax64(logits)
    expected = 2.0 * np_cross_entropy(labels, probs) + np_focal(labels, probs)
    np.testing.assert_allclose(combined(labels, logits), expected, **TOL)
    with pytest.raises(ValueError, match="SparseCategoricalCrossentropy has no `ignore_index`"):
        losses.CombinedLoss([(keras_ce, 1.0), (losses.FocalLoss(ignore_index=VOID), 1.0)])


def test_focal_dice_and_ignore_index_propagation():
    labels, logits = _data((2, 5, 6), 4, VOID, seed=9)
    probs = _softmax64(logits)
    loss = losses.get("focal_dice", gamma=1.5, focal_weight=2.0, dice_weight=0.5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="255"):
        loss(labels, logits)  # no ignore index yet: 255 is an out-of-range label
    # What the Trainer does with its ignore_index: rebuild from the config with it set.
    loss = type(loss).from_config({**loss.get_config(), "ignore_index": VOID, "reduction": None})
    assert [t.ignore_index for t, _ in loss.terms] == [VOID, VOID]
    expected = 2.0 * np_focal(labels, probs, VOID, 1.5) + 0.5 * np_dice(labels, probs, VOID)
    np.testing.assert_allclose(loss(labels, logits), expected, **TOL)
    with pytest.raises(ValueError, match=r"disagree on `ignore_index` \(\[0, 255\]\)"):
        losses.CombinedLoss(
            [(losses.FocalLoss(ignore_index=0), 1.0), ("ce", 1.0)], ignore_index=VOID
        )
    with pytest.raises(ValueError, match=r"losses\[1\] weight"):
        losses.CombinedLoss([("ce", 1.0), ("focal", -1.0)])
    with pytest.raises(ValueError, match="non-empty list"):
        losses.CombinedLoss([])


def test_every_loss_name_builds_serializes_and_round_trips():
    labels, logits = _data((2, 4, 5), 3, VOID, seed=4)
    assert set(losses.LOSSES) == {"ce", "dice", "dice_ce", "focal", "focal_dice"}
    for name in losses.LOSSES:
        loss = losses.get(name, from_logits=True, ignore_index=VOID)
        assert loss.from_logits is True and loss.ignore_index == VOID, name
        restored = keras.losses.deserialize(keras.losses.serialize(loss))
        assert type(restored) is type(loss) and restored.get_config() == loss.get_config(), name
        value = float(loss(labels, logits))
        assert np.isfinite(value) and value > 0, name
        assert float(restored(labels, logits)) == pytest.approx(value, rel=1e-6), name
    focal = losses.FocalLoss(gamma=1.0, alpha=[1.0, 2.0, 3.0], name="f")
    assert keras.saving.get_registered_name(losses.FocalLoss) == "dlmodels>FocalLoss"
    assert keras.saving.get_registered_name(losses.CombinedLoss) == "dlmodels>CombinedLoss"
    assert keras.losses.deserialize(keras.losses.serialize(focal)).get_config() == {
        **focal.get_config(),
        "alpha": [1.0, 2.0, 3.0],
        "gamma": 1.0,
    }
    assert losses.DiceLoss(smooth=np.float32(0.5)).smooth == 0.5  # numpy scalars are numbers
    with pytest.raises(ValueError, match="gamma"):
        losses.FocalLoss(gamma=-1)
    with pytest.raises(ValueError, match="alpha"):
        losses.FocalLoss(alpha=[-1.0, 1.0])


@pytest.mark.parametrize("name", ["focal", "focal_dice"])
def test_gradient_is_zero_exactly_at_void_pixels(name):
    labels, logits = _data((2, 5, 6), 4, VOID, seed=6)
    loss = losses.get(name, ignore_index=VOID)
    x = tf.constant(logits)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = loss(tf.constant(labels), x)
    grad = tape.gradient(value, x).numpy()
    void = labels == VOID
    assert np.all(grad[void] == 0.0)
    assert np.all(np.abs(grad[~void]).sum(-1) > 0)


def test_losses_accept_mixed_precision_logits():
    labels, logits = _data((2, 5, 6), 4, VOID, seed=8)
    for name in losses.LOSSES:
        loss = losses.get(name, ignore_index=VOID, from_logits=True)
        half = loss(labels, tf.constant(logits, tf.float16))
        assert half.dtype == tf.float32
        assert float(half) == pytest.approx(float(loss(labels, logits)), rel=2e-3), name


# -- metrics ---------------------------------------------------------------------------------
def _all_metrics(c, ignore):
    return [
        metrics.MeanIoU(c, ignore_index=ignore),
        metrics.DiceScore(c, ignore_index=ignore),
        metrics.PixelAccuracy(c, ignore_index=ignore),
        *metrics.per_class_iou(c, ignore_index=ignore),
    ]


def _check_against_numpy(ms, labels, pred, c, ignore, weight=None):
    iou, miou, dice, acc = np_scores(labels, pred, c, ignore, weight)
    mean_iou, dice_m, acc_m, *per_class = ms
    np.testing.assert_allclose(float(mean_iou.result()), miou, **TOL)
    np.testing.assert_allclose(np.asarray(mean_iou.result_per_class()), iou, **TOL)
    np.testing.assert_allclose(float(dice_m.result()), dice, **TOL)
    np.testing.assert_allclose(float(acc_m.result()), acc, **TOL)
    np.testing.assert_allclose([float(m.result()) for m in per_class], iou, **TOL)


@_grid(SHAPES, [None, VOID, 0], [False, True])
def test_metrics_match_numpy(shape, c, ignore, as_ids):
    labels, logits = _data(shape, c, ignore, seed=13)
    pred = logits.argmax(-1)
    labels.reshape(-1)[:2] = c - 1  # make sure the last class is present
    ms = _all_metrics(c, ignore)
    for m in ms:
        m.update_state(labels, pred if as_ids else logits)
    _check_against_numpy(ms, labels, pred, c, ignore)


def test_metrics_absent_class_sample_weight_and_names():
    labels = np.array([[0, 0, VOID, 1], [1, 1, VOID, 0]])
    pred = np.array([[0, 1, 2, 1], [1, 1, 0, 0]])
    weight = np.array([[1.0, 0.5, 1.0, 2.0], [1.0, 0.0, 3.0, 1.0]])
    ms = _all_metrics(4, VOID)
    for m in ms:
        m.update_state(labels, pred, sample_weight=weight)
    _check_against_numpy(ms, labels, pred, 4, VOID, weight)
    # Classes 2 and 3 never occur outside the void pixels: NaN per class, left out of the means.
    assert np.isnan(np.asarray(ms[0].result_per_class())[2:]).all()
    assert [m.name for m in ms] == [
        "mean_iou",
        "dice",
        "pixel_accuracy",
        "iou_0",
        "iou_1",
        "iou_2",
        "iou_3",
    ]
    named = metrics.per_class_iou(2, class_names=["background", "cat"])
    assert [m.name for m in named] == ["iou_background", "iou_cat"]
    # By hand, unweighted: class 0 tp 2 fp 0 fn 1, class 1 tp 3 fp 1 fn 0.
    dice = metrics.DiceScore(4, ignore_index=VOID)
    dice.update_state(labels, pred)
    assert float(dice.result()) == pytest.approx((4 / 5 + 6 / 7) / 2, rel=1e-6)
    accuracy = metrics.PixelAccuracy(4, ignore_index=VOID)
    accuracy.update_state(labels, pred)
    assert float(accuracy.result()) == pytest.approx(5 / 6, rel=1e-6)
    # keras' SparseCategoricalAccuracy counts the void pixels as misses.
    keras_acc = keras.metrics.SparseCategoricalAccuracy()
    keras_acc.update_state(labels, np.eye(4)[pred])
    assert float(keras_acc.result()) == pytest.approx(5 / 8)


def test_metrics_accumulate_across_update_calls():
    labels, logits = _data((6, 5, 4), 4, VOID, seed=21)
    once, streamed = _all_metrics(4, VOID), _all_metrics(4, VOID)
    for m in once:
        m.update_state(labels, logits)
    for part in (slice(0, 1), slice(1, 4), slice(4, 6)):
        for m in streamed:
            m.update_state(labels[part], logits[part])
    for a, b in zip(once, streamed, strict=True):
        np.testing.assert_array_equal(a.total_cm.numpy(), b.total_cm.numpy())
        assert float(a.result()) == float(b.result()), a.name
    _check_against_numpy(streamed, labels, logits.argmax(-1), 4, VOID)
    for m in streamed:
        m.reset_state()
        assert not m.total_cm.numpy().any()


def test_metrics_sum_over_replicas():
    strategy = resolve_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
    labels, logits = _data((4, 6, 6), 3, VOID, seed=17)
    with strategy.scope():
        ms = _all_metrics(3, VOID)
    assert all(m.total_cm.aggregation == "sum" for m in ms)
    ds = tf.data.Dataset.from_tensor_slices((labels, logits)).batch(4)

    @tf.function
    def step(batch):
        def update(y, p):
            for m in ms:
                m.update_state(y, p)

        strategy.run(update, args=batch)

    for batch in strategy.experimental_distribute_dataset(ds):
        step(batch)
    _check_against_numpy(ms, labels, logits.argmax(-1), 3, VOID)


def test_metrics_serialize_and_validate():
    for m in [*_all_metrics(3, VOID)[:3], metrics.ClassIoU(3, 2, accumulator_dtype="float32")]:
        clone = keras.metrics.deserialize(keras.metrics.serialize(m))
        assert type(clone) is type(m) and clone.get_config() == m.get_config()
    assert metrics.ClassIoU(3, 2).get_config()["class_id"] == 2
    with pytest.raises(ValueError, match=r"`class_id`=3 must be an int in \[0, num_classes=3\)"):
        metrics.ClassIoU(3, 3)
    with pytest.raises(ValueError, match="num_classes"):
        metrics.DiceScore(0)
    with pytest.raises(ValueError, match="class_names"):
        metrics.per_class_iou(3, class_names=["a"])
    with pytest.raises(ValueError, match=r"has 4 class scores .* num_classes=3"):
        metrics.PixelAccuracy(3).update_state(np.zeros((1, 2)), np.zeros((1, 2, 4)))


# -- labels out of range ---------------------------------------------------------------------
BAD_LABELS = np.array([[0, 300, 1, VOID], [-1, 2, 3, 0]])
LOSS_OWNERS = {
    "ce": "SparseCrossEntropy",
    "dice": "DiceLoss",
    "dice_ce": "DiceCrossEntropy",
    "focal": "FocalLoss",
    "focal_dice": "FocalLoss",
}


LABEL_CASES = [
    *(
        (name, owner, lambda name=name: losses.get(name, ignore_index=VOID))
        for name, owner in LOSS_OWNERS.items()
    ),
    *(
        (cls.__name__, cls.__name__, lambda cls=cls: cls(4, ignore_index=VOID).update_state)
        for cls in (metrics.MeanIoU, metrics.DiceScore, metrics.PixelAccuracy)
    ),
]


@pytest.mark.parametrize("name,owner,make", LABEL_CASES, ids=[c[0] for c in LABEL_CASES])
def test_out_of_range_labels_raise_a_clear_error(name, owner, make):
    scores = tf.zeros((2, 4, 4))
    expected_range = f"{owner}: labels must be class ids in [0, num_classes=4) or ignore_index=255"
    for mode, fn in (("eager", make()), ("tf.function", tf.function(make()))):
        with pytest.raises(tf.errors.InvalidArgumentError) as info:
            fn(tf.constant(BAD_LABELS), scores)
        message = info.value.message
        assert expected_range in message, mode
        if mode == "eager":
            assert "out-of-range values -1, 300 (2 positions)" in message
        else:  # count, smallest, largest
            assert "out-of-range values (count, smallest, largest):] [2] [-1] [300]" in message
        fn(tf.constant(np.where(BAD_LABELS == 300, 1, np.abs(BAD_LABELS))), scores)  # valid


def test_out_of_range_without_ignore_index_and_predicted_ids():
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"\(ignore_index=None\); found .* 255"
    ):
        losses.FocalLoss()(np.array([[0, VOID]]), np.zeros((1, 2, 3), "float32"))
    metric = metrics.MeanIoU(3)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"MeanIoU \(predicted class ids\)"):
        metric.update_state(np.array([0, 1]), np.array([0, 7]))
    assert float(metric.result()) == 0.0  # nothing was counted


# -- review findings: Dice default, label shapes, fractional labels, focal alpha ---------------
def test_dice_default_reads_logits_like_every_other_loss():
    labels, logits = _data((2, 5, 6), 4, seed=11)
    expected = np_dice(labels, _softmax64(logits))
    for loss in (losses.DiceLoss(reduction=None), losses.get("dice", reduction=None)):
        assert loss.from_logits is True
        np.testing.assert_allclose(loss(labels, logits), expected, **TOL)
    for name in losses.LOSSES:  # one convention for the whole library
        assert losses.get(name).from_logits is True, name
    # a perfect prediction given as (large) logits has no loss
    perfect = 50.0 * np.eye(4, dtype="float32")[labels]
    assert float(losses.DiceLoss()(labels, perfect)) == pytest.approx(0.0, abs=1e-6)


LABEL_AXIS_LOSSES = {
    "ce": lambda: losses.SparseCrossEntropy(ignore_index=VOID, reduction=None),
    "dice": lambda: losses.DiceLoss(ignore_index=VOID, reduction=None),
    "focal": lambda: losses.FocalLoss(ignore_index=VOID, reduction=None),
    "dice_ce": lambda: losses.DiceCrossEntropy(ignore_index=VOID, reduction=None),
    "focal_dice": lambda: losses.focal_dice(ignore_index=VOID, reduction=None),
}


@pytest.mark.parametrize("name", list(LABEL_AXIS_LOSSES))
def test_labels_with_a_trailing_unit_axis_give_the_same_loss(name):
    """Masks often come as (B, H, W, 1): every loss squeezes that axis, eagerly and in a graph,
    and gives exactly the loss of the (B, H, W) labels; one-hot labels are refused."""
    labels, logits = _data((2, 5, 6), 3, VOID, seed=12)
    loss = LABEL_AXIS_LOSSES[name]()
    expected = loss(labels, logits).numpy()
    np.testing.assert_allclose(loss(labels[..., None], logits), expected, **TOL)
    graph = tf.function(lambda y, p: loss(y, p))
    np.testing.assert_allclose(graph(labels[..., None], logits), expected, **TOL)
    with pytest.raises(ValueError, match=r"last axis is not 1.*not one-hot"):
        loss(np.eye(3)[np.where(labels == VOID, 0, labels)], logits)


def test_metrics_take_labels_with_a_trailing_unit_axis():
    labels, logits = _data((2, 5, 6), 3, VOID, seed=13)
    for make in (metrics.MeanIoU, metrics.PixelAccuracy):
        plain, squeezed = make(3, ignore_index=VOID), make(3, ignore_index=VOID)
        plain.update_state(labels, logits)
        squeezed.update_state(labels[..., None], logits)
        assert float(squeezed.result()) == pytest.approx(float(plain.result()), abs=1e-7)


@pytest.mark.parametrize("name", ["ce", "dice", "focal"])
def test_fractional_float_labels_are_refused_not_truncated(name):
    """tf.cast truncates 1.7 to 1; a bilinearly resized mask must fail loudly instead."""
    logits = np.zeros((1, 3, 3), "float32")
    loss = losses.get(name)
    floats = np.array([[0.4, 1.7, 2.9]], "float32")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"integral class ids.*0\.4, 1\.7"):
        loss(floats, logits)
    with pytest.raises(tf.errors.InvalidArgumentError, match="integral class ids"):
        tf.function(lambda y, p: loss(y, p))(floats, logits)
    # integral floats (Keras casts integer labels to float32 anyway) are class ids
    ints = np.array([[0, 1, 2]])
    assert float(loss(ints.astype("float32"), logits)) == pytest.approx(float(loss(ints, logits)))


def test_focal_alpha_scalar_only_rescales_and_per_class_is_the_papers_alpha_t():
    labels, logits = _data((2, 4, 5), 2, seed=14)
    p_t = np.take_along_axis(_softmax64(logits), labels[..., None], -1)[..., 0]
    fl = -((1 - p_t) ** 2) * np.log(p_t)
    plain = losses.FocalLoss(reduction=None)(labels, logits).numpy()
    scaled = losses.FocalLoss(alpha=0.25, reduction=None)(labels, logits).numpy()
    np.testing.assert_allclose(scaled, 0.25 * plain, **TOL)  # no class balancing at all
    # Lin et al. eq. 3/5: alpha_t = alpha on the foreground (1), 1 - alpha on the background (0)
    alpha_t = np.where(labels == 1, 0.25, 0.75)
    expected = (alpha_t * fl).mean(axis=(1, 2))
    got = losses.FocalLoss(alpha=[0.75, 0.25], reduction=None)(labels, logits)
    np.testing.assert_allclose(got, expected, **TOL)
    with pytest.raises(ValueError, match=r"only rescales.*alpha=\[0\.75, 0\.25\]") as info:
        losses.FocalLoss(alpha=-0.25)
    assert "e.g. alpha=0.25" not in str(info.value)

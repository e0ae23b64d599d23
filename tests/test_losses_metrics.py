"""Dice losses and mean IoU against plain numpy and keras.metrics.MeanIoU."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dlmodels import losses, metrics
from dlmodels.training import resolve_strategy


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _numpy_dice(labels, probs, smooth=1.0):
    c = probs.shape[-1]
    one_hot = np.eye(c)[labels]
    axes = tuple(range(1, probs.ndim - 1))
    inter = (probs * one_hot).sum(axes)
    denom = probs.sum(axes) + one_hot.sum(axes)
    return 1 - ((2 * inter + smooth) / (denom + smooth)).mean(-1)


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (3, 5, 6))
    logits = rng.standard_normal((3, 5, 6, 4)).astype("float32") * 2
    return labels, logits


def test_dice_loss_matches_numpy(batch):
    labels, logits = batch
    expected = _numpy_dice(labels, _softmax(logits))
    per_example = losses.DiceLoss(from_logits=True, reduction=None)(labels, logits)
    np.testing.assert_allclose(per_example, expected, rtol=1e-5)
    mean = losses.DiceLoss(from_logits=True)(labels, logits)
    np.testing.assert_allclose(mean, expected.mean(), rtol=1e-5)
    probs = losses.DiceLoss(from_logits=False, smooth=0.5)(labels, _softmax(logits))
    np.testing.assert_allclose(probs, _numpy_dice(labels, _softmax(logits), 0.5).mean(), rtol=1e-5)


def test_dice_loss_is_zero_for_a_perfect_prediction():
    labels = np.array([[[0, 1], [2, 2]]])
    perfect = np.eye(3, dtype="float32")[labels]
    loss = losses.DiceLoss(from_logits=False)
    assert float(loss(labels, perfect)) == pytest.approx(0.0, abs=1e-6)


def test_dice_cross_entropy_matches_numpy(batch):
    labels, logits = batch
    probs = _softmax(logits)
    ce = -np.log(np.take_along_axis(probs, labels[..., None], -1)[..., 0]).mean((1, 2))
    expected = 0.7 * ce + 0.3 * _numpy_dice(labels, probs)
    loss = losses.DiceCrossEntropy(ce_weight=0.7, dice_weight=0.3, reduction=None)
    np.testing.assert_allclose(loss(labels, logits), expected, rtol=1e-5)


def test_losses_serialize_and_validate(batch):
    labels, logits = batch
    loss = losses.get("dice_ce", ce_weight=2.0, smooth=0.1)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, losses.DiceCrossEntropy)
    assert restored.get_config() == loss.get_config()
    np.testing.assert_allclose(restored(labels, logits), loss(labels, logits), rtol=1e-6)
    assert "dlmodels>DiceLoss" in keras.saving.get_registered_name(losses.DiceLoss)
    with pytest.raises(ValueError, match="smooth"):
        losses.DiceLoss(smooth=-1)
    with pytest.raises(ValueError, match="dice_weight"):
        losses.DiceCrossEntropy(dice_weight=-1)
    with pytest.raises(ValueError, match="'dice', 'dice_ce', 'focal', 'focal_dice'"):
        losses.get("lovasz")


def test_numpy_iou_by_hand():
    y_true = np.array([0, 0, 1, 1, 2, 255])
    y_pred = np.array([0, 1, 1, 1, 0, 2])
    miou, per_class = metrics.confusion_matrix_iou(y_true, y_pred, 4, ignore_index=255)
    # class 0: tp 1, fp 1 (the 2), fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: 0/1;
    # class 3 absent everywhere -> NaN, excluded from the mean.
    np.testing.assert_allclose(per_class[:3], [1 / 3, 2 / 3, 0.0])
    assert np.isnan(per_class[3])
    assert miou == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    # Scores with a trailing class axis are argmaxed.
    scores = np.eye(4)[y_pred]
    assert metrics.confusion_matrix_iou(y_true, scores, 4, ignore_index=255)[0] == miou
    with pytest.raises(ValueError, match="y_true"):
        metrics.confusion_matrix_iou(y_true, y_pred, 4)
    with pytest.raises(ValueError, match="num_classes"):
        metrics.confusion_matrix_iou(y_true, y_pred, 0)


def test_mean_iou_matches_keras_and_numpy(batch):
    labels, logits = batch
    pred = logits.argmax(-1)
    ours = metrics.MeanIoU(4)
    ours.update_state(labels[:2], logits[:2])
    ours.update_state(labels[2:], logits[2:])
    ref = keras.metrics.MeanIoU(num_classes=4)
    ref.update_state(labels, pred)
    np_miou, _ = metrics.confusion_matrix_iou(labels, pred, 4)
    assert float(ours.result()) == pytest.approx(float(ref.result()), abs=1e-6)
    assert float(ours.result()) == pytest.approx(np_miou, abs=1e-6)
    ours.reset_state()
    assert float(ours.result()) == 0.0


def test_mean_iou_ignore_index_and_absent_classes():
    labels = np.array([[0, 0, 255, 1], [1, 1, 255, 0]])
    pred = np.array([[0, 1, 2, 1], [1, 1, 0, 0]])
    m = metrics.MeanIoU(num_classes=5, ignore_index=255)
    m.update_state(labels, pred)  # class ids shaped like the labels are accepted too
    expected, _ = metrics.confusion_matrix_iou(labels, pred, 5, ignore_index=255)
    assert float(m.result()) == pytest.approx(expected, abs=1e-6)
    ref = keras.metrics.MeanIoU(num_classes=5, ignore_class=255)
    ref.update_state(labels, pred)
    assert float(m.result()) == pytest.approx(float(ref.result()), abs=1e-6)
    single = metrics.MeanIoU(num_classes=5, ignore_index=255, accumulator_dtype="float32")
    single.update_state(labels, np.eye(5)[pred])
    assert float(single.result()) == pytest.approx(expected, abs=1e-6)


def test_mean_iou_serializes_and_validates():
    m = metrics.MeanIoU(3, ignore_index=0, name="miou")
    clone = keras.metrics.deserialize(keras.metrics.serialize(m))
    assert isinstance(clone, metrics.MeanIoU)
    assert clone.get_config() == m.get_config()
    with pytest.raises(ValueError, match="num_classes"):
        metrics.MeanIoU(0)
    with pytest.raises(ValueError, match="ignore_index"):
        metrics.MeanIoU(3, ignore_index="void")
    with pytest.raises(ValueError, match="accumulator_dtype"):
        metrics.MeanIoU(3, accumulator_dtype="int32")


def test_mean_iou_accumulates_across_replicas():
    strategy = resolve_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, (4, 6, 6))
    logits = rng.standard_normal((4, 6, 6, 3)).astype("float32")
    with strategy.scope():
        m = metrics.MeanIoU(3)
    ds = tf.data.Dataset.from_tensor_slices((labels, logits)).batch(4)

    @tf.function
    def step(batch):
        strategy.run(lambda y, p: m.update_state(y, p), args=batch)

    for batch in strategy.experimental_distribute_dataset(ds):
        step(batch)
    expected, _ = metrics.confusion_matrix_iou(labels, logits, 3)
    assert float(m.result()) == pytest.approx(expected, abs=1e-6)


# -- ignore index and class weights -------------------------------------------------------------

VOID = 255


@pytest.fixture
def void_batch():
    """Labels with about a third of the pixels void, and every example keeping some valid ones."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, (3, 5, 6))
    labels[rng.uniform(size=labels.shape) < 0.35] = VOID
    logits = rng.standard_normal((3, 5, 6, 4)).astype("float32") * 2
    return labels, logits


def _numpy_ce(labels, logits, ignore=None, weights=None):
    """Per-example weighted cross-entropy over the kept pixels, by explicit loops."""
    probs = _softmax(logits.astype(np.float64))
    out = []
    for lab, p in zip(labels, probs, strict=True):
        lab, p = lab.reshape(-1), p.reshape(-1, p.shape[-1])
        keep = lab != ignore if ignore is not None else np.ones(lab.shape, bool)
        w = np.ones(keep.sum()) if weights is None else np.asarray(weights)[lab[keep]]
        ce = -np.log(p[keep, lab[keep]])
        out.append((w * ce).sum() / w.sum() if keep.any() else 0.0)
    return np.array(out)


def _numpy_dice_kept(labels, logits, ignore, smooth=1.0):
    """Dice over the kept pixels only: the ignored ones are removed before any sum."""
    probs = _softmax(logits.astype(np.float64))
    c = probs.shape[-1]
    out = []
    for lab, p in zip(labels, probs, strict=True):
        keep = lab.reshape(-1) != ignore
        p_kept, lab_kept = p.reshape(-1, c)[keep], lab.reshape(-1)[keep]
        one_hot = np.eye(c)[lab_kept]
        inter, denom = (p_kept * one_hot).sum(0), p_kept.sum(0) + one_hot.sum(0)
        out.append(1 - ((2 * inter + smooth) / (denom + smooth)).mean())
    return np.array(out)


def test_cross_entropy_without_ignore_equals_keras(batch):
    labels, logits = batch
    ours = losses.SparseCrossEntropy(reduction=None)(labels, logits)
    ref = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    np.testing.assert_allclose(ours, np.mean(ref(labels, logits), axis=(1, 2)), rtol=1e-5)
    probs = losses.SparseCrossEntropy(from_logits=False, reduction=None)(labels, _softmax(logits))
    np.testing.assert_allclose(probs, ours, rtol=1e-4)


def test_cross_entropy_ignores_void_pixels(void_batch):
    labels, logits = void_batch
    expected = _numpy_ce(labels, logits, ignore=VOID)
    got = losses.SparseCrossEntropy(ignore_index=VOID, reduction=None)(labels, logits)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Counting the void pixels (as class 0, or as zeros in the mean) gives another number.
    zeros_counted = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=VOID, reduction=None
    )(labels, logits)
    assert np.abs(np.mean(zeros_counted, axis=(1, 2)) - expected).max() > 1e-2
    weights = [0.5, 2.0, 1.0, 3.0]
    weighted = losses.SparseCrossEntropy(ignore_index=VOID, class_weights=weights, reduction=None)
    np.testing.assert_allclose(
        weighted(labels, logits), _numpy_ce(labels, logits, VOID, weights), rtol=1e-5
    )
    # The default reduction is the mean of the per-example values (the global-batch average).
    mean = losses.SparseCrossEntropy(ignore_index=VOID)(labels, logits)
    assert float(mean) == pytest.approx(expected.mean(), rel=1e-5)


def test_cross_entropy_classification_and_all_void_example():
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, 1.0, 1.0]], "float32")
    labels = np.array([0, VOID, 2])
    got = losses.SparseCrossEntropy(ignore_index=VOID, reduction=None)(labels, logits)
    expected = _numpy_ce(labels[:, None], logits[:, None, :], ignore=VOID)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert float(got[1]) == 0.0  # nothing to learn from an all-void example, and no NaN


def test_dice_ignores_void_pixels(void_batch):
    labels, logits = void_batch
    expected = _numpy_dice_kept(labels, logits, VOID)
    got = losses.DiceLoss(from_logits=True, ignore_index=VOID, reduction=None)(labels, logits)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    unmasked = _numpy_dice(np.where(labels == VOID, 0, labels), _softmax(logits))
    assert np.abs(unmasked - expected).max() > 1e-2  # the mask matters on this batch
    combo = losses.DiceCrossEntropy(ce_weight=0.4, dice_weight=0.6, ignore_index=VOID)
    np.testing.assert_allclose(
        combo(labels, logits),
        (0.4 * _numpy_ce(labels, logits, VOID) + 0.6 * expected).mean(),
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "loss",
    [
        losses.SparseCrossEntropy(ignore_index=VOID, class_weights=[1, 2, 3, 4]),
        losses.DiceLoss(from_logits=True, ignore_index=VOID),
        losses.DiceCrossEntropy(ignore_index=VOID),
    ],
    ids=["ce", "dice", "dice_ce"],
)
def test_gradient_is_zero_exactly_at_void_pixels(void_batch, loss):
    labels, logits = void_batch
    x = tf.constant(logits)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = loss(tf.constant(labels), x)
    grad = tape.gradient(value, x).numpy()
    void = labels == VOID
    assert np.all(grad[void] == 0.0)
    assert np.all(np.abs(grad[~void]).sum(-1) > 0)  # every kept pixel is learned from


def test_ignore_and_weights_serialize_and_validate():
    loss = losses.get("dice_ce", ignore_index=VOID, class_weights=[1.0, 2.0])
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert restored.get_config() == loss.get_config()
    assert restored.ignore_index == VOID and restored.class_weights == [1.0, 2.0]
    ce = losses.get("ce", ignore_index=0)
    assert keras.losses.deserialize(keras.losses.serialize(ce)).get_config() == ce.get_config()
    with pytest.raises(ValueError, match="ignore_index"):
        losses.SparseCrossEntropy(ignore_index="void")
    with pytest.raises(ValueError, match="class_weights"):
        losses.SparseCrossEntropy(class_weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="ignore_index"):
        losses.DiceLoss(ignore_index=2.5)

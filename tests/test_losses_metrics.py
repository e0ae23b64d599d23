"""Dice losses and mean IoU against plain numpy and keras.metrics.MeanIoU."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dlmodels import losses, metrics


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
    assert float(losses.DiceLoss()(labels, perfect)) == pytest.approx(0.0, abs=1e-6)


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
    with pytest.raises(ValueError, match="'dice', 'dice_ce'"):
        losses.get("focal")


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
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
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

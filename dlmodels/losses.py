"""Segmentation and classification losses with an ignore index: cross-entropy, soft Dice, focal
loss and weighted sums of them.

Every loss returns one value per example (shape `(batch,)`) before Keras' reduction, so a
distributed loop can average them over the *global* batch with `tf.nn.compute_average_loss`
and get the gradients of one device on the same batch.

Ignored labels (`ignore_index`, e.g. 255 for "void" in PASCAL VOC) count nowhere: an ignored
pixel adds nothing to a loss, nothing to its normalizer, and receives a zero gradient. A label
outside `[0, num_classes)` that is not the ignore index is a data bug: the segmentation losses
(and the confusion-matrix metrics) raise `tf.errors.InvalidArgumentError` naming the offending
values, the allowed range and the ignore index, eagerly and inside a `tf.function` (see
`check_labels`; XLA-compiled functions drop the check, as XLA drops every `Assert`).
"""

from __future__ import annotations

import numbers

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from dlmodels._validation import check_choice


def _check_ignore_index(ignore_index, owner):
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int | np.integer):
        raise ValueError(
            f"{owner}: `ignore_index`={ignore_index!r} must be an int label value (e.g. 255 for "
            "void pixels) or None."
        )
    return int(ignore_index)


def _check_class_weights(class_weights, owner, argument="class_weights"):
    if class_weights is None:
        return None
    try:
        weights = [float(w) for w in class_weights]
    except (TypeError, ValueError):
        weights = []
    if not weights or min(weights) < 0 or max(weights) == 0:
        raise ValueError(
            f"{owner}: `{argument}`={class_weights!r} must be a non-empty sequence of "
            "non-negative floats, one per class, not all zero (e.g. inverse class frequencies)."
        )
    return weights


def _check_non_negative(value, argument, owner, example):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"{owner}: `{argument}`={value!r} must be a number >= 0 ({example}).")
    return float(value)


def _per_class(values, num_classes, argument, owner):
    """Per-class float32 vector from a list checked against the class axis of `y_pred`."""
    if isinstance(num_classes, int) and len(values) != num_classes:
        raise ValueError(
            f"{owner}: `{argument}` has {len(values)} entries but `y_pred` has "
            f"{num_classes} classes on its last axis. Give one value per class."
        )
    return ops.convert_to_tensor(values, "float32")


def _num_classes(y_pred):
    """The class count of `(B, ..., C)` scores: a Python int when static, else a scalar tensor."""
    static = y_pred.shape[-1]
    return int(static) if static is not None else ops.shape(y_pred)[-1]


def _label_error_text(owner, num_classes, ignore_index):
    allowed = (
        f"[0, num_classes={num_classes})" if isinstance(num_classes, int) else "[0, num_classes)"
    )
    if ignore_index is None:
        return f"{owner}: labels must be class ids in {allowed} (ignore_index=None); found"
    return f"{owner}: labels must be class ids in {allowed} or ignore_index={ignore_index}; found"


_LABEL_HINT = (
    "Fix the labels in the input pipeline, or pass ignore_index=<that value> if it marks pixels "
    "to skip (e.g. 255 for void)."
)


def check_labels(labels, num_classes, ignore_index=None, owner="labels"):
    """Integer labels `labels` as int32, checked to lie in `[0, num_classes)` or equal
    `ignore_index`.

    A bad label raises `tf.errors.InvalidArgumentError` whose message names `owner`, the bad
    values, the allowed range and the ignore index. Eagerly it lists up to 10 distinct bad values;
    inside a `tf.function` a `tf.debugging.Assert` reports their count, smallest and largest (the
    check costs a few reductions, no host sync in graphs). XLA (`jit_compile=True`) ignores
    `Assert` ops, so compiled steps are unchecked.

    Float labels must hold integral values (Keras' `Loss.__call__` casts integer labels to
    float32, which keeps them exact): a fractional value such as 1.7, e.g. from a bilinearly
    resized or [0, 1]-normalised mask, raises `tf.errors.InvalidArgumentError` ("labels must be
    integral class ids") instead of being truncated to a class id.

    Args:
        labels: integer (or integral float) label tensor, any shape.
        num_classes: the number of classes C (int or scalar tensor).
        ignore_index: the label value that is allowed and ignored, or None.
        owner: the name put at the front of the message (the loss or metric).

    Returns:
        `labels` cast to int32, with a control dependency on the check.
    """
    labels = tf.convert_to_tensor(labels)
    fraction_check = None
    if labels.dtype.is_floating:
        fraction_check = _check_integral(labels, owner)
    labels = tf.cast(labels, tf.int32)
    bad = tf.logical_or(labels < 0, labels >= tf.cast(num_classes, tf.int32))
    if ignore_index is not None:
        bad = tf.logical_and(bad, tf.not_equal(labels, ignore_index))
    text = _label_error_text(owner, num_classes, ignore_index)
    if tf.executing_eagerly():
        values = labels.numpy()[bad.numpy()]
        if values.size:
            distinct = np.unique(values)
            shown = ", ".join(str(v) for v in distinct[:10])
            more = f" and {distinct.size - 10} more" if distinct.size > 10 else ""
            raise tf.errors.InvalidArgumentError(
                None,
                None,
                f"{text} out-of-range values {shown}{more} ({values.size} positions). "
                + _LABEL_HINT,
            )
        return labels
    count = tf.reduce_sum(tf.cast(bad, tf.int32))
    smallest = tf.reduce_min(tf.where(bad, labels, tf.int32.max))
    largest = tf.reduce_max(tf.where(bad, labels, tf.int32.min))
    data = [f"{text} out-of-range values (count, smallest, largest):", count, smallest, largest]
    data.append(_LABEL_HINT)
    if not isinstance(num_classes, int):
        data += ["num_classes =", num_classes]
    assertion = tf.debugging.Assert(tf.equal(count, 0), data, summarize=10)
    checks = [assertion] if fraction_check is None else [assertion, fraction_check]
    with tf.control_dependencies(checks):
        return tf.identity(labels)


_FRACTION_HINT = (
    "A label map holds class ids: resize masks with nearest-neighbour interpolation and do not "
    "normalise them (e.g. to [0, 1])."
)


def _check_integral(labels, owner):
    """Raise (eagerly) or return an Assert op (in a graph) unless float `labels` are integral."""
    fractional = tf.logical_not(tf.equal(labels, tf.round(labels)))  # NaN counts as fractional
    text = f"{owner}: labels must be integral class ids; found fractional values"
    if tf.executing_eagerly():
        values = labels.numpy()[fractional.numpy()]
        if values.size:
            distinct = np.unique(values)
            shown = ", ".join(f"{v:g}" for v in distinct[:10])
            more = f" and {distinct.size - 10} more" if distinct.size > 10 else ""
            raise tf.errors.InvalidArgumentError(
                None, None, f"{text} {shown}{more} ({values.size} positions). {_FRACTION_HINT}"
            )
        return None
    count = tf.reduce_sum(tf.cast(fractional, tf.int32))
    example = tf.reduce_max(tf.where(fractional, labels, tf.cast(-np.inf, labels.dtype)))
    data = [f"{text} (count, largest):", count, example, _FRACTION_HINT]
    return tf.debugging.Assert(tf.equal(count, 0), data, summarize=10)


def match_label_rank(y_true, y_pred, owner="labels"):
    """Labels `(B, ..., 1)` (a channel axis of size 1, as image pipelines often give masks)
    squeezed to `(B, ...)` when they have the rank of the scores `y_pred` `(B, ..., C)`;
    labels `(B, ...)` are returned as they are.

    Raises:
        ValueError: labels of `y_pred`'s rank whose last axis is not 1 (e.g. one-hot labels).
    """
    y_true = ops.convert_to_tensor(y_true)
    rank_true, rank_pred = len(y_true.shape), len(y_pred.shape)
    if rank_true != rank_pred:
        return y_true
    if y_true.shape[-1] not in (1, None):
        raise ValueError(
            f"{owner}: `y_true` has shape {tuple(y_true.shape)}, the rank of the scores "
            f"`y_pred` {tuple(y_pred.shape)}, but its last axis is not 1. Labels must be "
            "integer class ids (B, ...) or (B, ..., 1), not one-hot: pass "
            "argmax(y_true, axis=-1)."
        )
    return ops.squeeze(y_true, axis=-1)


def _labels_and_mask(y_true, ignore_index, num_classes=None, owner="labels"):
    """Integer labels with ignored positions replaced by 0 (a valid id), and a float32 mask that
    is 0 exactly at the ignored positions. With `num_classes`, labels are checked first (see
    `check_labels`)."""
    if num_classes is not None:
        y_true = check_labels(y_true, num_classes, ignore_index, owner)
    y_true = ops.cast(y_true, "int32")
    if ignore_index is None:
        return y_true, ops.ones(ops.shape(y_true), "float32")
    keep = ops.not_equal(y_true, ignore_index)
    return ops.where(keep, y_true, ops.zeros_like(y_true)), ops.cast(keep, "float32")


def _flat_per_example(x):
    """`(B, ...)` -> `(B, N)`; a `(B,)` tensor (classification) becomes `(B, 1)`."""
    return ops.reshape(x, (ops.shape(x)[0], -1))


def _masked_mean_per_example(values, weight):
    """`sum_i w_i v_i / sum_i w_i` per example; 0 for an example whose weights are all 0."""
    values, weight = _flat_per_example(values), _flat_per_example(weight)
    return ops.divide_no_nan(ops.sum(values * weight, axis=-1), ops.sum(weight, axis=-1))


def sparse_cross_entropy_per_example(
    y_true, y_pred, *, from_logits=True, ignore_index=None, class_weights=None, owner=None
):
    """Per-example (weighted) cross-entropy over the non-ignored positions.

    For example b with positions i (pixels, or the single position of a classifier):
    `loss_b = sum_i m_i w_{y_i} ce_i / sum_i m_i w_{y_i}`, with `ce_i = -log p_i[y_i]`, `m_i` = 0
    at ignored positions and 1 elsewhere, `w` the class weights (1 without). The mean is
    normalized by the sum of the weights, not by the pixel count: this is PyTorch's weighted
    `CrossEntropyLoss(weight=w, ignore_index=...)` (reduction "mean") taken per example, so
    scaling every weight by the same factor leaves the loss unchanged and only the ratios between
    classes matter. An example with no valid position contributes 0.

    Args:
        y_true: integer labels `(B, ...)` or `(B, ..., 1)` in `[0, C)` or `ignore_index`
            (others raise, see `check_labels` and `match_label_rank`).
        y_pred: logits or probabilities `(B, ..., C)`.
        from_logits: whether `y_pred` are logits.
        ignore_index: label value to ignore, or None.
        class_weights: per-class weights (length C), or None.
        owner: the loss named in error messages (default "SparseCrossEntropy").

    Returns:
        `(B,)` float32.
    """
    owner = owner or "SparseCrossEntropy"
    y_pred = ops.cast(y_pred, "float32")
    num_classes = _num_classes(y_pred)
    y_true = match_label_rank(y_true, y_pred, owner)
    labels, mask = _labels_and_mask(y_true, ignore_index, num_classes, owner)
    ce = ops.sparse_categorical_crossentropy(labels, y_pred, from_logits=from_logits)
    weight = mask
    if class_weights is not None:
        table = _per_class(class_weights, num_classes, "class_weights", owner)
        weight = weight * ops.take(table, labels)
    return _masked_mean_per_example(ce, weight)


def _probabilities(y_pred, from_logits):
    y_pred = ops.cast(y_pred, "float32")
    return ops.softmax(y_pred, axis=-1) if from_logits else y_pred


def soft_dice_per_example(y_true, probs, smooth=1.0, ignore_index=None, owner="DiceLoss"):
    """Per-example soft Dice loss `1 - mean_c dice_c` for integer labels and class probabilities
    (Milletari et al. 2016, "V-Net", 3DV, eq. 1, with additive smoothing).

    `dice_c = (2 * sum_i(p_ic * t_ic) + smooth) / (sum_i p_ic + sum_i t_ic + smooth)` over the
    non-ignored pixels i of one example (V-Net's denominator sums p and t, not their squares).
    The mean runs over all C classes, present in the example or not: `smooth` > 0 keeps a class
    absent from both truth and prediction at dice 1 (no loss) instead of 0/0, and an absent
    class the model predicts anyway is penalized. With `smooth`=0 a class with an empty sum
    counts as dice 1. Ignored pixels are removed from the prediction and the truth sums alike.
    """
    num_classes = _num_classes(probs)
    y_true = match_label_rank(y_true, probs, owner)
    labels, mask = _labels_and_mask(y_true, ignore_index, num_classes, owner)
    one_hot = ops.one_hot(labels, num_classes, dtype=probs.dtype) * mask[..., None]
    probs = probs * mask[..., None]
    axes = tuple(range(1, len(probs.shape) - 1))
    intersection = ops.sum(probs * one_hot, axis=axes)
    denominator = ops.sum(probs, axis=axes) + ops.sum(one_hot, axis=axes) + smooth
    dice = ops.where(
        denominator > 0,
        ops.divide_no_nan(2.0 * intersection + smooth, denominator),
        ops.ones_like(denominator),
    )
    return 1.0 - ops.mean(dice, axis=-1)


def focal_loss_per_example(
    y_true, y_pred, *, from_logits=True, gamma=2.0, alpha=None, ignore_index=None
):
    """Per-example multi-class focal loss over the non-ignored positions.

    `FL_i = -alpha_{y_i} (1 - p_t)^gamma log p_t` with `p_t = p_i[y_i]` the softmax probability of
    the true class (Lin et al. 2017, "Focal Loss for Dense Object Detection", ICCV, eq. 5, in
    its softmax form). Per example, `loss_b = sum_i m_i FL_i / sum_i m_i`: a mean over the valid
    positions, so a per-class `alpha` weighs classes as the paper's alpha_t and is not a
    re-normalized weighted mean (unlike `class_weights` of `sparse_cross_entropy_per_example`).
    A scalar `alpha` multiplies every class alike: it only rescales the loss, it does not
    balance classes (the paper's alpha_t is alpha on the foreground and 1 - alpha on the
    background: per class [1 - alpha, alpha] for background 0 / foreground 1, e.g. [0.75, 0.25]
    for the paper's alpha = 0.25). gamma=0 with alpha=None is the plain cross-entropy.

    Args:
        y_true: integer labels `(B, ...)` or `(B, ..., 1)` in `[0, C)` or `ignore_index`.
        y_pred: logits or probabilities `(B, ..., C)`.
        from_logits: whether `y_pred` are logits; probabilities are clipped to
            `[keras.config.epsilon(), 1]` before the log.
        gamma: focusing parameter >= 0.
        alpha: None (1 for every class), a float multiplying every class (a plain rescaling),
            or one float per class (class balancing, the paper's alpha_t).
        ignore_index: label value to ignore, or None.

    Returns:
        `(B,)` float32.
    """
    y_pred = ops.cast(y_pred, "float32")
    num_classes = _num_classes(y_pred)
    y_true = match_label_rank(y_true, y_pred, "FocalLoss")
    labels, mask = _labels_and_mask(y_true, ignore_index, num_classes, "FocalLoss")
    if from_logits:
        log_probs = ops.log_softmax(y_pred, axis=-1)
    else:
        log_probs = ops.log(ops.clip(y_pred, keras.config.epsilon(), 1.0))
    log_pt = ops.take_along_axis(log_probs, ops.expand_dims(labels, -1), axis=-1)[..., 0]
    pt = ops.exp(log_pt)
    focal = -ops.power(ops.maximum(1.0 - pt, 0.0), gamma) * log_pt if gamma else -log_pt
    if alpha is not None:
        if isinstance(alpha, numbers.Real):
            focal = float(alpha) * focal
        else:
            focal = focal * ops.take(_per_class(alpha, num_classes, "alpha", "FocalLoss"), labels)
    return _masked_mean_per_example(focal, mask)


@keras.saving.register_keras_serializable(package="dlmodels")
class SparseCrossEntropy(keras.losses.Loss):
    """Cross-entropy for integer labels with an ignore index and class weights, one value per
    example (the categorical cross-entropy of Long et al. 2015, "Fully Convolutional Networks
    for Semantic Segmentation", CVPR, with PASCAL VOC's void label ignored).

    Unlike `keras.losses.SparseCategoricalCrossentropy(ignore_class=...)`, whose per-pixel
    values keep ignored pixels as zeros that still count in a mean, each example here is
    normalized by its own count of valid (weighted) pixels, so `reduction=None` already gives
    the per-example values a distributed loop averages over the global batch.

    Class weights follow PyTorch's weighted mean: `sum_i w_{y_i} ce_i / sum_i w_{y_i}` over the
    valid pixels of an example (see `sparse_cross_entropy_per_example`); multiplying all weights
    by a constant changes nothing.

    Args:
        from_logits: True when `y_pred` are logits (dlmodels models return logits).
        ignore_index: label value whose positions are ignored, or None.
        class_weights: one non-negative weight per class, or None.
        reduction, name, dtype: as in `keras.losses.Loss`.

    `y_true` holds integer class ids `(B, ...)` or `(B, ..., 1)`, `y_pred` scores `(B, ..., C)`.
    A label outside `[0, C)` other than `ignore_index`, or a fractional float label, raises
    `tf.errors.InvalidArgumentError`.
    """

    def __init__(
        self,
        from_logits=True,
        ignore_index=None,
        class_weights=None,
        reduction="sum_over_batch_size",
        name="sparse_cross_entropy",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = bool(from_logits)
        self.ignore_index = _check_ignore_index(ignore_index, "SparseCrossEntropy")
        self.class_weights = _check_class_weights(class_weights, "SparseCrossEntropy")

    def call(self, y_true, y_pred):
        return sparse_cross_entropy_per_example(
            y_true,
            y_pred,
            from_logits=self.from_logits,
            ignore_index=self.ignore_index,
            class_weights=self.class_weights,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "from_logits": self.from_logits,
            "ignore_index": self.ignore_index,
            "class_weights": self.class_weights,
        }


@keras.saving.register_keras_serializable(package="dlmodels")
class DiceLoss(keras.losses.Loss):
    """Soft Dice loss averaged over classes (Milletari et al. 2016, "V-Net: Fully Convolutional
    Neural Networks for Volumetric Medical Image Segmentation", 3DV; the multi-class mean as in
    Sudre et al. 2017 without the generalised weights).

    The Dice overlap is scale-free per class, so small objects count as much as the background;
    cross-entropy alone is dominated by the majority class. Per example, `1 - mean_c dice_c`
    over all C classes (see `soft_dice_per_example`); ignored pixels leave both the numerator
    and the denominator.

    Args:
        from_logits: True (the default, as every dlmodels loss: dlmodels models return
            logits) applies a softmax over the last axis; False reads `y_pred` as
            probabilities.
        smooth: additive smoothing of numerator and denominator (>= 0).
        ignore_index: label value whose pixels are excluded from every sum, or None.
        reduction, name, dtype: as in `keras.losses.Loss`.

    `y_true` holds integer class ids `(B, ...)` or `(B, ..., 1)`, `y_pred` scores `(B, ..., C)`.
    A label outside `[0, C)` other than `ignore_index`, or a fractional float label, raises
    `tf.errors.InvalidArgumentError`.
    """

    def __init__(
        self,
        from_logits=True,
        smooth=1.0,
        ignore_index=None,
        reduction="sum_over_batch_size",
        name="dice_loss",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = bool(from_logits)
        self.smooth = _check_non_negative(smooth, "smooth", "DiceLoss", "e.g. smooth=1.0")
        self.ignore_index = _check_ignore_index(ignore_index, "DiceLoss")

    def call(self, y_true, y_pred):
        probs = _probabilities(y_pred, self.from_logits)
        return soft_dice_per_example(y_true, probs, self.smooth, self.ignore_index)

    def get_config(self):
        return {
            **super().get_config(),
            "from_logits": self.from_logits,
            "smooth": self.smooth,
            "ignore_index": self.ignore_index,
        }


@keras.saving.register_keras_serializable(package="dlmodels")
class FocalLoss(keras.losses.Loss):
    """Multi-class focal loss with an ignore index, one value per example (Lin et al. 2017,
    "Focal Loss for Dense Object Detection", ICCV).

    `FL = -alpha_t (1 - p_t)^gamma log p_t` with the softmax probability `p_t` of the true class,
    averaged over each example's valid pixels (see `focal_loss_per_example`). The factor
    `(1 - p_t)^gamma` shrinks the loss of pixels that are already right, so the many easy
    background pixels stop dominating the gradient; gamma=2 is the paper's choice.

    Args:
        from_logits: True when `y_pred` are logits (dlmodels models return logits).
        gamma: focusing parameter >= 0 (0 gives the cross-entropy scaled by alpha).
        alpha: None (no class weighting), one non-negative float per class (class balancing,
            e.g. [0.75, 0.25] for the paper's alpha_t = 0.25 on foreground class 1, or inverse
            class frequencies), or one float for all classes, which only rescales the loss
            (the same for every class, so no balancing). Not re-normalized: see
            `focal_loss_per_example`.
        ignore_index: label value whose positions are ignored, or None.
        reduction, name, dtype: as in `keras.losses.Loss`.

    `y_true` holds integer class ids `(B, ...)` or `(B, ..., 1)`, `y_pred` scores `(B, ..., C)`.
    A label outside `[0, C)` other than `ignore_index`, or a fractional float label, raises
    `tf.errors.InvalidArgumentError`.
    """

    def __init__(
        self,
        from_logits=True,
        gamma=2.0,
        alpha=None,
        ignore_index=None,
        reduction="sum_over_batch_size",
        name="focal_loss",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = bool(from_logits)
        self.gamma = _check_non_negative(gamma, "gamma", "FocalLoss", "e.g. gamma=2.0")
        if isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
            alpha = _check_non_negative(
                alpha,
                "alpha",
                "FocalLoss",
                "a scalar only rescales the loss; to balance classes as the paper's alpha_t pass "
                "one weight per class, e.g. alpha=[0.75, 0.25]",
            )
        elif alpha is not None:
            alpha = _check_class_weights(alpha, "FocalLoss", "alpha")
        self.alpha = alpha
        self.ignore_index = _check_ignore_index(ignore_index, "FocalLoss")

    def call(self, y_true, y_pred):
        return focal_loss_per_example(
            y_true,
            y_pred,
            from_logits=self.from_logits,
            gamma=self.gamma,
            alpha=self.alpha,
            ignore_index=self.ignore_index,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "from_logits": self.from_logits,
            "gamma": self.gamma,
            "alpha": self.alpha,
            "ignore_index": self.ignore_index,
        }


@keras.saving.register_keras_serializable(package="dlmodels")
class DiceCrossEntropy(keras.losses.Loss):
    """`ce_weight * cross-entropy + dice_weight * soft Dice`, per example.

    The combination used by nnU-Net (Isensee et al. 2021, "nnU-Net: a self-configuring method
    for deep learning-based biomedical image segmentation", Nature Methods): cross-entropy gives
    well-behaved per-pixel gradients early, Dice counters class imbalance. Both terms skip
    `ignore_index` pixels (see `SparseCrossEntropy` and `DiceLoss`). The same sum with any
    terms is `CombinedLoss`.

    Args:
        from_logits: True when `y_pred` are logits.
        ce_weight, dice_weight: non-negative weights of the two terms.
        smooth: Dice smoothing, see `DiceLoss`.
        ignore_index: label value whose pixels are ignored by both terms, or None.
        class_weights: per-class weights of the cross-entropy term, or None.
        reduction, name, dtype: as in `keras.losses.Loss`.
    """

    def __init__(
        self,
        from_logits=True,
        ce_weight=1.0,
        dice_weight=1.0,
        smooth=1.0,
        ignore_index=None,
        class_weights=None,
        reduction="sum_over_batch_size",
        name="dice_cross_entropy",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        owner = "DiceCrossEntropy"
        self.ce_weight = _check_non_negative(ce_weight, "ce_weight", owner, "e.g. 1.0")
        self.dice_weight = _check_non_negative(dice_weight, "dice_weight", owner, "e.g. 1.0")
        self.smooth = _check_non_negative(smooth, "smooth", owner, "e.g. smooth=1.0")
        self.from_logits = bool(from_logits)
        self.ignore_index = _check_ignore_index(ignore_index, owner)
        self.class_weights = _check_class_weights(class_weights, owner)

    def call(self, y_true, y_pred):
        ce = sparse_cross_entropy_per_example(
            y_true,
            y_pred,
            from_logits=self.from_logits,
            ignore_index=self.ignore_index,
            class_weights=self.class_weights,
            owner="DiceCrossEntropy",
        )
        probs = _probabilities(y_pred, self.from_logits)
        dice = soft_dice_per_example(
            y_true, probs, self.smooth, self.ignore_index, owner="DiceCrossEntropy"
        )
        return self.ce_weight * ce + self.dice_weight * dice

    def get_config(self):
        return {
            **super().get_config(),
            "from_logits": self.from_logits,
            "ce_weight": self.ce_weight,
            "dice_weight": self.dice_weight,
            "smooth": self.smooth,
            "ignore_index": self.ignore_index,
            "class_weights": self.class_weights,
        }


def _combined_term(item, index):
    """`(loss, weight)` from a `(loss, weight)` pair or `{"loss": ..., "weight": ...}`."""
    if isinstance(item, dict) and set(item) == {"loss", "weight"}:
        loss, weight = item["loss"], item["weight"]
    elif isinstance(item, list | tuple) and len(item) == 2:
        loss, weight = item
    else:
        raise ValueError(
            f"CombinedLoss: `losses[{index}]`={item!r} must be a (loss, weight) pair, e.g. "
            "(dlmodels.losses.DiceLoss(from_logits=True), 0.5)."
        )
    if isinstance(loss, str):
        loss = get(loss)
    elif isinstance(loss, dict):
        loss = keras.saving.deserialize_keras_object(loss)
    if not isinstance(loss, keras.losses.Loss):
        raise ValueError(
            f"CombinedLoss: `losses[{index}]` has loss {loss!r}; pass a keras.losses.Loss "
            f"instance or a name known to dlmodels.losses.get ({', '.join(LOSSES)})."
        )
    weight = _check_non_negative(weight, f"losses[{index}] weight", "CombinedLoss", "e.g. 0.5")
    return loss, weight


@keras.saving.register_keras_serializable(package="dlmodels")
class CombinedLoss(keras.losses.Loss):
    """A weighted sum of losses, one value per example: `sum_k w_k L_k(y_true, y_pred)`.

    Each term is evaluated through its `call` (no reduction); a term that returns per-position
    values (a Keras built-in such as `keras.losses.CategoricalFocalCrossentropy`) is averaged
    over the non-batch axes first, so the sum keeps the `(batch,)` per-example contract the
    Trainer averages over the global batch. The terms read the same `y_pred`, so those with a
    `from_logits` flag must agree (it becomes this loss' `from_logits` attribute, which is absent
    when no term has one, so the Trainer does not mistake "unknown" for False).

    Ignore index: terms with an `ignore_index` (the dlmodels losses) must agree on it; the
    common value (or the `ignore_index` argument) is given to every such term left at None, and
    a term that cannot ignore labels (a Keras built-in) is refused while an ignore index is set,
    since it would count void pixels.

    Args:
        losses: a list of `(loss, weight)` pairs: `loss` a `keras.losses.Loss`, a name known to
            `dlmodels.losses.get`, or a serialized loss dict; `weight` a number >= 0.
        ignore_index: label value to ignore in every term, or None (use the terms' own).
        reduction, name, dtype: as in `keras.losses.Loss`.

    Example: `CombinedLoss([(FocalLoss(), 1.0), (DiceLoss(from_logits=True), 0.5)])`, which
    `focal_dice(dice_weight=0.5)` also builds.
    """

    def __init__(
        self,
        losses,
        ignore_index=None,
        reduction="sum_over_batch_size",
        name="combined_loss",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if isinstance(losses, dict | str) or not isinstance(losses, list | tuple) or not losses:
            raise ValueError(
                f"CombinedLoss: `losses`={losses!r} must be a non-empty list of (loss, weight) "
                "pairs, e.g. [(FocalLoss(), 1.0), (DiceLoss(from_logits=True), 1.0)]."
            )
        terms = [_combined_term(item, i) for i, item in enumerate(losses)]
        ignore_index = _check_ignore_index(ignore_index, "CombinedLoss")
        named = {t.ignore_index for t, _ in terms if hasattr(t, "ignore_index")} - {None}
        if ignore_index is not None:
            named |= {ignore_index}
        if len(named) > 1:
            raise ValueError(
                f"CombinedLoss: the terms disagree on `ignore_index` ({sorted(named)}). Give "
                "every term the same value, or pass CombinedLoss(..., ignore_index=k)."
            )
        self.ignore_index = named.pop() if named else None
        if self.ignore_index is not None:
            for term, _ in terms:
                if not hasattr(term, "ignore_index"):
                    raise ValueError(
                        f"CombinedLoss: ignore_index={self.ignore_index} but the term "
                        f"{type(term).__name__} has no `ignore_index` and would count the "
                        "ignored pixels. Use dlmodels losses (SparseCrossEntropy, DiceLoss, "
                        "FocalLoss) for every term."
                    )
            terms = [
                (type(t).from_config({**t.get_config(), "ignore_index": self.ignore_index}), w)
                if t.ignore_index is None
                else (t, w)
                for t, w in terms
            ]
        flags = {bool(t.from_logits) for t, _ in terms if hasattr(t, "from_logits")}
        flags |= {
            bool(t.get_config()["from_logits"])
            for t, _ in terms
            if not hasattr(t, "from_logits") and "from_logits" in t.get_config()
        }
        if len(flags) > 1:
            raise ValueError(
                "CombinedLoss: the terms disagree on `from_logits` but read the same y_pred. "
                "Give every term from_logits=True (dlmodels models return logits)."
            )
        if flags:
            self.from_logits = flags.pop()
        self.terms = terms

    def call(self, y_true, y_pred):
        total = None
        for loss, weight in self.terms:
            values = ops.cast(loss.call(y_true, y_pred), "float32")
            if len(values.shape) > 1:
                values = ops.mean(values, axis=tuple(range(1, len(values.shape))))
            total = weight * values if total is None else total + weight * values
        return total

    def get_config(self):
        return {
            **super().get_config(),
            "losses": [
                {"loss": keras.saving.serialize_keras_object(loss), "weight": weight}
                for loss, weight in self.terms
            ],
            "ignore_index": self.ignore_index,
        }


def focal_dice(
    from_logits=True,
    gamma=2.0,
    alpha=None,
    smooth=1.0,
    focal_weight=1.0,
    dice_weight=1.0,
    ignore_index=None,
    reduction="sum_over_batch_size",
    name="focal_dice",
    dtype=None,
):
    """`focal_weight * FocalLoss + dice_weight * DiceLoss` as a `CombinedLoss`, the pairing of
    focal and Dice losses used for class-imbalanced segmentation (e.g. Zhu et al. 2019,
    "AnatomyNet", Medical Physics). Arguments as in `FocalLoss`, `DiceLoss` and
    `CombinedLoss`."""
    return CombinedLoss(
        [
            (FocalLoss(from_logits=from_logits, gamma=gamma, alpha=alpha), focal_weight),
            (DiceLoss(from_logits=from_logits, smooth=smooth), dice_weight),
        ],
        ignore_index=ignore_index,
        reduction=reduction,
        name=name,
        dtype=dtype,
    )


# -- generative --------------------------------------------------------------------------------
def _posterior_parts(y_pred):
    """(mu, log_var) float32 from a (mu, log_var) pair or their concatenation on the last axis."""
    if isinstance(y_pred, list | tuple):
        if len(y_pred) != 2:
            raise ValueError(
                f"GaussianKL: expected (mu, log_var), got {len(y_pred)} tensors. Pass the "
                "encoder's two outputs, or their concatenation on the last axis."
            )
        mu, log_var = y_pred
    else:
        size = y_pred.shape[-1]
        if size is None or size % 2:
            raise ValueError(
                f"GaussianKL: a single tensor must be concat([mu, log_var], -1) with an even "
                f"last axis, got shape {tuple(y_pred.shape)}. Pass (mu, log_var) instead."
            )
        mu, log_var = y_pred[..., : size // 2], y_pred[..., size // 2 :]
    return ops.cast(mu, "float32"), ops.cast(log_var, "float32")


def gaussian_kl_per_example(mu, log_var):
    """KL(N(mu, diag(exp(log_var))) || N(0, I)) per example, in closed form.

    `KL = 0.5 * sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2)` over every non-batch axis
    (Kingma & Welling 2014, "Auto-Encoding Variational Bayes", ICLR, appendix B).

    Args:
        mu: posterior means `(B, ...)`.
        log_var: posterior log-variances `log sigma^2`, shaped like `mu`.

    Returns:
        `(B,)` float32 (nats).
    """
    mu, log_var = ops.cast(mu, "float32"), ops.cast(log_var, "float32")
    terms = ops.square(mu) + ops.exp(log_var) - 1.0 - log_var
    return 0.5 * ops.sum(_flat_per_example(terms), axis=-1)


@keras.saving.register_keras_serializable(package="dlmodels")
class GaussianKL(keras.losses.Loss):
    """The closed-form KL divergence of a diagonal Gaussian posterior from the standard normal
    prior, one value per example: the regulariser of the VAE's negative ELBO (Kingma & Welling
    2014, "Auto-Encoding Variational Bayes", ICLR); `weight` > 1 gives the beta-VAE term
    (Higgins et al. 2017, "beta-VAE", ICLR).

    `y_true` is ignored (pass None); `y_pred` is the pair `(mu, log_var)` or
    `concat([mu, log_var], axis=-1)`.

    Args:
        weight: multiplies the divergence (beta), >= 0.
        reduction, name, dtype: as in `keras.losses.Loss`.
    """

    def __init__(self, weight=1.0, reduction="sum_over_batch_size", name="gaussian_kl", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise ValueError(f"GaussianKL: `weight`={weight!r} must be a number >= 0 (e.g. 1.0).")
        self.weight = float(weight)

    def __call__(self, y_true, y_pred, sample_weight=None):
        # y_true carries nothing for a KL term; None is the natural thing to pass.
        return super().__call__(0.0 if y_true is None else y_true, y_pred, sample_weight)

    def call(self, y_true, y_pred):
        mu, log_var = _posterior_parts(y_pred)
        return self.weight * gaussian_kl_per_example(mu, log_var)

    def get_config(self):
        return {**super().get_config(), "weight": self.weight}


LOSSES = {
    "ce": SparseCrossEntropy,
    "dice": DiceLoss,
    "dice_ce": DiceCrossEntropy,
    "focal": FocalLoss,
    "focal_dice": focal_dice,
}


def get(name: str, **kwargs) -> keras.losses.Loss:
    """A loss by short name: "ce" (`SparseCrossEntropy`), "dice" (`DiceLoss`), "dice_ce"
    (`DiceCrossEntropy`), "focal" (`FocalLoss`) or "focal_dice" (`focal_dice`, a
    `CombinedLoss`); `kwargs` go to that constructor."""
    check_choice("name", name, LOSSES, owner="dlmodels.losses.get")
    return LOSSES[name](**kwargs)

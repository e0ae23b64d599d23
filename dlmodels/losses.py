"""Segmentation and classification losses with an ignore index: cross-entropy, soft Dice, both.

Every loss returns one value per example (shape `(batch,)`) before Keras' reduction, so a
distributed loop can average them over the *global* batch with `tf.nn.compute_average_loss`
and get the gradients of one device on the same batch.

Ignored labels (`ignore_index`, e.g. 255 for "void" in PASCAL VOC) count nowhere: an ignored
pixel adds nothing to a loss, nothing to its normalizer, and receives a zero gradient. A label id
that is out of range and not the ignore index is a data bug; it is not silently dropped by the
losses (one-hot of an out-of-range id is all zeros, so check labels in the data pipeline).
"""

from __future__ import annotations

import keras
from keras import ops

from dlmodels._validation import check_choice


def _check_ignore_index(ignore_index, owner):
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(
            f"{owner}: `ignore_index`={ignore_index!r} must be an int label value (e.g. 255 for "
            "void pixels) or None."
        )
    return int(ignore_index)


def _check_class_weights(class_weights, owner):
    if class_weights is None:
        return None
    weights = [float(w) for w in class_weights]
    if not weights or min(weights) < 0 or max(weights) == 0:
        raise ValueError(
            f"{owner}: `class_weights`={class_weights!r} must be a non-empty sequence of "
            "non-negative floats, one per class, not all zero (e.g. inverse class frequencies)."
        )
    return weights


def _labels_and_mask(y_true, ignore_index):
    """Integer labels with ignored positions replaced by 0 (a valid id), and a float32 mask that
    is 0 exactly at the ignored positions."""
    y_true = ops.cast(y_true, "int32")
    if ignore_index is None:
        return y_true, ops.ones(ops.shape(y_true), "float32")
    keep = ops.not_equal(y_true, ignore_index)
    return ops.where(keep, y_true, ops.zeros_like(y_true)), ops.cast(keep, "float32")


def _flat_per_example(x):
    """`(B, ...)` -> `(B, N)`; a `(B,)` tensor (classification) becomes `(B, 1)`."""
    return ops.reshape(x, (ops.shape(x)[0], -1))


def sparse_cross_entropy_per_example(
    y_true, y_pred, *, from_logits=True, ignore_index=None, class_weights=None
):
    """Per-example (weighted) cross-entropy over the non-ignored positions.

    For example b with positions i (pixels, or the single position of a classifier):
    `loss_b = sum_i m_i w_{y_i} ce_i / sum_i m_i w_{y_i}`, with `ce_i = -log p_i[y_i]`, `m_i` = 0
    at ignored positions and 1 elsewhere, `w` the class weights (1 without). This is PyTorch's
    weighted `CrossEntropyLoss(ignore_index=...)` taken per example; an example with no valid
    position contributes 0.

    Args:
        y_true: integer labels `(B, ...)`.
        y_pred: logits or probabilities `(B, ..., C)`.
        from_logits: whether `y_pred` are logits.
        ignore_index: label value to ignore, or None.
        class_weights: per-class weights (length C), or None.

    Returns:
        `(B,)` float32.
    """
    y_pred = ops.cast(y_pred, "float32")
    labels, mask = _labels_and_mask(y_true, ignore_index)
    ce = ops.sparse_categorical_crossentropy(labels, y_pred, from_logits=from_logits)
    weight = mask
    if class_weights is not None:
        weight = weight * ops.take(ops.convert_to_tensor(class_weights, "float32"), labels)
    ce, weight = _flat_per_example(ce), _flat_per_example(weight)
    return ops.divide_no_nan(ops.sum(ce * weight, axis=-1), ops.sum(weight, axis=-1))


def _probabilities(y_pred, from_logits):
    y_pred = ops.cast(y_pred, "float32")
    return ops.softmax(y_pred, axis=-1) if from_logits else y_pred


def soft_dice_per_example(y_true, probs, smooth=1.0, ignore_index=None):
    """Per-example soft Dice loss `1 - mean_c dice_c` for integer labels and class probabilities.

    `dice_c = (2 * sum(p_c * t_c) + smooth) / (sum(p_c) + sum(t_c) + smooth)` over the
    non-ignored pixels of one example; `smooth` keeps a class absent from both truth and
    prediction at dice 1 (no loss) instead of 0/0. Ignored pixels are removed from both the
    prediction and the truth sums.
    """
    num_classes = probs.shape[-1]
    labels, mask = _labels_and_mask(y_true, ignore_index)
    one_hot = ops.one_hot(labels, num_classes, dtype=probs.dtype) * mask[..., None]
    probs = probs * mask[..., None]
    axes = tuple(range(1, len(probs.shape) - 1))
    intersection = ops.sum(probs * one_hot, axis=axes)
    denominator = ops.sum(probs, axis=axes) + ops.sum(one_hot, axis=axes)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    return 1.0 - ops.mean(dice, axis=-1)


@keras.saving.register_keras_serializable(package="dlmodels")
class SparseCrossEntropy(keras.losses.Loss):
    """Cross-entropy for integer labels with an ignore index and class weights, one value per
    example (the categorical cross-entropy of Long et al. 2015, "Fully Convolutional Networks
    for Semantic Segmentation", CVPR, with PASCAL VOC's void label ignored).

    Unlike `keras.losses.SparseCategoricalCrossentropy(ignore_class=...)`, whose per-pixel
    values keep ignored pixels as zeros that still count in a mean, each example here is
    normalized by its own count of valid (weighted) pixels, so `reduction=None` already gives
    the per-example values a distributed loop averages over the global batch.

    Args:
        from_logits: True when `y_pred` are logits (dlmodels models return logits).
        ignore_index: label value whose positions are ignored, or None.
        class_weights: one non-negative weight per class, or None.
        reduction, name, dtype: as in `keras.losses.Loss`.

    `y_true` holds integer class ids `(B, ...)`, `y_pred` scores `(B, ..., C)`.
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
    cross-entropy alone is dominated by the majority class.

    Args:
        from_logits: True when `y_pred` are logits (a softmax over the last axis is applied).
        smooth: additive smoothing of numerator and denominator (>= 0).
        ignore_index: label value whose pixels are excluded from every sum, or None.
        reduction, name, dtype: as in `keras.losses.Loss`.

    `y_true` holds integer class ids `(B, ...)`, `y_pred` scores `(B, ..., C)`.
    """

    def __init__(
        self,
        from_logits=False,
        smooth=1.0,
        ignore_index=None,
        reduction="sum_over_batch_size",
        name="dice_loss",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if smooth < 0:
            raise ValueError(f"DiceLoss: `smooth`={smooth!r} must be >= 0 (e.g. smooth=1.0).")
        self.from_logits = bool(from_logits)
        self.smooth = float(smooth)
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
class DiceCrossEntropy(keras.losses.Loss):
    """`ce_weight * cross-entropy + dice_weight * soft Dice`, per example.

    The combination used by nnU-Net (Isensee et al. 2021, "nnU-Net: a self-configuring method
    for deep learning-based biomedical image segmentation", Nature Methods): cross-entropy gives
    well-behaved per-pixel gradients early, Dice counters class imbalance. Both terms skip
    `ignore_index` pixels (see `SparseCrossEntropy` and `DiceLoss`).

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
        for arg, value in (("ce_weight", ce_weight), ("dice_weight", dice_weight)):
            if value < 0:
                raise ValueError(f"DiceCrossEntropy: `{arg}`={value!r} must be >= 0.")
        if smooth < 0:
            raise ValueError(f"DiceCrossEntropy: `smooth`={smooth!r} must be >= 0.")
        self.from_logits = bool(from_logits)
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.smooth = float(smooth)
        self.ignore_index = _check_ignore_index(ignore_index, "DiceCrossEntropy")
        self.class_weights = _check_class_weights(class_weights, "DiceCrossEntropy")

    def call(self, y_true, y_pred):
        ce = sparse_cross_entropy_per_example(
            y_true,
            y_pred,
            from_logits=self.from_logits,
            ignore_index=self.ignore_index,
            class_weights=self.class_weights,
        )
        probs = _probabilities(y_pred, self.from_logits)
        dice = soft_dice_per_example(y_true, probs, self.smooth, self.ignore_index)
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


LOSSES = {"ce": SparseCrossEntropy, "dice": DiceLoss, "dice_ce": DiceCrossEntropy}


def get(name: str, **kwargs) -> keras.losses.Loss:
    """A loss by short name: "ce", "dice" or "dice_ce"."""
    check_choice("name", name, LOSSES, owner="dlmodels.losses.get")
    return LOSSES[name](**kwargs)

"""Segmentation losses: soft Dice and Dice + cross-entropy.

Both return one value per example (shape `(batch,)`) before Keras' reduction, so a distributed
loop can average them over the *global* batch with `tf.nn.compute_average_loss`.
"""

from __future__ import annotations

import keras
from keras import ops

from dlmodels._validation import check_choice


def _probabilities(y_pred, from_logits):
    y_pred = ops.cast(y_pred, "float32")
    return ops.softmax(y_pred, axis=-1) if from_logits else y_pred


def soft_dice_per_example(y_true, probs, smooth=1.0):
    """Per-example soft Dice loss `1 - mean_c dice_c` for integer labels and class probabilities.

    `dice_c = (2 * sum(p_c * t_c) + smooth) / (sum(p_c) + sum(t_c) + smooth)` over the pixels
    of one example; `smooth` keeps a class absent from both truth and prediction at dice 1
    (no loss) instead of 0/0.
    """
    num_classes = probs.shape[-1]
    one_hot = ops.one_hot(ops.cast(y_true, "int32"), num_classes, dtype=probs.dtype)
    axes = tuple(range(1, len(probs.shape) - 1))
    intersection = ops.sum(probs * one_hot, axis=axes)
    denominator = ops.sum(probs, axis=axes) + ops.sum(one_hot, axis=axes)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    return 1.0 - ops.mean(dice, axis=-1)


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
        reduction, name, dtype: as in `keras.losses.Loss`.

    `y_true` holds integer class ids `(B, ...)`, `y_pred` scores `(B, ..., C)`.
    """

    def __init__(
        self,
        from_logits=False,
        smooth=1.0,
        reduction="sum_over_batch_size",
        name="dice_loss",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if smooth < 0:
            raise ValueError(f"DiceLoss: `smooth`={smooth!r} must be >= 0 (e.g. smooth=1.0).")
        self.from_logits = bool(from_logits)
        self.smooth = float(smooth)

    def call(self, y_true, y_pred):
        probs = _probabilities(y_pred, self.from_logits)
        return soft_dice_per_example(y_true, probs, self.smooth)

    def get_config(self):
        return {**super().get_config(), "from_logits": self.from_logits, "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="dlmodels")
class DiceCrossEntropy(keras.losses.Loss):
    """`ce_weight * cross-entropy + dice_weight * soft Dice`, per example.

    The combination used by nnU-Net (Isensee et al. 2021, "nnU-Net: a self-configuring method
    for deep learning-based biomedical image segmentation", Nature Methods): cross-entropy gives
    well-behaved per-pixel gradients early, Dice counters class imbalance.

    Args:
        from_logits: True when `y_pred` are logits.
        ce_weight, dice_weight: non-negative weights of the two terms.
        smooth: Dice smoothing, see `DiceLoss`.
        reduction, name, dtype: as in `keras.losses.Loss`.
    """

    def __init__(
        self,
        from_logits=True,
        ce_weight=1.0,
        dice_weight=1.0,
        smooth=1.0,
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

    def call(self, y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        y_true = ops.cast(y_true, "int32")
        ce = ops.sparse_categorical_crossentropy(y_true, y_pred, from_logits=self.from_logits)
        ce = ops.mean(ops.reshape(ce, (ops.shape(ce)[0], -1)), axis=-1)
        probs = _probabilities(y_pred, self.from_logits)
        dice = soft_dice_per_example(y_true, probs, self.smooth)
        return self.ce_weight * ce + self.dice_weight * dice

    def get_config(self):
        return {
            **super().get_config(),
            "from_logits": self.from_logits,
            "ce_weight": self.ce_weight,
            "dice_weight": self.dice_weight,
            "smooth": self.smooth,
        }


LOSSES = {"dice": DiceLoss, "dice_ce": DiceCrossEntropy}


def get(name: str, **kwargs) -> keras.losses.Loss:
    """A loss by short name: "dice" or "dice_ce"."""
    check_choice("name", name, LOSSES, owner="dlmodels.losses.get")
    return LOSSES[name](**kwargs)

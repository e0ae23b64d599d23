"""Segmentation metrics from a streaming confusion matrix: mean and per-class IoU, Dice, pixel
accuracy.

mIoU (Everingham et al. 2010, "The PASCAL Visual Object Classes (VOC) Challenge", IJCV):
`IoU_c = TP_c / (TP_c + FP_c + FN_c)` accumulated over the whole data set (not averaged per
image), then averaged over classes. A class absent from both the ground truth and the
predictions has `0/0` IoU; it is excluded from the mean (as `keras.metrics.MeanIoU` does) and
reported as NaN per class. Pixels whose label equals `ignore_index` count nowhere; any other
label outside `[0, num_classes)` raises (`dlmodels.losses.check_labels`).

The Keras metrics (`MeanIoU`, `ClassIoU`, `DiceScore`, `PixelAccuracy`) share
`ConfusionMatrixMetric`: one `(C, C)` variable with SUM aggregation (synchronization ON_READ),
so under tf.distribute each replica counts its own pixels and `result()` reads the sum over
replicas. They accept class scores `(B, ..., C)` (logits or probabilities alike: argmax is the
same, so no `from_logits` is needed) or class ids shaped like the labels.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from dlmodels._validation import check_positive_int
from dlmodels.losses import check_labels


def _check_ignore_index(ignore_index, owner):
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, int | np.integer)
    ):
        raise ValueError(
            f"{owner}: `ignore_index`={ignore_index!r} must be an int label value or None."
        )
    return None if ignore_index is None else int(ignore_index)


def confusion_matrix(y_true, y_pred, num_classes: int, ignore_index=None) -> np.ndarray:
    """`(C, C)` int64 confusion matrix, rows = truth, columns = prediction.

    `y_pred` holds class ids with `y_true`'s shape, or scores with one more trailing axis (then
    argmax is taken). Labels outside `[0, num_classes)` other than `ignore_index` raise.
    """
    num_classes = check_positive_int("num_classes", num_classes, owner="confusion_matrix")
    ignore_index = _check_ignore_index(ignore_index, "confusion_matrix")
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_pred.ndim == y_true.ndim + 1:
        y_pred = np.argmax(y_pred, axis=-1)
    if y_pred.shape != y_true.shape:
        raise ValueError(
            f"confusion_matrix: `y_pred` shape {y_pred.shape} does not match `y_true` shape "
            f"{y_true.shape} (or y_true.shape + (num_classes,) for scores)."
        )
    y_true = y_true.astype(np.int64).ravel()
    y_pred = y_pred.astype(np.int64).ravel()
    if ignore_index is not None:
        keep = y_true != ignore_index
        y_true, y_pred = y_true[keep], y_pred[keep]
    for arg, values in (("y_true", y_true), ("y_pred", y_pred)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"confusion_matrix: `{arg}` has labels in [{values.min()}, {values.max()}], "
                f"outside [0, num_classes={num_classes}). Pass ignore_index for a void label."
            )
    counts = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_from_confusion(matrix) -> tuple[float, np.ndarray]:
    """`(mean IoU, per-class IoU)` from a confusion matrix; absent classes are NaN and skipped."""
    matrix = np.asarray(matrix, np.float64)
    tp = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(union > 0, tp / union, np.nan)
    present = union > 0
    miou = float(per_class[present].mean()) if present.any() else float("nan")
    return miou, per_class


def confusion_matrix_iou(y_true, y_pred, num_classes: int, ignore_index=None):
    """Mean IoU with numpy: `(miou, per_class)`.

    Args:
        y_true: integer labels, any shape.
        y_pred: predicted class ids of the same shape, or scores with a trailing class axis.
        num_classes: number of classes C.
        ignore_index: label value whose pixels are excluded (e.g. 255 for "void").

    Returns:
        `miou` (float; NaN when no class occurs at all) and `per_class`, a float64 array of C IoUs
        with NaN for classes absent from both truth and prediction (excluded from the mean).
    """
    return iou_from_confusion(confusion_matrix(y_true, y_pred, num_classes, ignore_index))


@keras.saving.register_keras_serializable(package="dlmodels")
class ConfusionMatrixMetric(keras.metrics.Metric):
    """Base of the streaming confusion-matrix metrics: accumulates `total_cm[t, p]`, the
    (weighted) count of non-ignored pixels with label t predicted as p, over every
    `update_state` call; subclasses turn it into a number in `result()`.

    `y_pred` may be logits or probabilities `(B, ..., C)` (argmax over the last axis; C must
    equal `num_classes`) or class ids shaped like `y_true`; labels `(B, ..., 1)` with scores
    `(B, ..., C)`, C > 1, lose their size-1 axis. Labels must lie in
    `[0, num_classes)` or equal `ignore_index`, predicted ids in `[0, num_classes)`; anything
    else raises `tf.errors.InvalidArgumentError` naming the values (see
    `dlmodels.losses.check_labels`). The matrix is a variable with SUM aggregation, so under
    tf.distribute each replica accumulates its own and `result()` reads the sum.

    Args:
        num_classes: number of classes C.
        ignore_index: label value whose pixels are excluded, or None.
        accumulator_dtype: "float64" (exact counts up to 2**53 pixels) or "float32" (for TPUs;
            counts above 2**24 per cell round, a relative error below 1e-7).
        name, dtype: as in `keras.metrics.Metric`.
    """

    def __init__(
        self,
        num_classes,
        ignore_index=None,
        accumulator_dtype="float64",
        name="confusion_matrix",
        dtype=None,
    ):
        super().__init__(name=name, dtype=dtype)
        owner = type(self).__name__
        self.num_classes = check_positive_int("num_classes", num_classes, owner=owner)
        self.ignore_index = _check_ignore_index(ignore_index, owner)
        if accumulator_dtype not in ("float32", "float64"):
            raise ValueError(
                f"{owner}: `accumulator_dtype`={accumulator_dtype!r} must be 'float64' (exact "
                "counts) or 'float32' (TPUs, which have no float64)."
            )
        self.accumulator_dtype = accumulator_dtype
        self.total_cm = self.add_variable(
            shape=(self.num_classes, self.num_classes),
            initializer="zeros",
            dtype=accumulator_dtype,
            aggregation="sum",
            name="total_confusion_matrix",
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        owner = type(self).__name__
        y_true = ops.convert_to_tensor(y_true)
        y_pred = ops.convert_to_tensor(y_pred)
        c = self.num_classes
        if (
            len(y_pred.shape) == len(y_true.shape) >= 2
            and y_true.shape[-1] == 1
            and y_pred.shape[-1] not in (1, None)
        ):
            # labels (B, ..., 1) with scores (B, ..., C): drop the label's channel axis, as the
            # dlmodels losses do (`dlmodels.losses.match_label_rank`)
            y_true = ops.squeeze(y_true, axis=-1)
        if len(y_pred.shape) == len(y_true.shape) + 1:
            if y_pred.shape[-1] is not None and y_pred.shape[-1] != c:
                raise ValueError(
                    f"{owner}: `y_pred` has {y_pred.shape[-1]} class scores on its last axis "
                    f"(shape {tuple(y_pred.shape)}) but num_classes={c}. Build the metric with "
                    "the model's number of output channels."
                )
            y_pred = ops.argmax(y_pred, axis=-1)
        elif len(y_pred.shape) == len(y_true.shape):
            y_pred = check_labels(y_pred, c, None, f"{owner} (predicted class ids)")
        else:
            raise ValueError(
                f"{owner}: `y_pred` shape {tuple(y_pred.shape)} must be `y_true`'s shape "
                f"{tuple(y_true.shape)} (class ids) or that plus a class axis (scores)."
            )
        y_true = check_labels(y_true, c, self.ignore_index, owner)
        weight = None
        if sample_weight is not None:
            weight = ops.broadcast_to(ops.cast(sample_weight, "float32"), ops.shape(y_true))
            weight = ops.reshape(weight, (-1, 1))
        y_true = ops.reshape(y_true, (-1,))
        y_pred = ops.reshape(ops.cast(y_pred, "int32"), (-1,))
        # One-hot matmul instead of bincount: XLA/TPU friendly, and the ignore label (e.g. 255)
        # gets an all-zero row, so it counts nowhere. Per-batch float32 sums are exact up to
        # 2**24 pixels per cell.
        truth = ops.one_hot(y_true, c, dtype="float32")
        if self.ignore_index is not None:
            keep = ops.cast(ops.not_equal(y_true, self.ignore_index), "float32")
            truth = truth * keep[:, None]
        if weight is not None:
            truth = truth * weight
        counts = ops.matmul(ops.transpose(truth), ops.one_hot(y_pred, c, dtype="float32"))
        self.total_cm.assign(self.total_cm + ops.cast(counts, self.accumulator_dtype))

    def _counts(self):
        """(true positives, label counts, prediction counts) per class, accumulator dtype."""
        cm = ops.convert_to_tensor(self.total_cm)
        return ops.diagonal(cm), ops.sum(cm, axis=1), ops.sum(cm, axis=0)

    def result(self):
        return ops.cast(self.total_cm, self.dtype)

    def reset_state(self):
        self.total_cm.assign(ops.zeros_like(self.total_cm))

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "accumulator_dtype": self.accumulator_dtype,
        }


def _mean_over_present(values, present):
    present = ops.cast(present, values.dtype)
    return ops.divide_no_nan(ops.sum(values * present), ops.sum(present))


@keras.saving.register_keras_serializable(package="dlmodels")
class MeanIoU(ConfusionMatrixMetric):
    """Streaming mean IoU over a data set, for integer labels and class scores.

    `IoU_c = TP_c / (TP_c + FP_c + FN_c)` from the data set's confusion matrix, averaged over
    the classes present in the truth or the predictions (absent ones are 0/0 and excluded, as in
    `keras.metrics.MeanIoU`). `result_per_class()` gives the C IoUs (NaN for absent classes) for
    a report; `ClassIoU` logs one class as a scalar metric. Input handling, ignore index, label
    checks and tf.distribute behaviour: see `ConfusionMatrixMetric`.

    Args:
        num_classes: number of classes C.
        ignore_index: label value whose pixels are excluded, or None. Other labels outside
            `[0, num_classes)` raise `tf.errors.InvalidArgumentError`.
        accumulator_dtype: "float64" (exact counts up to 2**53 pixels) or "float32" (for TPUs;
            counts above 2**24 per cell round, a relative error below 1e-7).
        name, dtype: as in `keras.metrics.Metric`.
    """

    def __init__(
        self,
        num_classes,
        ignore_index=None,
        accumulator_dtype="float64",
        name="mean_iou",
        dtype=None,
    ):
        super().__init__(num_classes, ignore_index, accumulator_dtype, name=name, dtype=dtype)

    def _iou(self):
        tp, truth, pred = self._counts()
        union = truth + pred - tp
        return ops.divide_no_nan(tp, union), union > 0

    def result(self):
        iou, present = self._iou()
        return ops.cast(_mean_over_present(iou, present), self.dtype)

    def result_per_class(self):
        """`(C,)` IoU per class in the metric's dtype, NaN for classes absent from both the
        labels and the predictions so far."""
        iou, present = self._iou()
        return ops.cast(ops.where(present, iou, float("nan")), self.dtype)


@keras.saving.register_keras_serializable(package="dlmodels")
class ClassIoU(ConfusionMatrixMetric):
    """Streaming IoU of one class, `TP_k / (TP_k + FP_k + FN_k)` over the data set: a scalar,
    so the Trainer logs it next to the loss (one metric per class; `per_class_iou` builds them).
    NaN while class k has appeared in neither the labels nor the predictions.

    Each instance keeps its own `(C, C)` confusion matrix (the shared update of
    `ConfusionMatrixMetric`); for many classes, `MeanIoU.result_per_class()` reads all IoUs from
    one matrix.

    Args:
        num_classes: number of classes C.
        class_id: the class k in `[0, num_classes)`.
        ignore_index, accumulator_dtype: see `ConfusionMatrixMetric`.
        name: defaults to "iou_<class_id>".
        dtype: as in `keras.metrics.Metric`.
    """

    def __init__(
        self,
        num_classes,
        class_id,
        ignore_index=None,
        accumulator_dtype="float64",
        name=None,
        dtype=None,
    ):
        num_classes = check_positive_int("num_classes", num_classes, owner="ClassIoU")
        if (
            isinstance(class_id, bool)
            or not isinstance(class_id, int | np.integer)
            or not 0 <= class_id < num_classes
        ):
            raise ValueError(
                f"ClassIoU: `class_id`={class_id!r} must be an int in [0, num_classes="
                f"{num_classes})."
            )
        self.class_id = int(class_id)
        super().__init__(
            num_classes,
            ignore_index,
            accumulator_dtype,
            name=name or f"iou_{self.class_id}",
            dtype=dtype,
        )

    def result(self):
        tp, truth, pred = self._counts()
        k = self.class_id
        union = truth[k] + pred[k] - tp[k]
        iou = ops.where(union > 0, ops.divide_no_nan(tp[k], union), float("nan"))
        return ops.cast(iou, self.dtype)

    def get_config(self):
        return {**super().get_config(), "class_id": self.class_id}


def per_class_iou(num_classes, ignore_index=None, class_names=None, accumulator_dtype="float64"):
    """One `ClassIoU` per class, named "iou_<class name or id>", e.g. for
    `Trainer(..., metrics=[MeanIoU(C), *per_class_iou(C)])`."""
    num_classes = check_positive_int("num_classes", num_classes, owner="per_class_iou")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(
            f"per_class_iou: `class_names` has {len(class_names)} names for "
            f"num_classes={num_classes}. Give one name per class or None."
        )
    names = class_names if class_names is not None else range(num_classes)
    return [
        ClassIoU(num_classes, k, ignore_index, accumulator_dtype, name=f"iou_{name}")
        for k, name in enumerate(names)
    ]


@keras.saving.register_keras_serializable(package="dlmodels")
class DiceScore(ConfusionMatrixMetric):
    """Streaming mean Dice coefficient (F1 score) over classes from the confusion matrix:
    `Dice_c = 2 TP_c / (2 TP_c + FP_c + FN_c)` (Dice 1945, "Measures of the Amount of Ecologic
    Association Between Species", Ecology), accumulated over the data set and averaged over the
    classes present in the labels or the predictions (absent ones are 0/0 and excluded, as in
    `MeanIoU`). It is the hard-decision counterpart of `dlmodels.losses.DiceLoss`.

    Args: as `MeanIoU`; `name` defaults to "dice".
    """

    def __init__(
        self,
        num_classes,
        ignore_index=None,
        accumulator_dtype="float64",
        name="dice",
        dtype=None,
    ):
        super().__init__(num_classes, ignore_index, accumulator_dtype, name=name, dtype=dtype)

    def result(self):
        tp, truth, pred = self._counts()
        total = truth + pred
        dice = ops.divide_no_nan(2.0 * tp, total)
        return ops.cast(_mean_over_present(dice, total > 0), self.dtype)


@keras.saving.register_keras_serializable(package="dlmodels")
class PixelAccuracy(ConfusionMatrixMetric):
    """Streaming pixel accuracy, `sum_c TP_c / N` over the non-ignored pixels (the "pixel
    accuracy" of Long et al. 2015, "Fully Convolutional Networks for Semantic Segmentation",
    CVPR). Ignored pixels count in neither numerator nor denominator (a plain
    `keras.metrics.SparseCategoricalAccuracy` would count them as wrong); 0 before any pixel.

    Args: as `MeanIoU`; `name` defaults to "pixel_accuracy".
    """

    def __init__(
        self,
        num_classes,
        ignore_index=None,
        accumulator_dtype="float64",
        name="pixel_accuracy",
        dtype=None,
    ):
        super().__init__(num_classes, ignore_index, accumulator_dtype, name=name, dtype=dtype)

    def result(self):
        tp, truth, _ = self._counts()
        return ops.cast(ops.divide_no_nan(ops.sum(tp), ops.sum(truth)), self.dtype)


@keras.saving.register_keras_serializable(package="dlmodels")
class MeanGaussianKL(keras.metrics.Mean):
    """Streaming mean of the closed-form KL(q(z|x) || N(0, I)) of a diagonal Gaussian posterior
    (Kingma & Welling 2014, "Auto-Encoding Variational Bayes", ICLR), per example, in nats.

    `update_state(mu, log_var, sample_weight=None)`, or `update_state(None, (mu, log_var))` /
    `update_state(None, concat([mu, log_var], -1))` in the `(y_true, y_pred)` form of
    `compile(metrics=...)`.
    """

    def __init__(self, name="gaussian_kl", dtype=None):
        super().__init__(name=name, dtype=dtype)

    def update_state(self, mu, log_var=None, sample_weight=None):
        from dlmodels.losses import _posterior_parts, gaussian_kl_per_example

        if mu is None or log_var is None or isinstance(log_var, list | tuple):
            pred = log_var if mu is None else mu
            mu, log_var = _posterior_parts(pred)
        return super().update_state(
            gaussian_kl_per_example(mu, log_var), sample_weight=sample_weight
        )

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}

"""Segmentation metrics: mean intersection-over-union from a confusion matrix.

mIoU (Everingham et al. 2010, "The PASCAL Visual Object Classes (VOC) Challenge", IJCV):
`IoU_c = TP_c / (TP_c + FP_c + FN_c)` accumulated over the whole data set (not averaged per
image), then averaged over classes. A class absent from both the ground truth and the
predictions has `0/0` IoU; it is excluded from the mean (as `keras.metrics.MeanIoU` does) and
reported as NaN per class. Pixels whose label equals `ignore_index` count nowhere.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from dlmodels._validation import check_positive_int


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
class MeanIoU(keras.metrics.Metric):
    """Streaming mean IoU over a data set, for integer labels and class scores.

    `y_pred` may be logits or probabilities `(B, ..., C)` (argmax is taken; the two agree) or
    class ids shaped like `y_true`. The confusion matrix is a variable with SUM aggregation, so
    under tf.distribute each replica accumulates its own and `result()` reads the sum. Classes
    absent from truth and prediction are excluded from the mean, as in `keras.metrics.MeanIoU`.

    Args:
        num_classes: number of classes C.
        ignore_index: label value whose pixels are excluded, or None. Other labels outside
            `[0, num_classes)` are dropped too (the numpy `confusion_matrix_iou` raises instead).
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
        super().__init__(name=name, dtype=dtype)
        self.num_classes = check_positive_int("num_classes", num_classes, owner="MeanIoU")
        self.ignore_index = _check_ignore_index(ignore_index, "MeanIoU")
        if accumulator_dtype not in ("float32", "float64"):
            raise ValueError(
                f"MeanIoU: `accumulator_dtype`={accumulator_dtype!r} must be 'float64' (exact "
                "counts) or 'float32' (TPUs, which have no float64)."
            )
        self.accumulator_dtype = accumulator_dtype
        self.total_cm = self.add_variable(
            shape=(self.num_classes, self.num_classes),
            initializer="zeros",
            dtype=accumulator_dtype,
            name="total_confusion_matrix",
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = ops.convert_to_tensor(y_true)
        y_pred = ops.convert_to_tensor(y_pred)
        if len(y_pred.shape) == len(y_true.shape) + 1:
            y_pred = ops.argmax(y_pred, axis=-1)
        c = self.num_classes
        y_true = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        y_pred = ops.reshape(ops.cast(y_pred, "int32"), (-1,))
        # One-hot matmul instead of bincount: XLA/TPU friendly, and labels outside [0, C)
        # (e.g. a void label 255) get all-zero rows, so they count nowhere. Per-batch float32
        # sums are exact up to 2**24 pixels per cell.
        truth = ops.one_hot(y_true, c, dtype="float32")
        if self.ignore_index is not None:
            keep = ops.cast(ops.not_equal(y_true, self.ignore_index), "float32")
            truth = truth * keep[:, None]
        if sample_weight is not None:
            weight = ops.broadcast_to(ops.cast(sample_weight, "float32"), ops.shape(y_true))
            truth = truth * ops.reshape(weight, (-1, 1))
        counts = ops.matmul(ops.transpose(truth), ops.one_hot(y_pred, c, dtype="float32"))
        self.total_cm.assign(self.total_cm + ops.cast(counts, self.accumulator_dtype))

    def result(self):
        cm = self.total_cm
        tp = ops.diagonal(cm)
        union = ops.sum(cm, axis=0) + ops.sum(cm, axis=1) - tp
        present = ops.cast(union > 0, cm.dtype)
        iou = ops.divide_no_nan(tp, union)
        miou = ops.divide_no_nan(ops.sum(iou * present), ops.sum(present))
        return ops.cast(miou, self.dtype)

    def reset_state(self):
        self.total_cm.assign(ops.zeros_like(self.total_cm))

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "accumulator_dtype": self.accumulator_dtype,
        }


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

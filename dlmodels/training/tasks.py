"""Tasks: what one training step of a model family computes, apart from the loop around it.

A `Task` owns its model(s), optimizer(s) and metrics, defines `train_step(batch, ctx)` and
`eval_step(batch, ctx)` (run on every replica; `ctx` is a `StepContext` with the distributed
maths), and names what goes into a checkpoint. The `Trainer` owns the loop: distribution,
checkpoints, logging and progress. So one loop trains a segmentation network
(`SupervisedTask`), a variational auto-encoder (`VAETask`) and a two-optimizer GAN (`GANTask`)
under every strategy.

Noise a step draws (the VAE's epsilon, the GAN's z) comes from `ctx.normal(...)`: drawn
statelessly for the whole global batch from (task seed, optimizer step), each replica slicing
its own rows, so N replicas draw exactly what one device draws, and no two replicas share rows.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from dlmodels._validation import check_choice
from dlmodels.metrics import MeanIoU, PixelAccuracy
from dlmodels.models.outputs import output_kind

SUPERVISED_TASKS = ("segmentation", "classification")
LIKELIHOODS = ("bernoulli", "gaussian")
GAN_LOSSES = ("non_saturating", "minimax", "wgan_gp")


def _first_output(outputs):
    if isinstance(outputs, dict):
        return next(iter(outputs.values()))
    if isinstance(outputs, list | tuple):
        return outputs[0]
    return outputs


MAIN_OUTPUT_NAME = "logits"
# An image-level "is anything but background present" output (UNet 3+'s classification-guided
# module): (batch, 2) scores for [absent, present].
PRESENCE_OUTPUT_NAME = "cgm"


def main_output_index(model) -> int:
    """Index of the output a multi-output model predicts with: the one named "logits" when
    there is one (deep-supervision models name their other heads "logits_<k>"), else the
    first."""
    names = list(getattr(model, "output_names", None) or [])
    return names.index(MAIN_OUTPUT_NAME) if MAIN_OUTPUT_NAME in names else 0


def _as_output_list(outputs) -> list:
    if isinstance(outputs, dict):
        return [next(iter(outputs.values()))]
    if isinstance(outputs, list | tuple):
        return list(outputs)
    return [outputs]


def _check_seed(seed, owner):
    if seed is None:
        return 0
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{owner}: `seed`={seed!r} must be a non-negative int (e.g. seed=0).")
    return int(seed)


def _check_model(model, name, owner):
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"{owner}: `{name}` must be a keras.Model, got {type(model).__name__}. Build it "
            "with the functional API (e.g. dlmodels.models.get(...))."
        )
    return model


def resolve_optimizer(optimizer, strategy, *, mixed, owner, name="optimizer", default=None):
    """An optimizer ready for `strategy`: None -> `default()` (Adam(1e-3)), a name -> Keras'
    optimizer, checked to be created under the strategy and wrapped in `LossScaleOptimizer`
    when `mixed` (float16 compute)."""
    if optimizer is None:
        optimizer = default() if default is not None else keras.optimizers.Adam(1e-3)
    elif isinstance(optimizer, str):
        optimizer = keras.optimizers.get(optimizer)
    elif not isinstance(optimizer, keras.optimizers.Optimizer):
        raise ValueError(
            f"{owner}: `{name}`={optimizer!r} must be a keras optimizer, a name or None."
        )
    # Keras' TF optimizer records the strategy it was created under and all-reduces through it;
    # one made outside the scope would silently skip the cross-replica gradient sum.
    made_under = getattr(optimizer, "_distribution_strategy", strategy)
    if made_under is not strategy:
        raise ValueError(
            f"{owner}: the {name} was created outside the Trainer's strategy scope. Create "
            f"it inside `with strategy.scope():` (or pass {name}=None / a name)."
        )
    if mixed and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


class Task:
    """Base class: the models, optimizers, metrics and step functions of one kind of training.

    Subclasses set up their models in `__init__`, create optimizers and metrics in
    `build(strategy)` (called by the Trainer under the strategy's scope), and implement
    `train_step` / `eval_step`. A step returns a dict of scalar float32 logs, each a
    contribution that sums over replicas to the global-batch value (what `ctx.average_loss`
    returns).

    Args:
        seed: seed of the task's own noise (VAE epsilon, GAN latents).
    """

    name = "task"

    def __init__(self, seed=None):
        self.seed = _check_seed(seed, type(self).__name__)
        self.strategy = None
        self.metrics = []

    # -- what the Trainer reads --------------------------------------------------------------
    @property
    def models(self) -> dict:
        """Name -> Keras model, every model the task trains (for BN sync, seed folding and
        strategy checks)."""
        raise NotImplementedError

    @property
    def optimizers(self) -> dict:
        """Name -> optimizer (available after `build`)."""
        raise NotImplementedError

    def checkpoint_items(self) -> dict:
        """Name -> trackable saved in checkpoints: the models and the optimizers."""
        return {**self.models, **self.optimizers}

    def build(self, strategy):
        """Create optimizers and metrics under `strategy.scope()` and check the models were
        built under it. Called by the Trainer; a second call with the same strategy keeps the
        optimizers (and their state)."""
        if self.strategy is strategy:
            return
        if self.strategy is not None:
            raise ValueError(
                f"{type(self).__name__}: already built for another strategy; create a new task "
                "for a new Trainer strategy."
            )
        extended = strategy.extended
        for name, model in self.models.items():
            for v in model.weights:
                if not extended.variable_created_in_scope(getattr(v, "value", v)):
                    raise ValueError(
                        f"Trainer: the {name}'s variable {v.path!r} was not created under the "
                        f"Trainer's strategy ({type(strategy).__name__}). Build the model "
                        "inside `with strategy.scope():` and pass the same strategy to Trainer."
                    )
        self.strategy = strategy
        with strategy.scope():
            self._build_in_scope(strategy)
            for optimizer, variables in self._optimized_variables():
                # Built here, in cross-replica context, so slot variables are mirrored and
                # exist before a checkpoint restore.
                if not optimizer.built:
                    optimizer.build(variables)

    def _build_in_scope(self, strategy):
        raise NotImplementedError

    def _optimized_variables(self):
        """(optimizer, trainable variables) pairs to build."""
        raise NotImplementedError

    def train_step(self, batch, ctx) -> dict:
        """One replica's training step on its part of the global batch; returns logs."""
        raise NotImplementedError

    def eval_step(self, batch, ctx) -> dict:
        """One replica's evaluation step (no updates); returns logs like `train_step`."""
        raise NotImplementedError

    def reset_metrics(self):
        for metric in self.metrics:
            metric.reset_state()

    def metric_logs(self) -> dict:
        return {m.name: float(m.result()) for m in self.metrics}


# -- supervised ------------------------------------------------------------------------------
def _loss_from_logits(loss):
    """The loss' `from_logits` flag, or None when it has none."""
    if hasattr(loss, "from_logits"):
        return bool(loss.from_logits)
    if isinstance(loss, keras.losses.Loss):
        try:
            value = loss.get_config().get("from_logits")
        except (NotImplementedError, TypeError, AttributeError):
            value = None
        return None if value is None else bool(value)
    return None


def _named_cross_entropy(loss):
    """(family, constructor) when `loss` is a cross-entropy named by a string or given as a bare
    Keras loss function (no `from_logits` chosen by the caller), else None. family: "softmax"
    (needs logits or softmax outputs), "binary" or "dlmodels"; constructor None means sparse
    categorical cross-entropy (built as `dlmodels.losses.SparseCrossEntropy`)."""
    from dlmodels import losses as dl_losses

    if isinstance(loss, str):
        if loss in dl_losses.LOSSES:
            return "dlmodels", dl_losses.LOSSES[loss]
        try:
            resolved = keras.losses.get(loss)
        except ValueError:
            return None
        # A class name ("SparseCategoricalCrossentropy") gives an instance with Keras'
        # default from_logits=False; the caller chose nothing either way.
        loss = getattr(resolved, "fn", resolved)
    if not callable(loss) or isinstance(loss, keras.losses.Loss):
        return None
    table = {
        keras.losses.sparse_categorical_crossentropy: ("softmax", None),
        keras.losses.categorical_crossentropy: ("softmax", keras.losses.CategoricalCrossentropy),
        keras.losses.categorical_focal_crossentropy: (
            "softmax",
            keras.losses.CategoricalFocalCrossentropy,
        ),
        keras.losses.binary_crossentropy: ("binary", keras.losses.BinaryCrossentropy),
        keras.losses.binary_focal_crossentropy: ("binary", keras.losses.BinaryFocalCrossentropy),
    }
    for function, entry in table.items():
        if loss is function:
            return entry
    return None


def _check_logits_convention(loss, kind, owner):
    from_logits = _loss_from_logits(loss)
    if from_logits is None or kind == "unknown":
        return
    name = type(loss).__name__
    if from_logits and kind in ("softmax", "sigmoid"):
        raise ValueError(
            f"{owner}: `loss`={name}(from_logits=True) but the model's output already applies "
            f"a {kind} (output_kind={kind!r}), which would apply it twice. Pass "
            f"{name}(from_logits=False), or build the model to return logits (e.g. "
            "classifier_activation=None / final_activation=None; dlmodels models return logits "
            "by default)."
        )
    if not from_logits and kind == "logits":
        raise ValueError(
            f"{owner}: `loss`={name}(from_logits=False) but the model returns logits "
            "(output_kind='logits'), so the loss would read raw scores as probabilities. Pass "
            f"{name}(from_logits=True), or give the model a softmax output."
        )


class _SingleModelTask:
    """Shared building for a task that trains one ``self.model`` with one optimizer.

    Needs ``self.model``, ``self._optimizer_arg`` and ``self.optimizer`` (``None`` until
    built); a subclass supplies ``_build_metrics(strategy)``.
    """

    @property
    def models(self):
        return {"model": self.model}

    @property
    def optimizers(self):
        return {} if self.optimizer is None else {"optimizer": self.optimizer}

    def _optimized_variables(self):
        return [(self.optimizer, self.model.trainable_variables)]

    def _build_in_scope(self, strategy):
        self.optimizer = resolve_optimizer(
            self._optimizer_arg,
            strategy,
            mixed=self.model.compute_dtype == "float16",
            owner="Trainer",
        )
        self.metrics = self._build_metrics(strategy)


class SupervisedTask(_SingleModelTask, Task):
    """Supervised training of one model on `(inputs, labels)` batches: segmentation or
    classification with integer labels and an optional ignore index.

    The loss is computed per example (a mean over that example's non-ignored pixels for
    segmentation), averaged over the global batch. Ignore-index semantics: each example is
    normalised by its own valid-pixel count, and the global-batch mean counts every example,
    so an example whose pixels are all ignored contributes 0 yet still counts in the
    denominator. PyTorch's `CrossEntropyLoss(ignore_index=...)` instead divides the sum over
    the batch by the batch's valid-pixel count (examples with more valid pixels weigh more);
    the two agree when every example has the same number of valid pixels.

    The default loss is `dlmodels.losses.SparseCrossEntropy` with `from_logits` read off the
    model (`dlmodels.models.outputs.output_kind`); when the output kind is "unknown" there is no
    default and an explicit loss is required. A given loss instance whose `from_logits`
    contradicts the model's output raises, so a softmax is never applied twice. A
    cross-entropy given by name ("sparse_categorical_crossentropy", "categorical_crossentropy",
    "binary_crossentropy", the focal variants, Keras' class names, dlmodels' "ce" / "dice" /
    "dice_ce") or as the bare Keras function (`keras.losses.sparse_categorical_crossentropy`)
    carries no `from_logits` of the caller's, so it is built with `from_logits` from the
    model's output kind (sparse categorical cross-entropy as the ignore-aware
    `SparseCrossEntropy`), and refused when the kind is "unknown". Keras'
    `SparseCategoricalCrossentropy(ignore_class=k)` (whose per-pixel zeros would still count in
    a mean) is converted to `SparseCrossEntropy(ignore_index=k)`.

    Args:
        model: a Keras model; outputs `(B, H, W, C)` scores for segmentation, `(B, C)` for
            classification (the first output of a multi-output model).
        task: "segmentation" (labels `(B, H, W)`) or "classification" (labels `(B,)`).
        loss: a `keras.losses.Loss`, loss name or callable `(y_true, y_pred) -> values`, None
            for the default. Per-position values are averaged over each example's non-ignored
            positions.
        optimizer: a Keras optimizer created under the Trainer's strategy scope, a name, or
            None for `Adam(1e-3)`.
        metrics: Keras metrics created under the strategy's scope, or None: `MeanIoU` and pixel
            accuracy for segmentation, accuracy for classification.
        ignore_index: label value (e.g. 255) excluded from the loss and the metrics, or None.
        seed: unused by this task (kept for the common signature).
        deep_supervision: "auto" (default): when the model has several outputs shaped like its
            main output (the one named "logits", else the first), e.g. UNet++ / UNet 3+ with
            `deep_supervision=True`, the training loss is the mean of the loss over all of them
            (Lee et al. 2015, "Deeply-Supervised Nets"; the UNet++ and UNet 3+ papers); False
            trains the main output only. Metrics and the validation loss always read the main
            output, the one a deployment predicts with. An output named "cgm" (UNet 3+'s
            classification-guided module, (batch, 2) sigmoid scores for [absent, present]) is
            trained jointly with binary cross-entropy against "the mask holds a pixel other than
            background (0) and the ignore index" (Huang et al. 2020, section 2.3); other
            outputs are not supervised by this task.

    Raises:
        ValueError: unknown `task`, a loss whose `from_logits` contradicts the model's output,
            a sigmoid output with the default loss, no loss (or a loss by name) for a model
            whose output kind is "unknown", or an ignore index the loss disagrees with.
    """

    name = "supervised"

    def __init__(
        self,
        model,
        task="segmentation",
        loss=None,
        optimizer=None,
        metrics=None,
        ignore_index=None,
        seed=None,
        deep_supervision="auto",
    ):
        super().__init__(seed=seed)
        self.task = check_choice("task", task, SUPERVISED_TASKS, owner="SupervisedTask")
        self.model = _check_model(model, "model", "SupervisedTask")
        check_choice("deep_supervision", deep_supervision, ("auto", False), owner="SupervisedTask")
        self.main_output = main_output_index(model)
        self.heads = self._supervised_heads(deep_supervision == "auto")
        names = list(getattr(model, "output_names", None) or [])
        self.presence_output = (
            names.index(PRESENCE_OUTPUT_NAME)
            if self.task == "segmentation" and PRESENCE_OUTPUT_NAME in names
            else None
        )
        if ignore_index is not None and (
            isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
        ):
            raise ValueError(
                f"SupervisedTask: `ignore_index`={ignore_index!r} must be an int label value "
                "(e.g. 255 for void pixels) or None."
            )
        self.ignore_index = ignore_index
        kinds = output_kind(model)
        self.output_kind = kinds[self.main_output] if isinstance(kinds, list) else kinds
        self._optimizer_arg = optimizer
        self._metrics_arg = metrics
        self.optimizer = None
        self.loss, self._ignore_aware = self._resolve_loss(loss)
        if isinstance(self.loss, keras.losses.Loss):
            self.loss = type(self.loss).from_config({**self.loss.get_config(), "reduction": None})
        if not callable(self.loss):
            raise ValueError(
                f"SupervisedTask: `loss`={loss!r} is not a keras.losses.Loss, loss name or "
                "callable."
            )

    def _supervised_heads(self, deep) -> list[int]:
        """Output indices the loss supervises: the main output, plus (deep supervision) every
        output of the same rank and class count."""
        outputs = list(self.model.outputs or [])
        if not deep or len(outputs) < 2:
            return [self.main_output]
        main = outputs[self.main_output].shape
        return [
            i
            for i, t in enumerate(outputs)
            if len(t.shape) == len(main) and t.shape[-1] == main[-1]
        ]

    # -- loss --------------------------------------------------------------------------------
    def _resolve_loss(self, loss):
        """(loss, handles ignore_index itself)."""
        from dlmodels import losses as dl_losses

        owner = "SupervisedTask"
        kind = self.output_kind
        if loss is None:
            if kind == "sigmoid":
                raise ValueError(
                    f"{owner}: the model ends in a sigmoid (independent per-class "
                    "probabilities); the default sparse cross-entropy needs logits or a "
                    "softmax. Pass loss=keras.losses.BinaryCrossentropy(from_logits=False) for "
                    "binary / multi-label targets, or build the model to return logits."
                )
            if kind == "unknown":
                raise ValueError(
                    f"{owner}: cannot tell whether the model returns logits or probabilities "
                    "(output_kind='unknown': its output is not produced by a layer with a "
                    "linear / softmax / sigmoid activation), so the default loss cannot pick "
                    "`from_logits`. Pass an explicit loss, e.g. "
                    "loss=dlmodels.losses.SparseCrossEntropy(from_logits=True) for logits or "
                    "from_logits=False for softmax probabilities."
                )
            loss = dl_losses.SparseCrossEntropy(
                from_logits=kind != "softmax", ignore_index=self.ignore_index
            )
            return loss, True
        named = _named_cross_entropy(loss)
        if named is not None:
            # A name or a bare Keras function carries no `from_logits` the user chose (Keras'
            # default is False): build the loss for what the model outputs.
            return self._cross_entropy_for_model(loss, *named)
        if isinstance(loss, str):
            loss = keras.losses.get(loss)
        _check_logits_convention(loss, kind, owner)
        if isinstance(loss, keras.losses.SparseCategoricalCrossentropy):
            config = loss.get_config()
            ignore = self._agree_ignore(config.get("ignore_class"), "ignore_class", loss)
            return (
                dl_losses.SparseCrossEntropy(
                    from_logits=bool(config.get("from_logits", False)), ignore_index=ignore
                ),
                True,
            )
        if hasattr(loss, "ignore_index") and isinstance(loss, keras.losses.Loss):
            ignore = self._agree_ignore(loss.ignore_index, "ignore_index", loss)
            if ignore != loss.ignore_index:
                loss = type(loss).from_config({**loss.get_config(), "ignore_index": ignore})
            return loss, True
        return loss, False

    def _cross_entropy_for_model(self, given, family, make):
        """(loss, handles ignore_index) for a cross-entropy given by name or as a Keras
        function, with `from_logits` from the model's output kind."""
        from dlmodels import losses as dl_losses

        kind = self.output_kind
        shown = given if isinstance(given, str) else getattr(given, "__name__", repr(given))
        if kind == "unknown" or (kind == "sigmoid" and family != "binary"):
            why = (
                "cannot tell whether the model returns logits or probabilities "
                "(output_kind='unknown')"
                if kind == "unknown"
                else "the model ends in a sigmoid, which this softmax-based loss cannot read"
            )
            raise ValueError(
                f"SupervisedTask: `loss`={shown!r} is given by name, so `from_logits` must come "
                f"from the model, but {why}. Pass a loss instance with an explicit "
                "`from_logits`, e.g. loss=dlmodels.losses.SparseCrossEntropy(from_logits=True) "
                "or keras.losses.BinaryCrossentropy(from_logits=False)."
            )
        from_logits = kind == "logits"
        if make is None:  # sparse categorical cross-entropy: the ignore-aware dlmodels one
            make, family = dl_losses.SparseCrossEntropy, "dlmodels"
        if family == "dlmodels":
            return make(from_logits=from_logits, ignore_index=self.ignore_index), True
        return make(from_logits=from_logits), False

    def _agree_ignore(self, value, argument, loss):
        if value is None:
            return self.ignore_index
        if self.ignore_index is not None and value != self.ignore_index:
            raise ValueError(
                f"SupervisedTask: `ignore_index`={self.ignore_index!r} but the loss "
                f"{type(loss).__name__} has `{argument}`={value!r}. Give the same value to both "
                "(or set it on one of them only)."
            )
        if self.ignore_index is None:
            self.ignore_index = int(value)
        return int(value)

    def _labels_and_mask(self, y):
        y = tf.cast(y, tf.int32)
        if self.ignore_index is None:
            return y, None
        keep = tf.not_equal(y, self.ignore_index)
        return tf.where(keep, y, tf.zeros_like(y)), tf.cast(keep, tf.float32)

    def per_example_loss(self, y, pred):
        """Loss values `(batch,)`: per-position values averaged over each example's
        non-ignored positions."""
        pred = tf.cast(pred, tf.float32)
        if self._ignore_aware:
            values = tf.cast(self.loss(y, pred), tf.float32)
            mask = None
        else:
            labels, mask = self._labels_and_mask(y)
            values = tf.cast(self.loss(labels if mask is not None else y, pred), tf.float32)
        rank = values.shape.rank
        if mask is None:
            if rank is not None and rank > 1:
                values = tf.reduce_mean(values, axis=list(range(1, rank)))
            return values
        if rank != mask.shape.rank:
            raise ValueError(
                f"SupervisedTask: with ignore_index={self.ignore_index} the loss "
                f"{getattr(self.loss, '__name__', type(self.loss).__name__)} must return one "
                f"value per label position (shape {mask.shape}), got shape {values.shape}. "
                "Use dlmodels.losses.SparseCrossEntropy / DiceCrossEntropy(ignore_index=...)."
            )
        if rank == 1:
            return values * mask
        axes = list(range(1, rank))
        return tf.math.divide_no_nan(
            tf.reduce_sum(values * mask, axis=axes), tf.reduce_sum(mask, axis=axes)
        )

    def presence_loss(self, y, scores):
        """Per-example binary cross-entropy of a (batch, 2) [absent, present] output against
        whether each mask holds a foreground pixel (a label other than 0 and the ignore
        index); sigmoid probabilities or, when that output is linear, logits."""
        y = tf.cast(y, tf.int32)
        foreground = tf.not_equal(y, 0)
        if self.ignore_index is not None:
            foreground = tf.logical_and(foreground, tf.not_equal(y, self.ignore_index))
        axes = list(range(1, y.shape.rank))
        present = tf.cast(tf.reduce_any(foreground, axis=axes), tf.int32)
        target = tf.one_hot(present, 2, dtype=tf.float32)
        scores = tf.cast(scores, tf.float32)
        kinds = output_kind(self.model)
        if kinds[self.presence_output] == "logits":
            values = tf.nn.sigmoid_cross_entropy_with_logits(labels=target, logits=scores)
        else:
            p = tf.clip_by_value(scores, 1e-7, 1.0 - 1e-7)
            values = -(target * tf.math.log(p) + (1.0 - target) * tf.math.log(1.0 - p))
        return tf.reduce_mean(values, axis=-1)

    # -- building ----------------------------------------------------------------------------
    def _build_metrics(self, strategy):
        return self._make_metrics(self._metrics_arg, strategy)

    def _num_classes(self):
        outputs = self.model.outputs or [None]
        channels = outputs[self.main_output]
        if channels is None or channels.shape[-1] is None:
            raise ValueError(
                "Trainer: cannot infer num_classes from the model's outputs; pass `metrics=` "
                "explicitly."
            )
        return int(channels.shape[-1])

    def _make_metrics(self, metrics, strategy):
        if metrics is not None:
            return list(metrics)
        if self.task == "segmentation":
            tpu = isinstance(strategy, tf.distribute.TPUStrategy)  # TPUs have no float64
            return [
                MeanIoU(
                    self._num_classes(),
                    ignore_index=self.ignore_index,
                    accumulator_dtype="float32" if tpu else "float64",
                    name="mean_iou",
                ),
                PixelAccuracy(
                    self._num_classes(),
                    ignore_index=self.ignore_index,
                    accumulator_dtype="float32" if tpu else "float64",
                    name="pixel_accuracy",
                ),
            ]
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]

    def _update_metrics(self, y, pred):
        labels, mask = self._labels_and_mask(y)
        for metric in self.metrics:
            if mask is None or getattr(metric, "ignore_index", None) == self.ignore_index:
                metric.update_state(y, pred)
            else:
                metric.update_state(labels, pred, sample_weight=mask)

    # -- steps -------------------------------------------------------------------------------
    @staticmethod
    def _unpack(batch):
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise ValueError(
                "SupervisedTask: batches must be (inputs, labels) pairs; got "
                f"{type(batch).__name__}. Map the dataset to (x, y) tuples."
            )
        return batch

    def train_step(self, batch, ctx):
        x, y = self._unpack(batch)
        with tf.GradientTape() as tape:
            outputs = _as_output_list(self.model(x, training=True))
            per_example = tf.add_n([self.per_example_loss(y, outputs[i]) for i in self.heads])
            per_example = per_example / float(len(self.heads))
            if self.presence_output is not None:
                per_example += self.presence_loss(y, outputs[self.presence_output])
            loss = ctx.average_loss(per_example)
            loss += ctx.regularization_loss(self.model)
        ctx.minimize(tape, loss, self.model.trainable_variables, self.optimizer)
        pred = outputs[self.main_output if len(outputs) > 1 else 0]
        self._update_metrics(y, tf.cast(pred, tf.float32))
        return {"loss": loss}

    def eval_step(self, batch, ctx):
        x, y = self._unpack(batch)
        outputs = _as_output_list(self.model(x, training=False))
        pred = tf.cast(outputs[self.main_output if len(outputs) > 1 else 0], tf.float32)
        self._update_metrics(y, pred)
        return {"loss": ctx.average_loss(self.per_example_loss(y, pred))}


# -- generative ------------------------------------------------------------------------------
def _inputs_only(batch):
    """`x` from `x` or `(x, labels)` batches."""
    if isinstance(batch, tuple | list):
        return batch[0]
    return batch


def _sum_per_example(values):
    values = tf.cast(values, tf.float32)
    rank = values.shape.rank
    return tf.reduce_sum(values, axis=list(range(1, rank))) if rank and rank > 1 else values


class VAETask(Task):
    """Variational auto-encoder training: maximise the evidence lower bound (Kingma & Welling
    2014, "Auto-Encoding Variational Bayes", ICLR).

    Per example, loss = -ELBO = reconstruction negative log-likelihood summed over pixels
    + beta * KL(q(z|x) || N(0, I)) with the closed form `0.5 * sum(mu^2 + exp(lv) - 1 - lv)`
    (beta > 1 is the beta-VAE of Higgins et al. 2017), averaged over the global batch. The
    reparameterisation noise is drawn for the global batch from (seed, step), so training is
    exact under distribution. Evaluation decodes the posterior mean (deterministic).

    Args:
        encoder: Keras model `x -> (mu, log_var)` (a list/tuple or dict of two outputs).
        decoder: Keras model `z -> x` logits ("bernoulli") or mean ("gaussian"), shaped like x.
        optimizer: optimizer of both models (created under the strategy's scope), a name, or
            None for `Adam(1e-3)`.
        beta: weight of the KL term (>= 0).
        likelihood: "bernoulli" (x in [0, 1], decoder gives logits; binary cross-entropy) or
            "gaussian" (unit variance, decoder gives the mean; `0.5 (x - m)^2 + 0.5 log 2 pi`).
        seed: seed of the reparameterisation noise.

    Batches are `x` or `(x, labels)` (labels ignored). Logs: loss, reconstruction, kl.
    """

    name = "vae"

    def __init__(
        self, encoder, decoder, optimizer=None, beta=1.0, likelihood="bernoulli", seed=None
    ):
        super().__init__(seed=seed)
        self.encoder = _check_model(encoder, "encoder", "VAETask")
        self.decoder = _check_model(decoder, "decoder", "VAETask")
        if isinstance(beta, bool) or not isinstance(beta, int | float) or beta < 0:
            raise ValueError(f"VAETask: `beta`={beta!r} must be a number >= 0 (e.g. beta=1.0).")
        self.beta = float(beta)
        self.likelihood = check_choice("likelihood", likelihood, LIKELIHOODS, owner="VAETask")
        self._optimizer_arg = optimizer
        self.optimizer = None

    @property
    def models(self):
        return {"encoder": self.encoder, "decoder": self.decoder}

    @property
    def optimizers(self):
        return {} if self.optimizer is None else {"optimizer": self.optimizer}

    def _variables(self):
        return self.encoder.trainable_variables + self.decoder.trainable_variables

    def _optimized_variables(self):
        return [(self.optimizer, self._variables())]

    def _build_in_scope(self, strategy):
        mixed = "float16" in (self.encoder.compute_dtype, self.decoder.compute_dtype)
        self.optimizer = resolve_optimizer(
            self._optimizer_arg, strategy, mixed=mixed, owner="VAETask"
        )

    def _posterior(self, x, training):
        out = self.encoder(x, training=training)
        if isinstance(out, dict):
            out = list(out.values())
        if not isinstance(out, list | tuple) or len(out) != 2:
            raise ValueError(
                "VAETask: the encoder must return two outputs (mu, log_var); got "
                f"{type(out).__name__}. Build it as keras.Model(x, [mu, log_var])."
            )
        return tf.cast(out[0], tf.float32), tf.cast(out[1], tf.float32)

    def _terms(self, x, mu, log_var, z, training):
        out = tf.cast(_first_output(self.decoder(z, training=training)), tf.float32)
        x = tf.cast(x, tf.float32)
        if self.likelihood == "bernoulli":
            nll = tf.nn.sigmoid_cross_entropy_with_logits(labels=x, logits=out)
        else:
            nll = 0.5 * tf.square(x - out) + 0.5 * math.log(2.0 * math.pi)
        reconstruction = _sum_per_example(nll)
        kl = 0.5 * _sum_per_example(tf.square(mu) + tf.exp(log_var) - 1.0 - log_var)
        return reconstruction, kl

    def train_step(self, batch, ctx):
        x = _inputs_only(batch)
        with tf.GradientTape() as tape:
            mu, log_var = self._posterior(x, training=True)
            seed = ctx.seed(self.seed, self.optimizer.iterations, salt=0)
            eps = ctx.normal(tf.shape(mu)[1:], seed)
            z = mu + tf.exp(0.5 * log_var) * eps
            reconstruction, kl = self._terms(x, mu, log_var, z, training=True)
            loss = ctx.average_loss(reconstruction + self.beta * kl)
            loss += ctx.regularization_loss(self.encoder, self.decoder)
        ctx.minimize(tape, loss, self._variables(), self.optimizer)
        return {
            "loss": loss,
            "reconstruction": ctx.average_loss(reconstruction),
            "kl": ctx.average_loss(kl),
        }

    def eval_step(self, batch, ctx):
        x = _inputs_only(batch)
        mu, log_var = self._posterior(x, training=False)
        reconstruction, kl = self._terms(x, mu, log_var, mu, training=False)
        return {
            "loss": ctx.average_loss(reconstruction + self.beta * kl),
            "reconstruction": ctx.average_loss(reconstruction),
            "kl": ctx.average_loss(kl),
        }


class GANTask(Task):
    """Generative adversarial training with two optimizers: per batch a discriminator step,
    then a generator step (Goodfellow et al. 2014, "Generative Adversarial Nets", NeurIPS).

    The discriminator returns one logit per example. Its loss is the binary cross-entropy of
    real (1) vs generated (0) examples, `softplus(-D(x)) + softplus(D(G(z)))`. The generator
    loss is "non_saturating" `softplus(-D(G(z)))` (the paper's practical choice) or "minimax"
    `-softplus(D(G(z)))` (= log(1 - D(G(z)))), or "wgan_gp": the Wasserstein critic loss
    `D(G(z)) - D(x)` plus `gp_weight * (||grad D(x_hat)|| - 1)^2` at random interpolates
    `x_hat` of real and generated examples, and the generator loss `-D(G(z))` (Gulrajani et al.
    2017, "Improved Training of Wasserstein GANs", NeurIPS; use no batch norm in the critic).
    Every loss is averaged over the global batch; the
    latents of each step are drawn for the global batch from (seed, step), so training is
    exact under distribution. Conditional GANs (Mirza & Osindero 2014, "Conditional Generative
    Adversarial Nets") read `(x, labels)` batches and call `G([z, labels])`, `D([x, labels])`.

    Args:
        generator: Keras model `z -> x` (or `[z, labels] -> x` when conditional).
        discriminator: Keras model `x -> logit` (or `[x, labels] -> logit`), shape (B, 1) or
            (B,).
        g_optimizer, d_optimizer: optimizers (created under the strategy's scope), names, or
            None for `Adam(2e-4, beta_1=0.5)` (Radford et al. 2016, DCGAN).
        latent_dim: size of z (an int, or a shape tuple).
        loss: "non_saturating" or "minimax" generator loss, or "wgan_gp".
        conditional: whether the models take labels.
        gp_weight: weight of the gradient penalty ("wgan_gp" only; the paper's 10).
        d_steps: discriminator (critic) updates per batch before the generator update, each
            with fresh latents on the same real batch (the paper's n_critic; 1 by default).
        seed: seed of the latents.

    Batches are `x` or `(x, labels)` (labels ignored unless conditional). Logs: d_loss, g_loss.
    """

    name = "gan"

    def __init__(
        self,
        generator,
        discriminator,
        g_optimizer=None,
        d_optimizer=None,
        *,
        latent_dim,
        loss="non_saturating",
        conditional=False,
        gp_weight=10.0,
        d_steps=1,
        seed=None,
    ):
        super().__init__(seed=seed)
        self.generator = _check_model(generator, "generator", "GANTask")
        self.discriminator = _check_model(discriminator, "discriminator", "GANTask")
        shape = (latent_dim,) if isinstance(latent_dim, int) else tuple(latent_dim)
        if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(
                f"GANTask: `latent_dim`={latent_dim!r} must be a positive int (e.g. 64) or a "
                "shape tuple of positive ints."
            )
        self.latent_shape = shape
        self.loss = check_choice("loss", loss, GAN_LOSSES, owner="GANTask")
        self.conditional = bool(conditional)
        if isinstance(gp_weight, bool) or not isinstance(gp_weight, int | float) or gp_weight < 0:
            raise ValueError(
                f"GANTask: `gp_weight`={gp_weight!r} must be a number >= 0 (e.g. 10.0)."
            )
        self.gp_weight = float(gp_weight)
        if isinstance(d_steps, bool) or not isinstance(d_steps, int) or d_steps < 1:
            raise ValueError(f"GANTask: `d_steps`={d_steps!r} must be a positive int (e.g. 1).")
        self.d_steps = int(d_steps)
        self._optimizer_args = (g_optimizer, d_optimizer)
        self.g_optimizer = None
        self.d_optimizer = None

    @property
    def models(self):
        return {"generator": self.generator, "discriminator": self.discriminator}

    @property
    def optimizers(self):
        if self.g_optimizer is None:
            return {}
        return {"g_optimizer": self.g_optimizer, "d_optimizer": self.d_optimizer}

    def _optimized_variables(self):
        return [
            (self.g_optimizer, self.generator.trainable_variables),
            (self.d_optimizer, self.discriminator.trainable_variables),
        ]

    def _build_in_scope(self, strategy):
        def default():
            return keras.optimizers.Adam(2e-4, beta_1=0.5)

        g_opt, d_opt = self._optimizer_args
        if g_opt is not None and g_opt is d_opt:
            raise ValueError(
                "GANTask: `g_optimizer` and `d_optimizer` are the same object; the two models "
                "need their own optimizer state. Pass two optimizers (or None)."
            )
        self.g_optimizer = resolve_optimizer(
            g_opt,
            strategy,
            mixed=self.generator.compute_dtype == "float16",
            owner="GANTask",
            name="g_optimizer",
            default=default,
        )
        self.d_optimizer = resolve_optimizer(
            d_opt,
            strategy,
            mixed=self.discriminator.compute_dtype == "float16",
            owner="GANTask",
            name="d_optimizer",
            default=default,
        )

    def _unpack(self, batch):
        if self.conditional:
            if not isinstance(batch, tuple | list) or len(batch) != 2:
                raise ValueError(
                    "GANTask(conditional=True): batches must be (x, labels) pairs; got "
                    f"{type(batch).__name__}."
                )
            return batch[0], batch[1]
        return _inputs_only(batch), None

    def _generate(self, z, labels, training):
        inputs = z if labels is None else [z, labels]
        return _first_output(self.generator(inputs, training=training))

    def _logits(self, x, labels, training):
        inputs = x if labels is None else [x, labels]
        logits = tf.cast(_first_output(self.discriminator(inputs, training=training)), tf.float32)
        return tf.reshape(logits, [-1])

    def _g_per_example(self, fake_logits):
        if self.loss == "non_saturating":
            return tf.nn.softplus(-fake_logits)
        if self.loss == "wgan_gp":
            return -fake_logits
        return -tf.nn.softplus(fake_logits)

    def _d_per_example(self, real_logits, fake_logits):
        if self.loss == "wgan_gp":
            return fake_logits - real_logits
        return tf.nn.softplus(-real_logits) + tf.nn.softplus(fake_logits)

    def _gradient_penalty(self, x, fake, labels, ctx, seed):
        """`(||grad_x D(x_hat)||_2 - 1)^2` per example at `x_hat = a x + (1 - a) G(z)`,
        `a ~ U[0, 1)` per example (drawn for the global batch, like the latents)."""
        x = tf.cast(x, tf.float32)
        fake = tf.cast(fake, tf.float32)
        alpha = ctx.uniform([1] * (x.shape.rank - 1), seed)
        mixed = alpha * x + (1.0 - alpha) * fake
        with tf.GradientTape() as tape:
            tape.watch(mixed)
            # Examples are independent (no batch norm in a WGAN-GP critic): the gradient of the
            # sum holds each example's own gradient.
            total = tf.reduce_sum(self._logits(mixed, labels, training=True))
        grads = tape.gradient(total, mixed)
        norm = tf.sqrt(_sum_per_example(tf.square(grads)) + 1e-12)
        return tf.square(norm - 1.0)

    def train_step(self, batch, ctx):
        x, labels = self._unpack(batch)
        step = self.d_optimizer.iterations
        d_vars = self.discriminator.trainable_variables
        for k in range(self.d_steps):
            # salt 0 for the first critic step keeps d_steps=1 drawing what it always drew.
            z = ctx.normal(
                self.latent_shape, ctx.seed(self.seed, step, salt=0 if k == 0 else 10 + k)
            )
            fake = tf.stop_gradient(self._generate(z, labels, training=True))
            with tf.GradientTape() as tape:
                real_logits = self._logits(x, labels, training=True)
                fake_logits = self._logits(fake, labels, training=True)
                per_example = self._d_per_example(real_logits, fake_logits)
                if self.loss == "wgan_gp" and self.gp_weight > 0:
                    gp_seed = ctx.seed(self.seed, step, salt=100 + k)
                    per_example += self.gp_weight * self._gradient_penalty(
                        x, fake, labels, ctx, gp_seed
                    )
                d_loss = ctx.average_loss(per_example)
                d_loss += ctx.regularization_loss(self.discriminator)
            ctx.minimize(tape, d_loss, d_vars, self.d_optimizer)

        z = ctx.normal(self.latent_shape, ctx.seed(self.seed, step, salt=1))
        with tf.GradientTape() as tape:
            fake_logits = self._logits(self._generate(z, labels, training=True), labels, True)
            g_loss = ctx.average_loss(self._g_per_example(fake_logits))
            g_loss += ctx.regularization_loss(self.generator)
        ctx.minimize(tape, g_loss, self.generator.trainable_variables, self.g_optimizer)
        return {"d_loss": d_loss, "g_loss": g_loss}

    def eval_step(self, batch, ctx):
        x, labels = self._unpack(batch)
        # A fixed seed per batch position is enough for a loss estimate; evaluation updates
        # nothing, so it need not follow the training step.
        z = ctx.normal(self.latent_shape, ctx.seed(self.seed, 0, salt=2))
        fake_logits = self._logits(self._generate(z, labels, training=False), labels, False)
        real_logits = self._logits(x, labels, training=False)
        return {
            "d_loss": ctx.average_loss(self._d_per_example(real_logits, fake_logits)),
            "g_loss": ctx.average_loss(self._g_per_example(fake_logits)),
        }

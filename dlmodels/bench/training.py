"""Training throughput: our `Trainer` against Keras' `model.fit`, measured side by side.

For each model (ResNet-50 at 96x96, batch 16, 10 classes; the U-Net `dlmodels demo` trains:
64x64, 3 levels of 16 filters, bilinear upsampling, batch 16) and each strategy (one device,
`MirroredStrategy` over 2 logical CPUs, or over the GPUs when there are several), two copies of
the model start from the same weights with the same optimizer (Adam), loss (sparse
cross-entropy from logits), metrics (the Trainer's defaults, also compiled into `fit`), batch
and data: an in-memory synthetic `tf.data` pipeline of `--steps` batches, cached, repeated and
prefetched, so both paths read the same batches in the same order.

What is timed: steady-state epochs, inside the training call. Every timed round of a path is
ONE call, `Trainer.fit(..., steps_per_epoch=steps)` or `model.fit(..., epochs=E,
steps_per_epoch=steps)`, training `--epochs-per-round` (E, default 3) epochs of `--steps`
steps; rounds alternate Trainer, fit, Trainer, fit, ... after one untimed one-epoch call per
path (tracing), so load from other processes hits both. A callback on each side
(`EpochClock`; for `fit` a `keras.callbacks.Callback`, for the Trainer its `callbacks=` hook)
reads `time.perf_counter` and `time.process_time` when each epoch ends: in the Trainer after
the epoch's logs were read back from the device and its counters and `history["seconds"]`
were set; in `fit` after Keras turned the epoch's logs into Python numbers, before its
`History` callback. An epoch's time is end of the previous epoch -> end of this one, the same
span on both sides: everything the loop does per epoch (reset metrics, the steps, read the
logs, the callbacks). The first epoch of every call is measured from just before the call
(iterator creation and first prefetch, the Trainer's `Dataset.skip` of the batches it already
trained, `fit`'s data adapter and callback set-up) and left out of the statistics
(`*_first_epoch_seconds`), so E - 1 epochs per round count. The whole call is recorded too
(`*_call_seconds`) with the part after the last epoch ended (`*_after_last_epoch_seconds`:
`fit`'s `on_train_end`, iterator and strategy teardown), which a per-call timing mixes into
every epoch (`call_ratio`). For reference the narrower spans each library reports are kept:
`fit_begin_to_end_epoch_seconds` (Keras `on_epoch_begin` -> `on_epoch_end`: without the reset
of metrics and the previous epoch's remaining callbacks) and `trainer_reported_epoch_seconds`
(the Trainer's `history["seconds"]`: from the top of its epoch loop to after the epoch's logs).

Steps/s are `--steps` over the median steady-state epoch time. `ratio` = Trainer steps/s /
`fit` steps/s (> 1: the Trainer is faster); `ratio_best` compares the fastest epochs. On a
shared machine wall time mostly measures the other processes, so the CPU time this process
spent per step is recorded too (`cpu_ratio` = `fit` CPU s/step / Trainer CPU s/step, > 1: the
Trainer needs less CPU). Both paths are checked to have trained: the same number of optimizer
steps (`expected_optimizer_steps` = (warm-up calls + rounds x E) x steps), weights moved. Under
`MirroredStrategy` the model for `fit` is built and compiled inside `strategy.scope()`; the
Trainer synchronises BatchNorm across replicas (its default, which `fit` does not do), so it
does more work there. Three pairings are measured under several replicas (`--sync-batch-norm`):
"on" (the Trainer's default SyncBN against `fit` with per-replica BatchNorm: what a user gets
from each by default), "off" (both per-replica: the same work) and "keras" (both synchronised:
the Trainer's SyncBN against `fit` of the same model with Keras' own
`BatchNormalization(synchronized=True)`: the same training maths, computed differently).
Steps per `tf.function` call (`--steps-per-execution N`, default 1): the Trainer runs with
`Trainer(..., steps_per_execution=N)` (N steps inside one call, reading their batches from the
distributed iterator; an epoch whose steps N does not divide ends with a shorter call), and
`fit` gets the same `compile(steps_per_execution=N)` wherever Keras supports it: one device.
Under `MirroredStrategy` Keras 3.15's `fit` fails with N > 1 (`InvalidArgumentError: You must
feed a value for placeholder tensor '.../while/cond/Placeholder'`, see
`fit_supports_steps_per_execution`), so there it keeps 1 step per call while the Trainer runs
N: a capability the Trainer has and `fit` lacks there, not a handicap the benchmark adds
(`fit` gets every N it can run). Each row records what each side ran
(`trainer_steps_per_execution`, `fit_steps_per_execution`, read back from the Trainer and the
compiled model). Where `fit` gets N, `--steps` must be a multiple of N (on a repeated dataset
Keras runs whole executions, so its epochs would be longer).
`--precision float32 mixed_bfloat16` builds both copies under each Keras dtype policy in turn
(one row each, measured one after the other; each row records the compute dtype of every
convolution of both copies, read back from the layers).
`weights_max_abs_diff` is how far apart the two copies ended: 0 when both run the same ops
("off", one device); under "keras" each step differs by rounding (about 1e-7 after a step,
tests/bench/test_training_bench.py), which hundreds of steps on random data can amplify into
weights that differ as much as under "on".

Results go to `benchmarks/results/training.json` (`write_results`, with `machine_info()`).
Numbers from a busy machine are noisy; rerun on a quiet one:

    python -m dlmodels.bench.training                    # ResNet-50 and the demo U-Net
    python -m dlmodels.bench.training --steps 20 --repeats 5 --epochs-per-round 4
    python -m dlmodels.bench.training --quick            # tiny models, a smoke test
    python -m dlmodels.bench.training --out /tmp/training.json

TensorFlow must not have started when `main` runs (it splits the CPU into 2 logical devices).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path("benchmarks/results/training.json")
STRATEGIES = ("one_device", "mirrored")
# --sync-batch-norm -> (Trainer's sync_batch_norm, fit's synchronized BatchNorm) per row.
_ON, _OFF, _KERAS = ("auto", False), (False, False), ("auto", True)
PAIRINGS = {
    "on": [_ON],
    "off": [_OFF],
    "keras": [_KERAS],
    "both": [_ON, _OFF],
    "all": [_ON, _OFF, _KERAS],
}

# name -> what to build and train. "unet" is the demo's U-Net (dlmodels.demo.DEMO_CONFIG).
MODELS = {
    "resnet50": {
        "model": "resnet50",
        "task": "classification",
        "image_size": (96, 96),
        "num_classes": 10,
        "batch_size": 16,
        "kwargs": {},
        "learning_rate": 1e-3,
    },
    "unet": {
        "model": "unet",
        "task": "segmentation",
        "image_size": (64, 64),
        "num_classes": 4,
        "batch_size": 16,
        "kwargs": {"depth": 3, "base_filters": 16, "upsampling": "bilinear"},
        "learning_rate": 3e-3,
    },
}

# --quick: the same code paths on models small enough for a test.
QUICK_MODELS = {
    "unet_tiny": {
        "model": "unet",
        "task": "segmentation",
        "image_size": (32, 32),
        "num_classes": 3,
        "batch_size": 8,
        "kwargs": {"depth": 2, "base_filters": 4, "upsampling": "bilinear"},
        "learning_rate": 1e-3,
    },
}


def _demo_unet():
    """The "unet" entry from the demo's own config, so the two cannot drift apart."""
    from dlmodels import demo

    cfg = demo.DEMO_CONFIG
    return {
        **MODELS["unet"],
        "image_size": tuple(cfg["image_size"]),
        "num_classes": demo.NUM_CLASSES,
        "batch_size": cfg["batch_size"],
        "kwargs": {
            "depth": cfg["depth"],
            "base_filters": cfg["base_filters"],
            "upsampling": cfg["upsampling"],
        },
        "learning_rate": cfg["learning_rate"],
    }


def split_cpu(n=2):
    """Split the first CPU into `n` logical devices (for `MirroredStrategy` without GPUs).
    Needs TensorFlow not to have initialised its devices yet; returns False if it had."""
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * n
        )
    except RuntimeError:
        return False
    return True


def mirrored_devices():
    """The devices `MirroredStrategy` runs on here: the GPUs when there are several, else the
    logical CPUs; None when there are fewer than 2."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) >= 2:
        return [d.name for d in gpus]
    cpus = tf.config.list_logical_devices("CPU")
    if not gpus and len(cpus) >= 2:
        return [d.name for d in cpus[:2]]
    return None


def synthetic_dataset(spec, steps, seed=0):
    """`steps` batches of random images and labels, in memory, cached, repeated forever and
    prefetched: train it with `steps_per_epoch=steps` (every epoch then sees the same batches,
    in the same order, from one iterator per training call)."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    n = steps * spec["batch_size"]
    h, w = spec["image_size"]
    x = rng.normal(size=(n, h, w, 3)).astype("float32")
    shape = (n,) if spec["task"] == "classification" else (n, h, w)
    y = rng.integers(0, spec["num_classes"], size=shape).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(spec["batch_size"], drop_remainder=True)
    return ds.cache().repeat().prefetch(tf.data.AUTOTUNE)


def _build(spec):
    import keras

    import dlmodels.models as registry

    model = registry.get(
        spec["model"],
        input_shape=(*spec["image_size"], 3),
        num_classes=spec["num_classes"],
        **spec["kwargs"],
    )
    optimizer = keras.optimizers.Adam(spec["learning_rate"])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return model, optimizer, loss


def _fit_metrics(spec):
    """The metrics the Trainer computes by default, for `compile` (same work on both sides)."""
    import keras

    from dlmodels.metrics import MeanIoU, PixelAccuracy

    if spec["task"] == "classification":
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    c = spec["num_classes"]
    return [MeanIoU(c, name="mean_iou"), PixelAccuracy(c, name="pixel_accuracy")]


def synchronize_batch_norm(model) -> int:
    """Switch every Keras `BatchNormalization` of `model` to Keras' own cross-replica moments
    (`synchronized=True`, read when the layer is called); returns how many were switched."""
    from dlmodels.training.replicas import batch_norm_layers

    layers = batch_norm_layers([model])
    for layer in layers:
        layer.synchronized = True
    return len(layers)


def _weights_diff(a, b):
    return float(
        max(np.abs(x - y).max() for x, y in zip(a.get_weights(), b.get_weights(), strict=True))
    )


def _moved(model, initial):
    return float(
        max(np.abs(w - i).max() for w, i in zip(model.get_weights(), initial, strict=True))
    )


class EpochClock:
    """Epoch-end timestamps of one training call, wall (`time.perf_counter`) and CPU
    (`time.process_time`), taken inside the call.

    `call_started()` just before the call, `on_epoch_end(epoch, logs)` from the training loop's
    epoch-end hook (the Trainer's `callbacks=` entry, or `keras_callback()` for `model.fit`,
    which also records `on_epoch_begin`), `call_ended()` right after the call returned. Then
    `summary()` splits the call: the first epoch (call start -> its end), the steady-state
    epochs (end of the previous epoch -> end of this one), what follows the last epoch's end.

    Args:
        clocks: the (wall, cpu) clocks to read, for tests.
    """

    def __init__(self, clocks=(time.perf_counter, time.process_time)):
        self._clocks = tuple(clocks)
        self.start = None
        self.begins = []
        self.ends = []
        self.stop = None

    def _now(self):
        return tuple(clock() for clock in self._clocks)

    def call_started(self):
        self.start, self.begins, self.ends, self.stop = self._now(), [], [], None

    def on_epoch_begin(self, epoch, logs=None):
        del epoch, logs
        self.begins.append(self._now())

    def on_epoch_end(self, epoch, logs=None):
        del epoch, logs
        self.ends.append(self._now())

    def call_ended(self):
        self.stop = self._now()

    def keras_callback(self):
        """A `keras.callbacks.Callback` recording into this clock. It only overrides the epoch
        hooks: Keras then still dispatches its batch hooks asynchronously, as without it."""
        import keras

        clock = self

        class _EpochClockCallback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                clock.on_epoch_begin(epoch, logs)

            def on_epoch_end(self, epoch, logs=None):
                clock.on_epoch_end(epoch, logs)

        return _EpochClockCallback()

    def summary(self):
        """Seconds of the recorded call, each a (wall, cpu) pair:

        - "first_epoch": call start -> end of epoch 1 (iterator creation, warm-up).
        - "epochs": end of epoch k - 1 -> end of epoch k, for k = 2, 3, ... (steady state).
        - "begin_to_end": `on_epoch_begin` -> `on_epoch_end` of the same epochs (Keras only;
          empty when no begins were recorded).
        - "after_last_epoch": end of the last epoch -> call return (teardown).
        - "call": the whole call.
        """
        if self.start is None or self.stop is None or not self.ends:
            raise RuntimeError("EpochClock.summary: no complete call with an epoch recorded")

        def diff(a, b):
            return tuple(y - x for x, y in zip(a, b, strict=True))

        ends = self.ends
        return {
            "first_epoch": diff(self.start, ends[0]),
            "epochs": [diff(a, b) for a, b in itertools.pairwise(ends)],
            "begin_to_end": [diff(b, e) for b, e in zip(self.begins[1:], ends[1:], strict=True)]
            if self.begins
            else [],
            "after_last_epoch": diff(ends[-1], self.stop),
            "call": diff(self.start, self.stop),
        }


def fit_supports_steps_per_execution(strategy) -> bool:
    """Whether Keras' `fit` may run several steps per call under `strategy`.

    Keras 3.15's `fit` with `compile(steps_per_execution=N > 1)` under `MirroredStrategy` (2
    logical CPUs, a small model with BatchNorm) fails on its first call with
    `InvalidArgumentError: You must feed a value for placeholder tensor
    '.../while/cond/Placeholder' with dtype int32` (its multi-step `tf.while_loop` over the
    distributed iterator's `get_next_as_optional`); without a strategy it trains exactly as
    N = 1 does (the same weights). So `fit` gets N only with one replica and no
    `MirroredStrategy`.
    """
    import tensorflow as tf

    return strategy.num_replicas_in_sync == 1 and not isinstance(
        strategy, tf.distribute.MirroredStrategy
    )


def _check_fit_steps_per_execution(n, steps, strategy, *, owner):
    """The `steps_per_execution` `fit` gets under `strategy` (n or 1); raise a ValueError if
    `fit` gets n > 1 and `steps` is not a multiple of it: on a repeated dataset Keras runs
    whole executions, so its epochs would run more steps than the Trainer's (which ends each
    epoch with a shorter call)."""
    fit_n = n if fit_supports_steps_per_execution(strategy) else 1
    if steps % fit_n:
        raise ValueError(
            f"{owner}: `steps_per_execution`={n!r} must divide `steps`={steps!r} where "
            f"`fit` gets it too (one device): Keras would run {-(-steps // fit_n) * fit_n} "
            f"steps per epoch. Pass a divisor of {steps}, e.g. steps_per_execution={steps}."
        )
    return fit_n


def measure(
    spec,
    strategy,
    *,
    steps,
    repeats,
    epochs_per_round=3,
    warmup=1,
    seed=0,
    log=None,
    sync_batch_norm="auto",
    fit_sync_batch_norm=False,
    steps_per_execution=1,
    precision="float32",
):
    """Steady-state steps/s of `Trainer.fit` and `model.fit` on the same model, data and
    optimizer (see the module docstring for what each number spans).

    Args:
        spec: a `MODELS` entry.
        strategy: the `tf.distribute` strategy both run under.
        steps: steps per epoch.
        repeats: timed calls (rounds) per path, interleaved (Trainer, fit, Trainer, fit, ...).
        epochs_per_round: epochs per timed call (>= 2); the first of each is not counted, so
            each path gets `repeats x (epochs_per_round - 1)` timed epochs.
        warmup: untimed one-epoch calls per path first (tracing).
        seed: weights and data seed.
        log: print-like callable for progress, or None.
        sync_batch_norm: the Trainer's `sync_batch_norm` ("auto": its default, on with more
            than one replica; False: per-replica batch moments, the work `model.fit` does).
        fit_sync_batch_norm: give `fit`'s copy Keras' synchronised BatchNorm
            (`synchronized=True` on every BatchNormalization), the same maths as the Trainer's.
        steps_per_execution: training steps per `tf.function` call: the Trainer's
            `steps_per_execution`, and `fit`'s `compile(steps_per_execution=...)` where Keras
            supports it (`fit_steps_per_execution`: not under `MirroredStrategy`, where `fit`
            keeps 1). Where `fit` gets it, `steps` must be a multiple of it.
        precision: the Keras dtype policy both copies are built under ("float32",
            "mixed_bfloat16" or "mixed_float16"; `dlmodels.training.precision_scope`).

    Returns:
        A dict: steps/s, images/s, CPU s/step and the steady-state epoch seconds of both paths,
        `ratio`, the first-epoch, after-last-epoch and whole-call seconds of every round,
        `call_ratio` (the ratio from whole-call times), the optimizer steps each took and how
        far their weights moved.

    Raises:
        ValueError: `epochs_per_round` < 2, `steps` / `repeats` / `steps_per_execution` not
            positive, or `steps` not a multiple of the `steps_per_execution` `fit` gets.
    """
    import keras

    from dlmodels._validation import check_positive_int
    from dlmodels.training import Trainer, precision_scope

    _check_precision(precision, owner="bench.training.measure")
    steps = check_positive_int("steps", steps, owner="bench.training.measure")
    repeats = check_positive_int("repeats", repeats, owner="bench.training.measure")
    steps_per_execution = check_positive_int(
        "steps_per_execution", steps_per_execution, owner="bench.training.measure"
    )
    fit_steps_per_execution = _check_fit_steps_per_execution(
        steps_per_execution, steps, strategy, owner="bench.training.measure"
    )
    not_int = isinstance(epochs_per_round, bool) or not isinstance(epochs_per_round, int)
    if not_int or epochs_per_round < 2:
        raise ValueError(
            f"bench.training.measure: `epochs_per_round`={epochs_per_round!r} must be an int "
            ">= 2 (the first epoch of every call is not counted). Pass e.g. epochs_per_round=3."
        )
    keras.utils.set_random_seed(seed)
    ds = synthetic_dataset(spec, steps, seed)
    with strategy.scope(), precision_scope(precision):
        ours, optimizer, loss = _build(spec)
        theirs, fit_optimizer, fit_loss = _build(spec)
        initial = ours.get_weights()
        theirs.set_weights(initial)
        synchronized = synchronize_batch_norm(theirs) if fit_sync_batch_norm else 0
        theirs.compile(
            optimizer=fit_optimizer,
            loss=fit_loss,
            metrics=_fit_metrics(spec),
            steps_per_execution=fit_steps_per_execution,
        )
    trainer = Trainer(
        ours,
        task=spec["task"],
        optimizer=optimizer,
        loss=loss,
        strategy=strategy,
        progress=False,
        sync_batch_norm=sync_batch_norm,
        steps_per_execution=steps_per_execution,
    )
    reported = []  # the Trainer's own history["seconds"] of the last call

    def run_trainer(epochs, clock):
        total = int(trainer.epoch.numpy()) + epochs  # Trainer.fit's `epochs` is a total
        history = trainer.fit(ds, epochs=total, steps_per_epoch=steps, callbacks=[clock])
        reported[:] = history["seconds"]

    def run_fit(epochs, clock):
        theirs.fit(
            ds,
            epochs=epochs,
            steps_per_epoch=steps,
            verbose=0,
            shuffle=False,
            callbacks=[clock.keras_callback()],
        )

    paths = {"trainer": run_trainer, "fit": run_fit}
    for _ in range(warmup):
        for fn in paths.values():
            fn(1, EpochClock())
    keys = ("epoch", "first_epoch", "after_last_epoch", "call")
    wall = {p: {k: [] for k in keys} for p in paths}
    cpu = {p: {k: [] for k in keys} for p in paths}
    trainer_reported, fit_begin_to_end = [], []
    for r in range(repeats):
        for name, fn in paths.items():
            clock = EpochClock()
            clock.call_started()
            fn(epochs_per_round, clock)
            clock.call_ended()
            if len(clock.ends) != epochs_per_round:
                raise RuntimeError(
                    f"bench.training: {name} ran {len(clock.ends)} epochs, expected "
                    f"{epochs_per_round}"
                )
            s = clock.summary()
            wall[name]["epoch"] += [w for w, _ in s["epochs"]]
            cpu[name]["epoch"] += [c for _, c in s["epochs"]]
            for k in keys[1:]:
                wall[name][k].append(s[k][0])
                cpu[name][k].append(s[k][1])
            if name == "trainer":
                trainer_reported += reported[1:]
            else:
                fit_begin_to_end += [w for w, _ in s["begin_to_end"]]
        if log:
            n = epochs_per_round - 1
            log(
                f"  round {r + 1}/{repeats}: "
                + ", ".join(
                    f"{p} {statistics.median(wall[p]['epoch'][-n:]):.3f} s/epoch "
                    f"(cpu {statistics.median(cpu[p]['epoch'][-n:]):.3f} s; first epoch "
                    f"{wall[p]['first_epoch'][-1]:.2f} s, call {wall[p]['call'][-1]:.2f} s, "
                    f"after last epoch {wall[p]['after_last_epoch'][-1]:.2f} s)"
                    for p in paths
                )
            )
    trainer_rate = steps / statistics.median(wall["trainer"]["epoch"])
    fit_rate = steps / statistics.median(wall["fit"]["epoch"])
    trainer_cpu = statistics.median(cpu["trainer"]["epoch"]) / steps
    fit_cpu = statistics.median(cpu["fit"]["epoch"]) / steps
    batch = spec["batch_size"]
    out = {
        "trainer_steps_per_s": trainer_rate,
        "fit_steps_per_s": fit_rate,
        "ratio": trainer_rate / fit_rate,
        "trainer_images_per_s": trainer_rate * batch,
        "fit_images_per_s": fit_rate * batch,
        "ratio_best": min(wall["fit"]["epoch"]) / min(wall["trainer"]["epoch"]),
        "trainer_cpu_seconds_per_step": trainer_cpu,
        "fit_cpu_seconds_per_step": fit_cpu,
        "cpu_ratio": fit_cpu / trainer_cpu,
        # The old per-call measure, for comparison: includes warm-up and teardown.
        "call_ratio": statistics.median(wall["fit"]["call"])
        / statistics.median(wall["trainer"]["call"]),
        "epochs_per_round": epochs_per_round,
        "timed_epochs_per_path": repeats * (epochs_per_round - 1),
    }
    for p in paths:
        out[f"{p}_epoch_seconds"] = wall[p]["epoch"]
        out[f"{p}_epoch_cpu_seconds"] = cpu[p]["epoch"]
        for k in keys[1:]:
            out[f"{p}_{k}_seconds"] = wall[p][k]
            out[f"{p}_{k}_cpu_seconds"] = cpu[p][k]
    steps_taken = (int(optimizer.iterations.numpy()), int(fit_optimizer.iterations.numpy()))
    expected = (warmup + repeats * epochs_per_round) * steps
    if steps_taken != (expected, expected):
        raise RuntimeError(
            f"bench.training: the Trainer took {steps_taken[0]} optimizer steps and fit "
            f"{steps_taken[1]}, {expected} expected: the two paths did not train alike"
        )
    out.update(
        {
            "trainer_reported_epoch_seconds": trainer_reported,
            "fit_begin_to_end_epoch_seconds": fit_begin_to_end,
            "trainer_optimizer_steps": steps_taken[0],
            "fit_optimizer_steps": steps_taken[1],
            "expected_optimizer_steps": expected,
            "trainer_weights_moved": _moved(ours, initial),
            "fit_weights_moved": _moved(theirs, initial),
            "trainer_sync_batch_norm": trainer.sync_batch_norm,
            "fit_sync_batch_norm": bool(fit_sync_batch_norm),
            "fit_synchronized_layers": synchronized,
            # Read back from each side: what really ran.
            "trainer_steps_per_execution": trainer.steps_per_execution,
            "fit_steps_per_execution": int(theirs.steps_per_execution),
            "precision": precision,
            "trainer_compute_dtypes": _compute_dtypes(ours),
            "fit_compute_dtypes": _compute_dtypes(theirs),
            # Same start, data and optimizer: how far apart the two copies ended.
            "weights_max_abs_diff": _weights_diff(ours, theirs),
        }
    )
    return out


PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
"""The dtype policies `--precision` accepts."""


def _check_precision(precision, *, owner):
    if precision not in PRECISIONS:
        raise ValueError(f"{owner}: `precision`={precision!r}; choose one of {PRECISIONS}.")


def _compute_dtypes(model) -> dict[str, int]:
    """Compute dtype -> how many convolution layers run in it (read back from the model)."""
    import keras

    from dlmodels.training.replicas import layers_of

    out: dict[str, int] = {}
    for layer in layers_of([model]):
        if isinstance(layer, keras.layers.Conv2D | keras.layers.Conv2DTranspose):
            out[layer.compute_dtype] = out.get(layer.compute_dtype, 0) + 1
    return out


def _strategy(name):
    import tensorflow as tf

    from dlmodels.training import resolve_strategy

    if name == "one_device":
        return tf.distribute.get_strategy(), None
    devices = mirrored_devices()
    if devices is None:
        return None, "fewer than 2 devices (TensorFlow had started before the CPU was split)"
    return resolve_strategy("mirrored", devices=devices), None


def run(
    models=None,
    *,
    strategies=STRATEGIES,
    steps=10,
    repeats=5,
    epochs_per_round=3,
    warmup=1,
    quick=False,
    output=DEFAULT_OUT,
    seed=0,
    verbose=True,
    sync_batch_norm="all",
    steps_per_execution=1,
    precision="float32",
):
    """Measure every model under every strategy; write and return the JSON payload.

    Args:
        models: names from `MODELS` (or `QUICK_MODELS` with `quick`), or spec dicts by name;
            None: all of them.
        strategies: from `STRATEGIES`.
        steps, repeats, epochs_per_round, warmup, seed: see `measure`.
        quick: the tiny models of `QUICK_MODELS`.
        sync_batch_norm: with several replicas, which pairings get a row (`PAIRINGS`): the
            Trainer with its default synchronised BatchNorm against plain `fit` ("on"), both
            with per-replica moments ("off"), both synchronised, `fit` with Keras'
            `synchronized=True` ("keras"); "both" = on and off, "all" = all three.
        steps_per_execution: training steps per `tf.function` call, for the Trainer and, where
            Keras supports it, for `fit` (see `measure`).
        precision: the dtype policy both copies are built under (`PRECISIONS`), or several:
            one row per policy (measured one after the other in this run).
        verbose: print progress.
    """
    import tensorflow as tf

    from dlmodels._validation import check_positive_int

    table = dict(QUICK_MODELS) if quick else {**MODELS, "unet": _demo_unet()}
    if isinstance(models, dict):
        table = dict(models)
    elif models is not None:
        unknown = [m for m in models if m not in table]
        if unknown:
            raise ValueError(
                f"bench.training: `models`={unknown!r} unknown; choose from {sorted(table)}."
            )
        table = {m: table[m] for m in models}
    if sync_batch_norm not in PAIRINGS:
        raise ValueError(
            f"bench.training: `sync_batch_norm`={sync_batch_norm!r}; choose one of "
            f"{', '.join(PAIRINGS)}."
        )
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ValueError(f"bench.training: `strategies`={bad!r}; choose from {STRATEGIES}.")
    precisions = [precision] if isinstance(precision, str) else list(precision)
    if not precisions:
        raise ValueError(f"bench.training: `precision` is empty; choose from {PRECISIONS}.")
    for p in precisions:
        _check_precision(p, owner="bench.training")
    steps_per_execution = check_positive_int(
        "steps_per_execution", steps_per_execution, owner="bench.training"
    )
    if "one_device" in strategies:  # fail before any row is measured
        _check_fit_steps_per_execution(
            steps_per_execution, steps, tf.distribute.get_strategy(), owner="bench.training"
        )
    log = print if verbose else None
    gpus = tf.config.list_physical_devices("GPU")
    rows = []
    for name, spec in table.items():
        for strategy_name in strategies:
            strategy, why_not = _strategy(strategy_name)
            row = {
                "model": name,
                "strategy": strategy_name,
                "replicas": None if strategy is None else strategy.num_replicas_in_sync,
                "device": "GPU" if gpus else "CPU",
                **{k: spec[k] for k in ("task", "num_classes", "batch_size")},
                "image_size": list(spec["image_size"]),
                "model_kwargs": spec["kwargs"],
                "steps_per_epoch": steps,
            }
            if strategy is None:
                rows.append({**row, "skipped": why_not})
                continue
            variants = [("auto", False)]
            if row["replicas"] > 1:
                variants = PAIRINGS[sync_batch_norm]
            for (variant, fit_sync), policy in itertools.product(variants, precisions):
                if log:
                    log(
                        f"{name} / {strategy_name} ({row['replicas']} replica(s)"
                        + (", Trainer without SyncBN" if variant is False else "")
                        + (", fit with Keras' synchronized BatchNorm" if fit_sync else "")
                        + (f", {policy}" if policy != "float32" else "")
                        + ")"
                    )
                result = dict(row)
                result.update(
                    measure(
                        spec,
                        strategy,
                        steps=steps,
                        repeats=repeats,
                        epochs_per_round=epochs_per_round,
                        warmup=warmup,
                        seed=seed,
                        log=log,
                        sync_batch_norm=variant,
                        fit_sync_batch_norm=fit_sync,
                        steps_per_execution=steps_per_execution,
                        precision=policy,
                    )
                )
                if log:
                    log(
                        f"  trainer {result['trainer_steps_per_s']:.3f} steps/s, fit "
                        f"{result['fit_steps_per_s']:.3f} steps/s, ratio {result['ratio']:.3f} "
                        f"(cpu ratio {result['cpu_ratio']:.3f}; whole calls "
                        f"{result['call_ratio']:.3f}; steps per call: trainer "
                        f"{result['trainer_steps_per_execution']}, fit "
                        f"{result['fit_steps_per_execution']})"
                    )
                rows.append(result)
    gpu_rates = [r["trainer_images_per_s"] for r in rows if gpus and "ratio" in r]
    payload = {
        "benchmark": "training throughput: dlmodels Trainer vs keras model.fit, same model, "
        "data, optimizer, loss, metrics and batch; interleaved calls of epochs_per_round "
        "epochs each, timed inside the call from epoch end to epoch end, the first epoch of "
        "every call left out; median",
        "command": "python -m dlmodels.bench.training"
        + (" --quick" if quick else "")
        + (f" --steps-per-execution {steps_per_execution}" if steps_per_execution != 1 else "")
        + (f" --precision {' '.join(precisions)}" if precisions != ["float32"] else ""),
        "settings": {
            "steps_per_epoch": steps,
            "repeats": repeats,
            "epochs_per_round": epochs_per_round,
            "warmup_epochs": warmup,
            "sync_batch_norm": sync_batch_norm,
            "steps_per_execution": steps_per_execution,
            "precision": precisions[0] if len(precisions) == 1 else precisions,
        },
        "results": rows,
        "gpu": {
            "available": bool(gpus),
            "images_per_s": max(gpu_rates) if gpu_rates else None,
            "reason": None
            if gpus
            else "no GPU on the machine that ran this benchmark "
            "(tf.config.list_physical_devices('GPU') was empty): CPU numbers only",
        },
    }
    if output is not None:
        from dlmodels.bench.harness import write_results

        write_results(output, payload)
        if log:
            log(f"wrote {output}")
    return payload


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--quick", action="store_true", help="tiny models (a smoke test)")
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per path")
    parser.add_argument(
        "--epochs-per-round",
        type=int,
        default=3,
        help="epochs per timed call (>= 2; the first of each call is not counted)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sync-batch-norm",
        choices=tuple(PAIRINGS),
        default="all",
        help="with several replicas: the Trainer's default SyncBN vs plain fit (on), both "
        "per-replica (off), both synchronised, fit with Keras' synchronized=True (keras); "
        "both = on + off, all = on + off + keras",
    )
    parser.add_argument(
        "--steps-per-execution",
        type=int,
        default=1,
        help="training steps per tf.function call: the Trainer's steps_per_execution, and "
        "fit's where Keras supports it (one device; fit keeps 1 under MirroredStrategy)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        nargs="+",
        default=["float32"],
        help="the Keras dtype policy both copies are built under (several: one row each); "
        "default output when not only float32: benchmarks/results/training_precision.json",
    )
    args = parser.parse_args(argv)
    out = args.out
    if out == DEFAULT_OUT and args.precision != ["float32"]:
        out = DEFAULT_OUT.with_name("training_precision.json")
    split_cpu(2)
    run(
        args.models,
        strategies=tuple(args.strategies),
        steps=args.steps or (4 if args.quick else 10),
        repeats=args.repeats or (2 if args.quick else 5),
        epochs_per_round=args.epochs_per_round,
        quick=args.quick,
        output=out,
        seed=args.seed,
        sync_batch_norm=args.sync_batch_norm,
        steps_per_execution=args.steps_per_execution,
        precision=args.precision,
    )


if __name__ == "__main__":
    main()

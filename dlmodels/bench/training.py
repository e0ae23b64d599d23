"""Training throughput: our `Trainer` against Keras' `model.fit`, measured side by side.

For each model (ResNet-50 at 96x96, batch 16, 10 classes; the U-Net `dlmodels demo` trains:
64x64, 3 levels of 16 filters, bilinear upsampling, batch 16) and each strategy (one device,
`MirroredStrategy` over 2 logical CPUs, or over the GPUs when there are several), two copies of
the model start from the same weights with the same optimizer (Adam), loss (sparse
cross-entropy from logits), metrics (the Trainer's defaults, also compiled into `fit`), batch
and data: an in-memory synthetic `tf.data` pipeline, cached and prefetched. Every timed round
is one epoch of `--steps` steps, run by `Trainer.fit` and then by `model.fit` (A, B, A, B, ...)
after one untimed warm-up epoch each (tracing), so load from other processes hits both; steps/s
are from the median epoch time. `ratio` = Trainer steps/s / `fit` steps/s (> 1: the Trainer is
faster); `ratio_best` compares the fastest epochs. On a shared machine wall time mostly measures
the other processes, so the CPU time this process spent per step is recorded too (`cpu_ratio` =
`fit` CPU s/step / Trainer CPU s/step, > 1: the Trainer needs less CPU). Both paths are
checked to have trained: the same number of optimizer steps, weights moved. Under
`MirroredStrategy` the model for `fit` is built and compiled inside `strategy.scope()`; the
Trainer synchronises BatchNorm across replicas (its default, which `fit` does not do), so it
does more work there.

Results go to `benchmarks/results/training.json` (`write_results`, with `machine_info()`).
Numbers from a busy machine are noisy; rerun on a quiet one:

    python -m dlmodels.bench.training                    # ResNet-50 and the demo U-Net
    python -m dlmodels.bench.training --steps 20 --repeats 5
    python -m dlmodels.bench.training --quick            # tiny models, a smoke test
    python -m dlmodels.bench.training --out /tmp/training.json

TensorFlow must not have started when `main` runs (it splits the CPU into 2 logical devices).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path("benchmarks/results/training.json")
STRATEGIES = ("one_device", "mirrored")

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
    """`steps` batches of random images and labels, in memory, cached and prefetched."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    n = steps * spec["batch_size"]
    h, w = spec["image_size"]
    x = rng.normal(size=(n, h, w, 3)).astype("float32")
    shape = (n,) if spec["task"] == "classification" else (n, h, w)
    y = rng.integers(0, spec["num_classes"], size=shape).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(spec["batch_size"], drop_remainder=True)
    return ds.cache().prefetch(tf.data.AUTOTUNE)


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


def _moved(model, initial):
    return float(
        max(np.abs(w - i).max() for w, i in zip(model.get_weights(), initial, strict=True))
    )


def measure(spec, strategy, *, steps, repeats, warmup=1, seed=0, log=None):
    """Steps/s of `Trainer.fit` and `model.fit` on the same model, data and optimizer.

    Args:
        spec: a `MODELS` entry.
        strategy: the `tf.distribute` strategy both run under.
        steps: steps per timed epoch.
        repeats: timed epochs per path, interleaved (Trainer, fit, Trainer, fit, ...).
        warmup: untimed epochs per path first (tracing).
        seed: weights and data seed.
        log: print-like callable for progress, or None.

    Returns:
        A dict: steps/s, images/s and the epoch seconds of both paths, `ratio`, the optimizer
        steps each took and how far their weights moved.
    """
    import keras

    from dlmodels.training import Trainer

    keras.utils.set_random_seed(seed)
    ds = synthetic_dataset(spec, steps, seed)
    with strategy.scope():
        ours, optimizer, loss = _build(spec)
        theirs, fit_optimizer, fit_loss = _build(spec)
        initial = ours.get_weights()
        theirs.set_weights(initial)
        theirs.compile(optimizer=fit_optimizer, loss=fit_loss, metrics=_fit_metrics(spec))
    trainer = Trainer(
        ours, task=spec["task"], optimizer=optimizer, loss=loss, strategy=strategy, progress=False
    )

    def timed(fn):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - wall, time.process_time() - cpu

    paths = {
        "trainer": lambda: trainer.fit(ds, epochs=int(trainer.epoch.numpy()) + 1),
        "fit": lambda: theirs.fit(ds, epochs=1, verbose=0, shuffle=False),
    }
    for _ in range(warmup):
        for fn in paths.values():
            fn()
    wall = {k: [] for k in paths}
    cpu = {k: [] for k in paths}
    for r in range(repeats):
        for name, fn in paths.items():
            w, c = timed(fn)
            wall[name].append(w)
            cpu[name].append(c)
        if log:
            log(
                f"  round {r + 1}/{repeats}: trainer {wall['trainer'][-1]:.2f} s "
                f"(cpu {cpu['trainer'][-1]:.2f} s), fit {wall['fit'][-1]:.2f} s "
                f"(cpu {cpu['fit'][-1]:.2f} s)"
            )
    trainer_rate = steps / statistics.median(wall["trainer"])
    fit_rate = steps / statistics.median(wall["fit"])
    trainer_cpu = statistics.median(cpu["trainer"]) / steps
    fit_cpu = statistics.median(cpu["fit"]) / steps
    batch = spec["batch_size"]
    return {
        "trainer_steps_per_s": trainer_rate,
        "fit_steps_per_s": fit_rate,
        "ratio": trainer_rate / fit_rate,
        "trainer_images_per_s": trainer_rate * batch,
        "fit_images_per_s": fit_rate * batch,
        "ratio_best": min(wall["fit"]) / min(wall["trainer"]),
        "trainer_cpu_seconds_per_step": trainer_cpu,
        "fit_cpu_seconds_per_step": fit_cpu,
        "cpu_ratio": fit_cpu / trainer_cpu,
        "trainer_epoch_seconds": wall["trainer"],
        "fit_epoch_seconds": wall["fit"],
        "trainer_epoch_cpu_seconds": cpu["trainer"],
        "fit_epoch_cpu_seconds": cpu["fit"],
        "trainer_optimizer_steps": int(optimizer.iterations.numpy()),
        "fit_optimizer_steps": int(fit_optimizer.iterations.numpy()),
        "expected_optimizer_steps": (warmup + repeats) * steps,
        "trainer_weights_moved": _moved(ours, initial),
        "fit_weights_moved": _moved(theirs, initial),
        "trainer_sync_batch_norm": trainer.sync_batch_norm,
    }


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
    warmup=1,
    quick=False,
    output=DEFAULT_OUT,
    seed=0,
    verbose=True,
):
    """Measure every model under every strategy; write and return the JSON payload.

    Args:
        models: names from `MODELS` (or `QUICK_MODELS` with `quick`), or spec dicts by name;
            None: all of them.
        strategies: from `STRATEGIES`.
        steps, repeats, warmup, seed: see `measure`.
        quick: the tiny models of `QUICK_MODELS`.
        output: JSON path (None: do not write).
        verbose: print progress.
    """
    import tensorflow as tf

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
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ValueError(f"bench.training: `strategies`={bad!r}; choose from {STRATEGIES}.")
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
            if log:
                log(f"{name} / {strategy_name} ({row['replicas']} replica(s))")
            row.update(
                measure(
                    spec, strategy, steps=steps, repeats=repeats, warmup=warmup, seed=seed, log=log
                )
            )
            if log:
                log(
                    f"  trainer {row['trainer_steps_per_s']:.3f} steps/s, fit "
                    f"{row['fit_steps_per_s']:.3f} steps/s, ratio {row['ratio']:.3f} "
                    f"(cpu ratio {row['cpu_ratio']:.3f})"
                )
            rows.append(row)
    gpu_rates = [r["trainer_images_per_s"] for r in rows if gpus and "ratio" in r]
    payload = {
        "benchmark": "training throughput: dlmodels Trainer vs keras model.fit, same model, "
        "data, optimizer, loss, metrics and batch; interleaved epochs, median",
        "command": "python -m dlmodels.bench.training" + (" --quick" if quick else ""),
        "settings": {"steps_per_epoch": steps, "repeats": repeats, "warmup_epochs": warmup},
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
    parser.add_argument("--steps", type=int, default=None, help="steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=None, help="timed epochs per path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    split_cpu(2)
    run(
        args.models,
        strategies=tuple(args.strategies),
        steps=args.steps or (4 if args.quick else 10),
        repeats=args.repeats or (2 if args.quick else 5),
        quick=args.quick,
        output=args.out,
        seed=args.seed,
    )


if __name__ == "__main__":
    main()

"""The end-to-end slice behind `dlmodels demo`, `dlmodels train` and `dlmodels export`.

Synthetic shapes -> U-Net -> distributed custom training loop -> .keras / SavedModel / ONNX /
int8 ONNX -> verification of each artifact in a fresh onnxruntime process -> batch-1 latency of
every artifact measured side by side in one run. Like the CLI, this module wires data, models,
training and export together; none of those packages imports a data set.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

# Tuned so that `make demo` trains in 1-3 minutes on 2 CPU cores and clears mIoU 0.90.
DEMO_CONFIG = {
    "image_size": (64, 64),
    "depth": 3,
    "base_filters": 16,
    "upsampling": "bilinear",
    "epochs": 7,
    "batch_size": 16,
    "train_samples": 2000,
    "learning_rate": 3e-3,
}
NUM_CLASSES = 4  # the shapes data set's classes (background + 3 shapes)
PARITY_ATOL = 1e-4
INT8_MIOU_DROP = 0.01


@dataclasses.dataclass
class TrainResult:
    model: object
    test_miou: float | None
    per_class_iou: list
    train_seconds: float
    history: dict
    metric_name: str = "miou"
    test_metric: float | None = None
    summary: str | None = None


def segmentation_model_kwargs(model_name, defaults, model_kwargs=None, *, task="segmentation"):
    """Builder keyword arguments for a registry model: the `defaults` its builder accepts (by
    its signature, so DeepLab gets no `depth`), updated with `model_kwargs`.

    Raises:
        ValueError: `model_name` is not a registered segmentation model, or `model_kwargs` names
            an argument its builder does not take.
    """
    import inspect

    import dlmodels.models as registry

    entry = registry.entry(model_name)
    if entry.task != task:
        fitting = [n for n in registry.list() if registry.entry(n).task == task]
        raise ValueError(
            f"`model`={model_name!r} is a {entry.task} model; {task} training takes one of "
            f"{', '.join(fitting)}."
        )
    params = inspect.signature(entry.builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in defaults.items() if takes_any or k in params}
    unknown = [k for k in (model_kwargs or {}) if not (takes_any or k in params)]
    if unknown:
        raise ValueError(
            f"{model_name!r} takes no argument {', '.join(unknown)} (e.g. --backbone is for "
            "models built on a backbone network); its arguments: "
            f"{', '.join(p for p in params if p not in ('input_shape', 'num_classes'))}."
        )
    kwargs.update(model_kwargs or {})
    return kwargs


def segmentation_miou(labels, outputs, num_classes=NUM_CLASSES, main_output=0):
    """mIoU of argmax(outputs) against integer labels (default: the shapes classes).

    `outputs`: one array, or a list of a multi-output model's outputs of which the one at
    `main_output` is scored (`dlmodels.training.tasks.main_output_index(model)`)."""
    from dlmodels.metrics import confusion_matrix_iou

    logits = outputs[main_output] if isinstance(outputs, list | tuple) else outputs
    miou, _ = confusion_matrix_iou(labels, np.argmax(logits, axis=-1), num_classes)
    return float(miou)


def train_segmentation(
    *,
    model_name="unet",
    image_size=DEMO_CONFIG["image_size"],
    epochs=DEMO_CONFIG["epochs"],
    batch_size=DEMO_CONFIG["batch_size"],
    train_samples=DEMO_CONFIG["train_samples"],
    base_filters=DEMO_CONFIG["base_filters"],
    depth=DEMO_CONFIG["depth"],
    upsampling=DEMO_CONFIG["upsampling"],
    learning_rate=DEMO_CONFIG["learning_rate"],
    strategy="auto",
    checkpoint_dir=None,
    seed=0,
    progress=True,
    num_classes=None,
    model_kwargs=None,
) -> TrainResult:
    """Train a registry segmentation model on synthetic shapes; report test-split mIoU.

    `num_classes` defaults to the shapes data set's class count (`shapes.NUM_CLASSES`).
    `depth`, `base_filters` and `upsampling` go to builders that take them (the U-Net family);
    `model_kwargs` holds further builder arguments (e.g. `{"backbone": "resnet18"}` for
    DeepLab) and overrides those three.
    """
    import keras

    import dlmodels.models as registry
    from dlmodels.data import shapes
    from dlmodels.training import Trainer, resolve_strategy

    keras.utils.set_random_seed(seed)
    num_classes = shapes.NUM_CLASSES if num_classes is None else int(num_classes)
    strat = resolve_strategy(strategy)
    train_ds = shapes.dataset(
        "train",
        batch_size=batch_size,
        image_size=image_size,
        num_samples=train_samples,
        seed=seed,
        augment=True,
    )
    val_ds = shapes.dataset("validation", batch_size=batch_size, image_size=image_size, seed=seed)
    with strat.scope():
        defaults = {"depth": depth, "base_filters": base_filters, "upsampling": upsampling}
        if "backbone" in (model_kwargs or {}) and "depth" not in model_kwargs:
            defaults.pop("depth")  # a ResNet backbone fixes the U-Nets' depth (4 skip levels)
        kwargs = segmentation_model_kwargs(model_name, defaults, model_kwargs)
        model = registry.get(
            model_name, input_shape=(*image_size, 3), num_classes=num_classes, **kwargs
        )
        steps = epochs * (train_samples // batch_size)
        schedule = keras.optimizers.schedules.CosineDecay(learning_rate, max(steps, 1))
        optimizer = keras.optimizers.Adam(schedule)
    trainer = Trainer(
        model,
        task="segmentation",
        optimizer=optimizer,
        strategy=strat,
        checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
        progress=progress,
    )
    start = time.perf_counter()
    history = trainer.fit(train_ds, val_ds, epochs=epochs)
    seconds = time.perf_counter() - start
    images, masks = shapes.load("test", image_size=image_size, seed=seed)
    from dlmodels.training.tasks import main_output_index

    logits = model.predict(images, batch_size=32, verbose=0)
    if isinstance(logits, list | tuple):
        logits = logits[main_output_index(model)]
    from dlmodels.metrics import confusion_matrix_iou

    miou, per_class = confusion_matrix_iou(masks, np.argmax(logits, -1), num_classes)
    return TrainResult(model, float(miou), [float(v) for v in per_class], seconds, history)


DEFAULT_FOLDER_MODELS = {"segmentation": "unet", "classification": "resnet18"}


def train_from_folder(
    data_dir,
    *,
    model_name=None,
    image_size=None,
    epochs=10,
    batch_size=16,
    learning_rate=DEMO_CONFIG["learning_rate"],
    model_kwargs=None,
    ignore_index=None,
    num_classes=None,
    strategy="auto",
    checkpoint_dir=None,
    seed=0,
    progress=True,
) -> TrainResult:
    """Train a registry model on the user's own folder (`dlmodels.data.folders` layouts).

    A segmentation folder (images/ + masks/) trains a segmenter (default "unet", 3 levels of
    16 filters) and reports held-out mIoU; a classification folder (one sub-folder per class)
    trains a classifier (default "resnet18") and reports held-out accuracy. The folder is split
    80/10/10 with `seed`; the validation split is evaluated every epoch, the test split once.

    Raises:
        UserError: the folder, its files or the arguments are invalid (one clear line).
    """
    import keras

    import dlmodels.models as registry
    from dlmodels.data import folders
    from dlmodels.errors import UserError
    from dlmodels.training import Trainer, resolve_strategy

    keras.utils.set_random_seed(seed)
    data = folders.load_folder(
        data_dir,
        image_size=image_size,
        num_classes=num_classes,
        ignore_index=ignore_index,
        seed=seed,
    )
    name = (model_name or DEFAULT_FOLDER_MODELS[data.task]).lower()
    defaults = {"depth": 3, "base_filters": 16, "upsampling": "bilinear"}
    if "backbone" in (model_kwargs or {}):
        defaults.pop("depth")  # a backbone fixes the U-Nets' depth (4 skip levels)
    if data.task == "classification":
        defaults = {"include_top": True}
    try:
        kwargs = segmentation_model_kwargs(name, defaults, model_kwargs, task=data.task)
        strat = resolve_strategy(strategy)
        with strat.scope():
            model = registry.get(
                name, input_shape=data.input_shape, num_classes=data.num_classes, **kwargs
            )
            steps = epochs * max(len(data.splits["train"]) // batch_size, 1)
            schedule = keras.optimizers.schedules.CosineDecay(learning_rate, steps)
            optimizer = keras.optimizers.Adam(schedule)
    except ValueError as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"{name} on {data_dir}: {err}") from None
    train_ds = data.dataset("train", batch_size=batch_size, augment=True)
    val_ds = (
        data.dataset("validation", batch_size=batch_size)
        if len(data.splits["validation"])
        else None
    )
    trainer = Trainer(
        model,
        task=data.task,
        optimizer=optimizer,
        ignore_index=data.ignore_index,
        strategy=strat,
        checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
        progress=progress,
    )
    start = time.perf_counter()
    history = trainer.fit(train_ds, val_ds, epochs=epochs)
    seconds = time.perf_counter() - start
    x_test, y_test = data.arrays("test" if len(data.splits["test"]) else "train")
    from dlmodels.metrics import confusion_matrix_iou
    from dlmodels.training.tasks import main_output_index

    scores = model.predict(x_test, batch_size=32, verbose=0)
    if isinstance(scores, list | tuple):
        scores = scores[main_output_index(model)]
    predicted = np.argmax(scores, -1)
    if data.task == "segmentation":
        miou, per_class = confusion_matrix_iou(
            y_test, predicted, data.num_classes, ignore_index=data.ignore_index
        )
        return TrainResult(
            model, float(miou), [float(v) for v in per_class], seconds, history,
            "miou", float(miou), data.summary(),
        )  # fmt: skip
    accuracy = float(np.mean(predicted == y_test))
    return TrainResult(
        model, None, [], seconds, history, "accuracy", accuracy, data.summary()
    )  # fmt: skip


def export_and_verify(
    model,
    output_dir,
    *,
    formats=("keras", "saved_model", "onnx", "int8"),
    opset=17,
    calibration_samples=64,
    test_images=None,
    test_masks=None,
    overwrite=True,
    benchmark=True,
    iters=30,
    seed=0,
):
    """The demo's export: `dlmodels.export.write_repository` fed with synthetic shapes.

    Calibration uses train-split images, verification and mIoU the held-out test split.

    Returns:
        The RepositoryReport (`report.rows()` gives the table rows).
    """
    from dlmodels import export
    from dlmodels.data import shapes

    image_size = tuple(model.input_shape[1:3])
    if test_images is None:
        test_images, test_masks = shapes.load("test", image_size=image_size, seed=seed)
    calib, _ = shapes.load(
        "train", image_size=image_size, num_samples=calibration_samples, seed=seed
    )
    from dlmodels.training.tasks import main_output_index

    main = main_output_index(model)
    num_classes = int(model.outputs[main].shape[-1])
    segments = len(model.outputs[main].shape) == 4

    def miou(labels, outputs):
        return segmentation_miou(labels, outputs, num_classes=num_classes, main_output=main)

    return export.write_repository(
        model,
        output_dir,
        formats=formats,
        samples=test_images,
        labels=test_masks if segments else None,
        metric=miou if segments else None,
        metric_name="miou",
        calibration=calib,
        opset=opset,
        atol=PARITY_ATOL,
        int8_max_metric_drop=INT8_MIOU_DROP,
        overwrite=overwrite,
        benchmark=benchmark,
        bench_iters=iters,
    )


def print_table(rows, title="dlmodels demo"):
    """Print report rows (`RepositoryReport.rows()`): size, parity, mIoU, batch-1 latency."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("artifact", "size", "max |err| vs Keras", "test mIoU", "batch-1 p50", "vs Keras"):
        table.add_column(col, justify="left" if col == "artifact" else "right")
    for r in rows:
        size = "-" if r.get("size_bytes") is None else f"{r['size_bytes'] / 2**20:.2f} MiB"
        err = r.get("max_abs_error")
        speedup = r.get("speedup_vs_keras")
        table.add_row(
            r["artifact"],
            size,
            "reference" if err is None else f"{err:.2e}",
            f"{r['miou']:.4f}" if r.get("miou") is not None else "-",
            f"{r['p50_ms']:.2f} ms" if r.get("p50_ms") is not None else "-",
            f"{speedup:.2f}x" if speedup is not None else "-",
        )
    Console().print(table)


def run_demo(*, output_dir="artifacts", image_size=None, epochs=None, train_samples=None, seed=0):
    """Train, export, verify and benchmark; print the table; return the results dict."""
    from rich.console import Console

    from dlmodels import bench

    console = Console()
    cfg = dict(DEMO_CONFIG)
    if image_size is not None:
        cfg["image_size"] = tuple(image_size)
    if epochs is not None:
        cfg["epochs"] = epochs
    if train_samples is not None:
        cfg["train_samples"] = train_samples
    console.print(f"[bold]dlmodels demo[/]: U-Net on synthetic shapes, config {cfg}")
    result = train_segmentation(**cfg, seed=seed)
    console.print(
        f"trained in {result.train_seconds:.0f} s; held-out test mIoU {result.test_miou:.4f} "
        f"(per class {', '.join(f'{v:.3f}' for v in result.per_class_iou)})"
    )
    report = export_and_verify(result.model, output_dir, seed=seed)
    rows = report.rows()
    print_table(rows)
    fp32 = [r for r in rows if r["format"] in ("keras", "saved_model")]
    checks = {
        "test mIoU >= 0.90": result.test_miou >= 0.90,
        f"ONNX max abs error <= {PARITY_ATOL:g}": all(
            r["max_abs_error"] <= PARITY_ATOL for r in rows if r["format"] == "onnx"
        ),
        f"reloaded .keras and SavedModel max abs error <= {PARITY_ATOL:g}": all(
            r["max_abs_error"] <= PARITY_ATOL for r in fp32
        ),
        "int8 mIoU within 1 point of fp32": all(r["passed"] for r in rows if r["format"] == "int8"),
        "int8 faster than ONNX fp32": _faster(rows, "ONNX int8", "ONNX fp32"),
    }
    for text, ok in checks.items():
        console.print(f"{'[green]PASS' if ok else '[red]FAIL'}[/] {text}")
    results = {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "train_seconds": result.train_seconds,
        "test_miou": result.test_miou,
        "per_class_iou": result.per_class_iou,
        "rows": rows,
        "manifest": str(report.manifest_path),
        "checks": checks,
        "passed": all(checks.values()),
        "machine": bench.machine_info(),
    }
    path = Path(output_dir) / "demo_results.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    console.print(f"artifacts and manifest in {output_dir}/; results in {path}")
    return results


def _faster(rows, a, b):
    ta = next((r.get("p50_ms") for r in rows if r["artifact"] == a), None)
    tb = next((r.get("p50_ms") for r in rows if r["artifact"] == b), None)
    return ta is not None and tb is not None and ta < tb


def run_bench(*, model_path=None, output, iters=50, seed=0):
    """Benchmark a .keras model (or an untrained demo U-Net): Keras/TF vs ONNX fp32 vs int8.

    Inputs are synthetic shapes images at the model's input size (3-channel image models);
    mIoU is reported only for 4-class models (the shapes classes).
    """
    import tempfile

    import keras

    import dlmodels.models as registry
    from dlmodels import bench

    if model_path is None:
        cfg = DEMO_CONFIG
        model = registry.get(
            "unet",
            input_shape=(*cfg["image_size"], 3),
            num_classes=NUM_CLASSES,
            depth=cfg["depth"],
            base_filters=cfg["base_filters"],
            upsampling=cfg["upsampling"],
        )
        source = "untrained demo U-Net"
    else:
        model = keras.saving.load_model(model_path, safe_mode=True)
        source = f"{model.name} ({model.count_params():,} params) from {Path(model_path).name}"
    shape = tuple(model.inputs[0].shape)
    if len(model.inputs) != 1 or len(shape) != 4 or shape[3] != 3 or None in shape[1:3]:
        raise ValueError(
            f"bench measures single-input image models of fixed size (batch, H, W, 3); "
            f"{model.name!r} has inputs {[tuple(t.shape) for t in model.inputs]}. Use "
            "dlmodels.bench.compare from Python for other models."
        )
    is_shapes = int(model.outputs[0].shape[-1]) == NUM_CLASSES and len(model.outputs) == 1
    with tempfile.TemporaryDirectory() as tmp:
        report = export_and_verify(
            model, tmp, formats=("onnx", "int8"), iters=iters, seed=seed, overwrite=True
        )
    rows = report.rows()
    payload = {
        "benchmark": "batch-1 latency, Keras/TF tf.function vs onnxruntime fp32 vs int8",
        "model": source,
        "results": [
            {
                k: r.get(k)
                for k in ("artifact", "p50_ms", "speedup_vs_keras", "max_abs_error", "agreement")
            }
            | ({"miou": r.get("miou")} if is_shapes else {})
            for r in rows
        ],
    }
    bench.write_results(output, payload)
    return payload

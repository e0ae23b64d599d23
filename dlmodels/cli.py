"""`dlmodels` command line: models, train, export, verify, bench, demo.

Heavy imports (TensorFlow, onnxruntime) happen inside the commands so `dlmodels --help` is fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="dlmodels: paper-faithful Keras models, trained with tf.distribute, exported, verified.",
)


def _quiet_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _console():
    from rich.console import Console

    return Console()


@app.command("models")
def models_cmd():
    """List the registered models with their task and paper."""
    _quiet_tf()
    from rich.table import Table

    import dlmodels.models as registry

    table = Table("name", "task", "paper", title="dlmodels registry")
    for name in registry.list():
        e = registry.entry(name)
        table.add_row(e.name, e.task, e.paper)
    _console().print(table)


def _parse_size(value: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in value.lower().replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise typer.BadParameter(f"--image-size must look like 96 or 96x128, got {value!r}")
    return parts[0], parts[1]


@app.command("train")
def train_cmd(
    output: Annotated[Path, typer.Option(help="where the trained .keras model is written")] = Path(
        "artifacts/model.keras"
    ),
    model: Annotated[str, typer.Option(help="registry name (see `dlmodels models`)")] = "unet",
    image_size: Annotated[str, typer.Option(help="HxW of the synthetic shapes")] = "64",
    epochs: Annotated[int, typer.Option(min=1)] = 7,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    train_samples: Annotated[int, typer.Option(min=1)] = 2000,
    base_filters: Annotated[int, typer.Option(min=1)] = 16,
    depth: Annotated[int, typer.Option(min=1)] = 3,
    strategy: Annotated[str, typer.Option(help="auto|default|one_device|mirrored|...")] = "auto",
    checkpoint_dir: Annotated[Path | None, typer.Option(help="resume from / save to")] = None,
    seed: int = 0,
    overwrite: bool = False,
):
    """Train a segmentation model on the synthetic shapes data set and save it as .keras."""
    _quiet_tf()
    from dlmodels import demo

    size = _parse_size(image_size)
    result = demo.train_segmentation(
        model_name=model,
        image_size=size,
        epochs=epochs,
        batch_size=batch_size,
        train_samples=train_samples,
        base_filters=base_filters,
        depth=depth,
        strategy=strategy,
        checkpoint_dir=checkpoint_dir,
        seed=seed,
    )
    from dlmodels import export

    export.to_keras(result.model, output, overwrite=overwrite)
    _console().print(
        f"test mIoU {result.test_miou:.4f} after {result.train_seconds:.0f} s; wrote {output}"
    )


@app.command("export")
def export_cmd(
    model_path: Annotated[Path, typer.Argument(help="a .keras file")],
    output_dir: Annotated[Path, typer.Option(help="directory for the artifacts")] = Path(
        "artifacts/export"
    ),
    formats: Annotated[str, typer.Option(help="comma list of saved_model,onnx,int8")] = (
        "saved_model,onnx,int8"
    ),
    opset: int = 17,
    calibration_samples: Annotated[int, typer.Option(min=1)] = 64,
    overwrite: bool = False,
):
    """Export a .keras segmentation model to SavedModel / ONNX / int8 ONNX, verify each, and
    write manifest.json. Calibration and verification use synthetic shapes images."""
    _quiet_tf()
    import keras

    from dlmodels import demo

    if not model_path.exists():
        raise typer.BadParameter(f"{model_path} does not exist", param_hint="MODEL_PATH")
    wanted = [f.strip() for f in formats.split(",") if f.strip()]
    unknown = sorted(set(wanted) - {"saved_model", "onnx", "int8"})
    if unknown:
        raise typer.BadParameter(
            f"unknown formats {unknown}; choose from saved_model, onnx, int8",
            param_hint="--formats",
        )
    model = keras.saving.load_model(model_path)
    rows = demo.export_and_verify(
        model,
        output_dir,
        formats=wanted,
        opset=opset,
        calibration_samples=calibration_samples,
        overwrite=overwrite,
    )
    demo.print_table(rows, title=f"exported {model_path}")


@app.command("demo")
def demo_cmd(
    output_dir: Annotated[Path, typer.Option(help="where artifacts go")] = Path("artifacts"),
    image_size: Annotated[str | None, typer.Option(help="HxW; default: the demo setting")] = None,
    epochs: Annotated[int | None, typer.Option(help="default: the tuned demo setting")] = None,
    train_samples: Annotated[int | None, typer.Option(min=8)] = None,
    seed: int = 0,
):
    """Train a U-Net on synthetic shapes, export .keras / SavedModel / ONNX / int8 ONNX, verify
    every artifact against Keras and print size, parity, mIoU and batch-1 latency side by side."""
    _quiet_tf()
    from dlmodels import demo

    results = demo.run_demo(
        output_dir=output_dir,
        image_size=None if image_size is None else _parse_size(image_size),
        epochs=epochs,
        train_samples=train_samples,
        seed=seed,
    )
    if not results["passed"]:
        raise typer.Exit(code=1)


@app.command("bench")
def bench_cmd(
    model_path: Annotated[
        Path | None, typer.Argument(help="a .keras model; default: a U-Net from the demo config")
    ] = None,
    output: Annotated[Path, typer.Option(help="JSON results file")] = Path(
        "benchmarks/results/unet_latency.json"
    ),
    iters: Annotated[int, typer.Option(min=1)] = 50,
):
    """Batch-1 latency of Keras/TF, ONNX fp32 and int8 measured side by side; writes JSON."""
    _quiet_tf()
    from dlmodels import demo

    payload = demo.run_bench(model_path=model_path, output=output, iters=iters)
    _console().print_json(json.dumps(payload["results"]))


def main():  # console_scripts entry point
    app()


if __name__ == "__main__":
    main()

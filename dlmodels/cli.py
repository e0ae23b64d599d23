"""`dlmodels` command line: models, train, sample, export, verify, quantize, bench, demo,
serve, launch.

Heavy imports (TensorFlow, onnxruntime) happen inside the commands so `dlmodels --help` is fast.

Errors: a user error prints one plain line `error: ...` to stderr and exits with status 2, for
every command, whatever the terminal width (no panel, no traceback). User errors are click/typer
usage errors (BadParameter included), FileNotFoundError / FileExistsError (and the other
path-kind OS errors) on the paths given, and `dlmodels.errors.UserError`, which dlmodels' own
validation raises (bad formats, data that do not match the model, invalid manifests, ops ONNX
cannot express, ...). Anything else, a plain ValueError from Keras or tf2onnx included, is a bug
or an environment problem: one line `internal error: ...` and status 1; set DLMODELS_DEBUG=1 to
get the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from dlmodels.errors import UserError

USER_ERROR_EXIT = 2
DEBUG_ENV = "DLMODELS_DEBUG"


def _user_error_types() -> tuple[type[BaseException], ...]:
    # dlmodels' own validation raises UserError (ManifestError, UnsupportedOpError and the
    # argument checks of dlmodels._validation included); the OS errors are missing inputs and
    # refused overwrites. A bare ValueError is not here: from Keras, TensorFlow, tf2onnx or
    # onnxruntime it is a bug or an environment problem, reported as an internal error.
    return (
        UserError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        IsADirectoryError,
    )


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(prefix: str, text: str, code: int):
    sys.stderr.write(f"{prefix}: {_one_line(text)}\n")
    sys.stderr.flush()
    sys.exit(code)


class OneLineErrors(TyperGroup):
    """The typer group of `dlmodels`, with errors reported as one plain line (see module doc)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as err:  # click's usage errors, BadParameter, ...
            ctx = getattr(err, "ctx", None)
            if type(err).__name__ == "NoArgsIsHelpError" and ctx is not None:
                sys.stdout.write(ctx.get_help() + "\n")
                sys.exit(USER_ERROR_EXIT)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            _fail("error", err.format_message() + hint, getattr(err, "exit_code", 1) or 1)
        except typer.Abort:
            _fail("error", "aborted", 1)
        except KeyboardInterrupt:
            _fail("error", "interrupted", 130)
        except _user_error_types() as err:
            if debug:
                raise
            text = str(err) or type(err).__name__
            if isinstance(err, FileExistsError):  # the library's advice, in CLI terms
                text = text.replace("pass overwrite=True", "pass --overwrite")
            _fail("error", text, USER_ERROR_EXIT)
        except Exception as err:
            if debug:
                raise
            _fail(
                "internal error",
                f"{type(err).__name__}: {err} (set {DEBUG_ENV}=1 for the traceback)",
                1,
            )
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="dlmodels: paper-faithful Keras models, trained with tf.distribute, exported, verified.",
)


def _quiet_tf():
    """Import TensorFlow without its native start-up lines on stderr.

    TF_CPP_MIN_LOG_LEVEL no longer silences the absl lines TensorFlow prints while loading and
    probing for devices ("oneDNN custom operations are on", "Could not find cuda drivers"), so
    a user error would not be the one line the CLI promises. The C-level stderr is pointed at
    /dev/null for the import and device discovery only; Python exceptions still propagate.
    DLMODELS_DEBUG=1 keeps everything.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules or os.environ.get(DEBUG_ENV):
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real file descriptor 2 (embedded / captured)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf

        tf.config.list_logical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _precision_scope(precision: str):
    """The `--precision` choice checked up front, said on stderr, and applied as Keras' global
    dtype policy while the model is built and trained."""
    from dlmodels.training import precision_scope, resolve_precision

    try:
        chosen = resolve_precision(precision)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--precision") from None
    if precision != "float32":
        typer.echo(f"precision: {chosen.policy} ({chosen.reason})", err=True)
    return precision_scope(chosen)


def _console():
    from rich.console import Console

    return Console()


@app.command("models")
def models_cmd():
    """List the registered models with their task and paper.

    Examples:

        dlmodels models

        dlmodels train --model unet3plus --output unet3plus.keras
    """
    _quiet_tf()
    from rich.table import Table

    import dlmodels.models as registry

    table = Table("name", "task", "paper", title="dlmodels registry")
    for name in registry.list():
        e = registry.entry(name)
        table.add_row(e.name, e.task, e.paper)
    _console().print(table)


def _parse_size(value: str, option: str = "--image-size") -> tuple[int, int]:
    try:
        parts = [int(v) for v in value.lower().replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise typer.BadParameter(
            f"{option} must look like 96 or 96x128, got {value!r}", param_hint=option
        )
    return parts[0], parts[1]


def _parse_formats(value: str | None, allowed) -> list[str]:
    wanted = [f.strip() for f in (value or "").split(",") if f.strip()]
    unknown = sorted(set(wanted) - set(allowed))
    if unknown or not wanted:
        raise typer.BadParameter(
            f"unknown formats {unknown or '(none given)'}; choose from {', '.join(allowed)}",
            param_hint="--formats",
        )
    return wanted


def _existing_file(path: Path, what: str, param_hint: str) -> Path:
    if not path.exists():
        raise typer.BadParameter(f"{what} {path} does not exist", param_hint=param_hint)
    return path


def _load_model(path: Path):
    import dlmodels

    _existing_file(path, "model file", "MODEL_PATH")
    if path.is_dir() or path.suffix != ".keras":
        raise UserError(
            f"MODEL_PATH {path} is not a .keras file; export takes a model saved with "
            "model.save('model.keras') or `dlmodels train`."
        )
    import dlmodels.models  # registers the VAE / ConditionalGAN model classes

    try:
        # dlmodels.load_model registers every dlmodels serializable (layers, losses, metrics).
        return dlmodels.load_model(str(path), safe_mode=True)
    except Exception as err:
        raise UserError(
            f"cannot load {path} as a Keras model ({type(err).__name__}: "
            f"{_one_line(err)[:300]}); "
            "custom layers must be registered (keras.saving.register_keras_serializable)."
        ) from err


@app.command("train")
def train_cmd(
    output: Annotated[Path, typer.Option(help="where the trained .keras model is written")] = Path(
        "artifacts/model.keras"
    ),
    model: Annotated[
        str | None,
        typer.Option(
            help="registry name (see `dlmodels models`; default unet, or resnet18 for a "
            "classification --data folder); vae or cgan train on --dataset"
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="your own data: a folder with images/ and masks/ (PNG class indices) for "
            "segmentation, or one sub-folder of images per class for classification; split "
            "80/10/10 by --seed"
        ),
    ] = None,
    ignore_index: Annotated[
        int | None, typer.Option(help="--data: mask value of void pixels (e.g. 255)")
    ] = None,
    num_classes: Annotated[
        int | None,
        typer.Option(min=1, help="--data: classes (default: inferred from masks / folders)"),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            help="vae / cgan: digits (8x8, default) or shapes (one synthetic shape per image, "
            "3 classes); segmentation models train on the synthetic shapes"
        ),
    ] = None,
    image_size: Annotated[
        str | None,
        typer.Option(help="HxW of the synthetic shapes (default 64; 16 for vae / cgan)"),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="default: 7 (segmentation), 40 (vae), 60 (cgan)")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    train_samples: Annotated[int, typer.Option(min=1)] = 2000,
    base_filters: Annotated[int, typer.Option(min=1)] = 16,
    depth: Annotated[
        int | None, typer.Option(min=1, help="U-Nets: levels (default 3; 4 with --backbone)")
    ] = None,
    backbone: Annotated[
        str | None,
        typer.Option(
            help="segmentation: a ResNet name (resnet18 ... resnet152v2) for models that take "
            "one (DeepLab, FCN, PSPNet; the U-Nets' own encoder when omitted)"
        ),
    ] = None,
    output_stride: Annotated[
        int | None, typer.Option(help="DeepLab / PSPNet: 8 or 16 (default: the model's)")
    ] = None,
    strategy: Annotated[str, typer.Option(help="auto|default|one_device|mirrored|...")] = "auto",
    precision: Annotated[
        str,
        typer.Option(
            help="float32, mixed_float16, mixed_bfloat16, or auto (from the whole machine): "
            "mixed_float16 on GPUs with tensor cores, mixed_bfloat16 on TPUs and CPUs with "
            "AVX512-BF16 / AMX-BF16"
        ),
    ] = "float32",
    checkpoint_dir: Annotated[Path | None, typer.Option(help="resume from / save to")] = None,
    latent_dim: Annotated[
        int | None, typer.Option(min=1, help="vae / cgan: size of z (default 8 / 32)")
    ] = None,
    gan_loss: Annotated[
        str, typer.Option(help="cgan: non_saturating, minimax or wgan_gp")
    ] = "non_saturating",
    seed: int = 0,
    overwrite: bool = False,
):
    """Train a model and save it as .keras: a segmentation model on the synthetic shapes or on
    your own folder (--data), a classifier on your folder, or (--model vae | cgan) a VAE or
    conditional GAN on scikit-learn's 8x8 digits or (--dataset shapes) on synthetic
    single-shape images.

    Examples:

        dlmodels train --epochs 8 --output unet.keras

        dlmodels train --data my_masks/ --image-size 128x128 --ignore-index 255

        dlmodels train --data my_classes/ --model resnet18 --epochs 20

        dlmodels train --model deeplabv3plus --backbone resnet18 --output-stride 8

        dlmodels train --precision auto --epochs 8
    """
    _quiet_tf()
    from dlmodels import demo, export
    from dlmodels.export._atomic import check_target

    scope = _precision_scope(precision)

    size = None if image_size is None else _parse_size(image_size)
    import dlmodels.models as registry

    if data is not None:
        if not data.is_dir():
            raise FileNotFoundError(f"--data {data} is not a folder")
        if dataset is not None:
            raise typer.BadParameter("use either --data or --dataset", param_hint="--dataset")
        if model is not None and model.lower() not in registry.list():
            raise typer.BadParameter(
                f"{model!r} is not a registered model; choose from {', '.join(registry.list())}",
                param_hint="--model",
            )
        check_target(output, overwrite=overwrite)
        model_kwargs = {}
        if backbone is not None:
            model_kwargs["backbone"] = backbone
        if output_stride is not None:
            model_kwargs["output_stride"] = output_stride
        if depth is not None:
            model_kwargs["depth"] = depth
        with scope:
            result = demo.train_from_folder(
                data,
                model_name=model,
                image_size=size,
                epochs=10 if epochs is None else epochs,
                batch_size=batch_size,
                model_kwargs=model_kwargs,
                ignore_index=ignore_index,
                num_classes=num_classes,
                strategy=strategy,
                checkpoint_dir=checkpoint_dir,
                seed=seed,
            )
        export.to_keras(result.model, output, overwrite=overwrite)
        typer.echo(result.summary)  # plain lines: no wrapping of long paths
        typer.echo(
            f"test {result.metric_name} {result.test_metric:.4f} after "
            f"{result.train_seconds:.0f} s; wrote {output}"
        )
        return
    model = model or "unet"
    if ignore_index is not None or num_classes is not None:
        raise typer.BadParameter(
            "--ignore-index and --num-classes apply to --data folders", param_hint="--data"
        )

    if model.lower() not in registry.list():
        raise typer.BadParameter(
            f"{model!r} is not a registered model; choose from {', '.join(registry.list())} "
            "(see `dlmodels models`)",
            param_hint="--model",
        )
    if dataset is not None and dataset not in GENERATIVE_DATASETS:
        raise typer.BadParameter(
            f"must be one of {', '.join(GENERATIVE_DATASETS)}, got {dataset!r}",
            param_hint="--dataset",
        )
    if model.lower() in GENERATIVE_MODELS:
        dataset = dataset or "digits"
        if dataset == "digits" and size is not None:
            raise typer.BadParameter(
                "the digits are 8x8; --image-size applies to --dataset shapes",
                param_hint="--image-size",
            )
        with scope:
            _train_generative(
                model.lower(),
                dataset,
                (size or (16, 16)) if dataset == "shapes" else None,
                output,
                epochs,
                batch_size,
                latent_dim,
                gan_loss,
                strategy,
                seed,
                overwrite,
            )
        return
    if dataset not in (None, "shapes"):
        raise typer.BadParameter(
            f"{model} is a segmentation model: it trains on the synthetic shapes only "
            "(--dataset digits is for vae / cgan)",
            param_hint="--dataset",
        )
    epochs = 7 if epochs is None else epochs
    if depth is None:
        depth = 4 if backbone is not None else 3  # a ResNet backbone gives 4 skip levels
    model_kwargs = {}
    if backbone is not None:
        model_kwargs["backbone"] = backbone
    if output_stride is not None:
        model_kwargs["output_stride"] = output_stride
    try:  # build once to validate the arguments (input size, stride, backbone) up front
        registry.get(
            model.lower(),
            input_shape=(*(size or (64, 64)), 3),
            num_classes=4,
            **demo.segmentation_model_kwargs(
                model.lower(), {"depth": depth, "base_filters": base_filters}, model_kwargs
            ),
        )
    except ValueError as err:
        raise UserError(_one_line(err)) from None
    check_target(output, overwrite=overwrite)  # refuse before minutes of training
    with scope:
        result = demo.train_segmentation(
            model_kwargs=model_kwargs,
            model_name=model.lower(),
            image_size=size or (64, 64),
            epochs=epochs,
            batch_size=batch_size,
            train_samples=train_samples,
            base_filters=base_filters,
            depth=depth,
            strategy=strategy,
            checkpoint_dir=checkpoint_dir,
            seed=seed,
        )
    export.to_keras(result.model, output, overwrite=overwrite)
    _console().print(
        f"test mIoU {result.test_miou:.4f} after {result.train_seconds:.0f} s; wrote {output}"
    )


GENERATIVE_MODELS = ("vae", "cgan")
GAN_LOSS_CHOICES = ("non_saturating", "minimax", "wgan_gp")
GENERATIVE_DATASETS = ("digits", "shapes")


def _train_generative(
    name,
    dataset,
    image_size,
    output,
    epochs,
    batch_size,
    latent_dim,
    gan_loss,
    strategy,
    seed,
    overwrite,
):
    """`dlmodels train --model vae|cgan --dataset digits|shapes`: train, report, save .keras."""
    from dlmodels import export
    from dlmodels.bench import generative
    from dlmodels.export._atomic import check_target
    from dlmodels.training import resolve_strategy

    if name == "cgan" and gan_loss not in GAN_LOSS_CHOICES:
        raise typer.BadParameter(
            f"must be one of {', '.join(GAN_LOSS_CHOICES)}, got {gan_loss!r}",
            param_hint="--gan-loss",
        )
    check_target(output, overwrite=overwrite)  # refuse before the training
    resolved = resolve_strategy(strategy)
    if name == "vae":
        model, curve = generative.train_vae(
            epochs=epochs or 40,
            latent_dim=latent_dim or 8,
            batch_size=batch_size,
            seed=seed,
            strategy=resolved,
            verbose=False,
            dataset=dataset,
            image_size=image_size,
        )
        summary = (
            f"held-out -ELBO {curve[0]['test_neg_elbo']:.2f} -> {curve[-1]['test_neg_elbo']:.2f}"
            " nats/image"
        )
    else:
        model, _ = generative.train_cgan(
            epochs=epochs or 60,
            latent_dim=latent_dim or 32,
            batch_size=batch_size,
            loss=gan_loss,
            seed=seed,
            strategy=resolved,
            verbose=False,
            dataset=dataset,
            image_size=image_size,
        )
        classifier, _ = generative.train_classifier(seed, dataset, image_size=image_size)
        accuracy = generative.conditional_accuracy(model, classifier, n=1000, seed=seed)
        summary = f"conditional accuracy {accuracy:.3f} (1,000 samples, random labels)"
    export.to_keras(model, output, overwrite=overwrite)
    typer.echo(f"{name} on {dataset}: {summary}; wrote {output}")


def _parse_labels(value: str | None):
    if value is None:
        return None
    try:
        labels = [int(v) for v in value.replace(" ", "").split(",") if v != ""]
    except ValueError:
        labels = []
    if not labels:
        raise typer.BadParameter(
            f"must be class ids separated by commas, like 0,3,7; got {value!r}",
            param_hint="--labels",
        )
    return labels


@app.command("sample")
def sample_cmd(
    model_path: Annotated[Path, typer.Argument(help="a VAE or ConditionalGAN .keras file")],
    output: Annotated[Path, typer.Option(help="the PNG grid to write")] = Path(
        "artifacts/samples.png"
    ),
    n: Annotated[int, typer.Option(min=1, help="images per row")] = 10,
    rows: Annotated[int, typer.Option(min=1, help="vae: rows of prior samples")] = 10,
    labels: Annotated[
        str | None, typer.Option(help="cgan: one row per class id, e.g. 0,3,7; default: all")
    ] = None,
    npz: Annotated[Path | None, typer.Option(help="also save the images (and labels)")] = None,
    seed: int = 0,
    overwrite: bool = False,
):
    """Draw samples from a trained VAE (prior samples) or conditional GAN (one row per class)
    and write them as a PNG grid; z is drawn here, the model itself has no random op.

    Examples:

        dlmodels sample cgan.keras --labels 0,3,7 --n 8 --output grid.png

        dlmodels sample vae.keras --rows 4 --n 8 --output vae.png --npz vae.npz
    """
    _quiet_tf()
    import numpy as np

    from dlmodels.bench.generative import save_grid
    from dlmodels.export._atomic import check_target
    from dlmodels.models import VAE, ConditionalGAN

    wanted = _parse_labels(labels)
    if output.suffix.lower() != ".png":
        raise typer.BadParameter(f"must end in .png, got {output}", param_hint="--output")
    check_target(output, overwrite=overwrite)
    if npz is not None:
        check_target(npz, overwrite=overwrite)
    model = _load_model(model_path)
    if isinstance(model, ConditionalGAN):
        classes = list(range(model.num_classes)) if wanted is None else wanted
        ids = np.repeat(np.asarray(classes), n)
        images = model.sample(ids, seed=seed)  # UserError for ids outside [0, num_classes)
        save_grid(images, output, len(classes), n, row_labels=classes)
        what = f"{len(classes)} classes x {n}"
    elif isinstance(model, VAE):
        if wanted is not None:
            raise typer.BadParameter("a VAE takes no labels", param_hint="--labels")
        ids = None
        images = model.sample(rows * n, seed=seed)
        save_grid(images, output, rows, n)
        what = f"{rows} x {n} prior samples"
    else:
        raise UserError(
            f"{model_path} holds a {type(model).__name__}; `dlmodels sample` takes a VAE or "
            "ConditionalGAN saved by `dlmodels train --model vae|cgan`."
        )
    if npz is not None:
        arrays = {"x": images} if ids is None else {"x": images, "y": ids.astype("int32")}
        np.savez(npz, **arrays)
    typer.echo(f"wrote {output} ({what})")


def _random_inputs(model, n: int, image_size, seed: int) -> dict:
    """Inputs for parity checks when the user gave no data (never for calibration)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = {}
    for t in model.inputs:
        shape = list(t.shape)
        shape[0] = n
        dynamic = [i for i, d in enumerate(shape) if d is None]
        if dynamic:
            if image_size is None or len(shape) != 4 or dynamic != [1, 2]:
                raise UserError(
                    f"input {t.name!r} has dynamic dimensions {tuple(t.shape)}; give --data "
                    "(or --image-size HxW for an image input of dynamic size)."
                )
            shape[1], shape[2] = image_size
        if "int" in str(t.dtype):
            out[t.name] = rng.integers(0, 2, shape).astype(str(t.dtype))
        else:
            out[t.name] = rng.uniform(0, 1, shape).astype(str(t.dtype))
    return out


def _task_metric(model, labels, ignore_index: int | None = None):
    """(metric_name, metric) for the model's task when labels were given, else (None, None).

    Segmentation: mIoU over the classes, pixels labelled `ignore_index` left out. Classification:
    accuracy of the first output; a 1-unit output is thresholded according to what the model
    says it returns (`model_output_kinds`): 0.5 for a sigmoid, 0 for logits. A 1-unit output of
    another kind gets no metric (parity only) rather than a guess.
    """
    import numpy as np

    from dlmodels import export

    task, num_classes = export.model_task(model)
    if labels is None or task is None:
        return None, None
    _check_labels(labels, num_classes, ignore_index)
    if task == "segmentation":
        from dlmodels.metrics import confusion_matrix_iou

        def miou(y, outputs):
            logits = outputs[0] if isinstance(outputs, list) else outputs
            pred = np.argmax(logits, -1)
            return float(confusion_matrix_iou(y, pred, num_classes, ignore_index=ignore_index)[0])

        return "miou", miou

    kind = next(iter(export.model_output_kinds(model).values()), "unknown")
    if model.outputs[0].shape[-1] == 1 and kind not in ("sigmoid", "logits"):
        return None, None
    threshold = 0.5 if kind == "sigmoid" else 0.0

    def accuracy(y, outputs):
        scores = outputs[0] if isinstance(outputs, list) else outputs
        y = np.asarray(y).reshape(len(scores), -1)[:, 0] if np.ndim(y) > 1 else np.asarray(y)
        pred = scores[:, 0] > threshold if scores.shape[-1] == 1 else np.argmax(scores, -1)
        keep = np.ones(len(y), bool) if ignore_index is None else y != ignore_index
        if not keep.any():
            return float("nan")
        return float(np.mean(pred[keep].astype(int) == y[keep].astype(int)))

    return "accuracy", accuracy


def _check_labels(labels, num_classes: int, ignore_index: int | None) -> None:
    """Labels must be class ids in [0, num_classes) or the ignore index: say so up front, not
    as an error deep inside the metric."""
    import numpy as np

    y = np.asarray(labels)
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise UserError(f"labels (y) have dtype {y.dtype}; expected integer class ids")
    if np.issubdtype(y.dtype, np.floating) and not np.all(np.mod(y, 1) == 0):
        raise UserError("labels (y) are not whole numbers; expected integer class ids")
    values = y if ignore_index is None else y[y != ignore_index]
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        hint = (
            " Mark void pixels or samples with --ignore-index (e.g. --ignore-index 255)."
            if ignore_index is None
            else f" (--ignore-index {ignore_index} is left out)."
        )
        raise UserError(
            f"labels (y) hold values in [{values.min()}, {values.max()}]; the model has "
            f"{num_classes} classes, so labels must lie in [0, {num_classes})." + hint
        )


def _split(inputs: dict, labels, calibration_samples: int, verify_samples: int):
    """Calibration and verification samples from the user's data, disjoint when possible.

    `inputs` / `labels` come in a seeded random order already (`load_arrays(seed=...)`), so
    neither part is biased by how the file is sorted (e.g. by class).
    """
    n = len(next(iter(inputs.values())))
    if n >= 4:
        cut = min(calibration_samples, (n + 1) // 2)
        calib = {k: v[:cut] for k, v in inputs.items()}
        rest = slice(cut, cut + verify_samples)
        check = {k: v[rest] for k, v in inputs.items()}
        return calib, check, None if labels is None else labels[rest], True
    calib = {k: v[:calibration_samples] for k, v in inputs.items()}
    check = {k: v[:verify_samples] for k, v in inputs.items()}
    return calib, check, None if labels is None else labels[:verify_samples], False


def _print_report(report, title: str):
    from rich.table import Table

    table = Table(title=title)
    metric = report.metric_name
    for col in ("artifact", "size", "max |err| vs Keras", "agreement", metric or "metric", "ok"):
        table.add_column(col, justify="left" if col == "artifact" else "right")
    for r in report.rows():
        size = "-" if r.get("size_bytes") is None else f"{r['size_bytes'] / 2**20:.2f} MiB"
        err = "-" if r.get("max_abs_error") is None else f"{r['max_abs_error']:.2e}"
        agreement = "-" if r.get("agreement") is None else f"{r['agreement']:.4f}"
        value = "-" if r.get("metric") is None else f"{r['metric']:.4f}"
        ok = "-" if r.get("passed") is None else ("PASS" if r["passed"] else "FAIL")
        table.add_row(r["artifact"], size, err, agreement, value, ok)
    _console().print(table)


@app.command("export")
def export_cmd(
    model_path: Annotated[Path, typer.Argument(help="a .keras file")],
    output_dir: Annotated[Path, typer.Option(help="directory for the artifacts")] = Path(
        "artifacts/export"
    ),
    formats: Annotated[
        str | None,
        typer.Option(
            help="comma list of keras,saved_model,onnx,int8,fp16,litert,litert_fp16,litert_int8; "
            "default: keras,saved_model,onnx,int8 with --data, all but int8 without"
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help=".npz (arrays named after the model inputs, or x; labels y), .npy, or a folder "
            "of images; used for int8 calibration and verification"
        ),
    ] = None,
    image_size: Annotated[
        str | None, typer.Option(help="HxW for models whose input size is dynamic")
    ] = None,
    calibration_samples: Annotated[int, typer.Option(min=1)] = 64,
    verify_samples: Annotated[int, typer.Option(min=1)] = 64,
    opset: Annotated[int, typer.Option(min=13, max=18, help="ONNX opset, 13..18")] = 17,
    simplify: Annotated[
        bool, typer.Option(help="simplify the ONNX graph with onnxslim (parity re-checked)")
    ] = False,
    atol: Annotated[float, typer.Option(min=0.0, help="fp32 parity bar")] = 1e-4,
    int8_max_metric_drop: Annotated[float, typer.Option(min=0.0)] = 0.01,
    int8_min_agreement: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.9,
    reduce_range: Annotated[
        str, typer.Option(help="auto (from this CPU's instruction set), on or off")
    ] = "auto",
    ignore_index: Annotated[
        int | None,
        typer.Option(help="label value left out of the metric (void pixels, e.g. 255)"),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    overwrite: bool = False,
    seed: Annotated[int, typer.Option(help="shuffles --data before the split; random inputs")] = 0,
):
    """Export a .keras model to .keras / SavedModel / ONNX / int8 ONNX, verify every artifact
    against Keras and write manifest.json. Task (segmentation / classification), classes,
    input shape and output kind are read from the model; calibration and verification data
    come from --data (without it, parity is checked on random inputs and int8 is not made).

    Examples:

        dlmodels export artifacts/model.keras --output-dir out --data data.npz

        dlmodels export model.keras --output-dir out --data my_masks/ --ignore-index 255

        dlmodels export model.keras --output-dir out --formats onnx --json
    """
    _quiet_tf()
    from dlmodels import export

    wanted = None if formats is None else _parse_formats(formats, export.FORMATS)
    if simplify and wanted is not None and not {"onnx", "int8", "fp16"} & set(wanted):
        raise typer.BadParameter(
            f"--simplify applies to ONNX graphs, and --formats {','.join(wanted)} has none: add "
            "onnx (or int8 / fp16) or drop --simplify",
            param_hint="--simplify",
        )
    if data is not None:
        _existing_file(data, "file", "--data")
    if {"int8", "litert_int8"} & set(wanted or []) and data is None:
        raise typer.BadParameter(
            "int8 needs calibration data: pass --data DATA.npz|FOLDER, or drop int8",
            param_hint="--formats",
        )
    size = None if image_size is None else _parse_size(image_size)
    reduce = {"auto": None, "on": True, "off": False}.get(reduce_range.lower(), "bad")
    if reduce == "bad":
        raise typer.BadParameter(
            f"must be auto, on or off, got {reduce_range!r}", param_hint="--reduce-range"
        )
    model = _load_model(model_path)
    task, num_classes = export.model_task(model)
    names = [t.name for t in model.inputs]
    # Plain lines, not rich: messages with paths must not be wrapped at the terminal width.
    say = (lambda *a, **k: None) if json_output else typer.echo
    if data is None:
        wanted = wanted or ["keras", "saved_model", "onnx"]
        calib = None
        check = _random_inputs(model, min(verify_samples, 8), size, seed)
        labels = None
        say(
            f"no --data: checking parity on {len(next(iter(check.values())))} random inputs "
            "(no task metric; int8 needs --data)"
        )
    else:
        from dlmodels.data.arrays import load_arrays

        wanted = wanted or list(export.DEFAULT_FORMATS)
        # A seeded random subset, in random order: the calibration / verification split below
        # is then unbiased on sorted data, and only what is used is held in memory.
        inputs, all_labels = load_arrays(
            data,
            names,
            input_shapes=[tuple(t.shape) for t in model.inputs],
            image_size=size,
            max_samples=calibration_samples + verify_samples,
            seed=seed,
            ignore_index=ignore_index,
        )
        calib, check, labels, disjoint = _split(
            inputs, all_labels, calibration_samples, verify_samples
        )
        n_cal, n_ver = (len(next(iter(d.values()))) for d in (calib, check))
        say(
            f"--data {data}: {n_cal} calibration and {n_ver} verification samples"
            + ("" if disjoint else " (the same samples: fewer than 4 given)")
            + ("" if labels is not None else "; no labels (y): parity only, no task metric")
        )
    metric_name, metric = _task_metric(model, labels, ignore_index)
    say(
        f"{model.name}: task {task or 'unknown (parity only)'}"
        + (f", {num_classes} classes" if num_classes else "")
        + f", outputs {export.model_output_kinds(model)}"
    )
    report = export.write_repository(
        model,
        output_dir,
        formats=wanted,
        samples=check,
        labels=labels if metric is not None else None,
        metric=metric,
        metric_name=metric_name,
        calibration=calib,
        opset=opset,
        simplify=simplify,
        atol=atol,
        int8_max_metric_drop=int8_max_metric_drop,
        int8_min_agreement=int8_min_agreement,
        reduce_range=reduce,
        overwrite=overwrite,
    )
    if json_output:
        sys.stdout.write(json.dumps(_report_json(report), default=str) + "\n")
    else:
        _print_report(report, title=f"exported {model_path}")
        say(f"manifest: {report.manifest_path}")
    if not report.passed:
        _fail("verification failed", "; ".join(report.failures()), 1)


def _report_json(report) -> dict:
    return {
        "passed": report.passed,
        "manifest": str(report.manifest_path),
        "task": report.task,
        "num_classes": report.num_classes,
        "metric_name": report.metric_name,
        "keras_metric": report.keras_metric,
        "rows": report.rows(),
    }


@app.command("verify")
def verify_cmd(
    model_path: Annotated[Path, typer.Argument(help="the source .keras model")],
    onnx_path: Annotated[Path, typer.Argument(help="an exported .onnx file")],
    data: Annotated[
        Path | None, typer.Option(help=".npz / .npy / image folder; default: random inputs")
    ] = None,
    image_size: Annotated[str | None, typer.Option(help="HxW for dynamic-size models")] = None,
    samples: Annotated[int, typer.Option(min=1)] = 16,
    atol: Annotated[float, typer.Option(min=0.0)] = 1e-4,
    ignore_index: Annotated[
        int | None,
        typer.Option(help="label value left out of the metric (void pixels, e.g. 255)"),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    seed: Annotated[int, typer.Option(help="picks the --data samples; random inputs")] = 0,
):
    """Run an ONNX file in a fresh onnxruntime process and compare it with the Keras model.
    With labels (y) in --data, the task metric (mIoU / accuracy) is computed on both.
    Exit status 1 when max |err| exceeds --atol.

    Examples:

        dlmodels verify artifacts/model.keras out/model.onnx --data data.npz --json

        dlmodels verify model.keras out/model.onnx --samples 8 --atol 1e-5
    """
    _quiet_tf()
    import dataclasses

    from dlmodels import export

    _existing_file(onnx_path, "ONNX file", "ONNX_PATH")
    size = None if image_size is None else _parse_size(image_size)
    model = _load_model(model_path)
    labels = None
    if data is None:
        inputs = _random_inputs(model, samples, size, seed)
    else:
        from dlmodels.data.arrays import load_arrays

        _existing_file(data, "file", "--data")
        inputs, labels = load_arrays(
            data,
            [t.name for t in model.inputs],
            input_shapes=[tuple(t.shape) for t in model.inputs],
            image_size=size,
            max_samples=samples,
            seed=seed,
            ignore_index=ignore_index,
        )
    inputs = export.sample_dict(model, inputs)
    _, metric = _task_metric(model, labels, ignore_index)
    report = export.verify(
        model,
        onnx_path,
        inputs,
        atol=atol,
        labels=labels if metric is not None else None,
        metric=metric,
    )
    if json_output:
        sys.stdout.write(json.dumps(dataclasses.asdict(report), default=str) + "\n")
    else:
        sys.stdout.write(f"{report}\n")
    if not report.passed:
        raise typer.Exit(code=1)


@app.command("quantize")
def quantize_cmd(
    onnx_path: Annotated[Path, typer.Argument(help="an fp32 .onnx file (from dlmodels export)")],
    output: Annotated[
        Path,
        typer.Argument(
            help="the quantized .onnx file to write (--mode openvino: the IR directory)"
        ),
    ],
    data: Annotated[
        Path | None,
        typer.Option(
            help=".npz / .npy / image folder of calibration inputs (static and openvino modes)"
        ),
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            help="static (ONNX int8 QDQ for CNNs), dynamic (LSTM/Dense), fp16, or openvino "
            "(an OpenVINO int8 IR quantized by NNCF)"
        ),
    ] = "static",
    nncf_preset: Annotated[
        str, typer.Option(help="--mode openvino: NNCF preset, mixed or performance")
    ] = "mixed",
    per_channel: bool = True,
    reduce_range: Annotated[
        str, typer.Option(help="auto (from this CPU's instruction set), on or off")
    ] = "auto",
    calibration_method: Annotated[
        str, typer.Option(help="static mode's activation ranges: minmax, entropy or percentile")
    ] = "minmax",
    calibration_samples: Annotated[int, typer.Option(min=1)] = 256,
    image_size: Annotated[str | None, typer.Option(help="HxW for dynamic-size inputs")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print the settings as JSON")] = False,
    overwrite: bool = False,
    seed: Annotated[int, typer.Option(help="picks the calibration samples from --data")] = 0,
):
    """Quantize an ONNX file (static int8 QDQ with calibration data, dynamic int8, or fp16; or an
    OpenVINO int8 IR with NNCF) and print the settings used (reduce_range, calibration samples,
    ...).

    Examples:

        dlmodels quantize out/model.onnx out/model.int8.onnx --data data.npz

        dlmodels quantize out/model.onnx out/openvino_int8 --data data.npz --mode openvino

        dlmodels quantize forecaster.onnx forecaster.dynamic.onnx --mode dynamic --json

        dlmodels quantize model.onnx model.int8.onnx --data data.npz --calibration-method entropy
    """
    _quiet_tf()
    from dlmodels import export

    _existing_file(onnx_path, "ONNX file", "ONNX_PATH")
    if mode not in ("static", "dynamic", "fp16", "openvino"):
        raise typer.BadParameter(
            f"must be static, dynamic, fp16 or openvino, got {mode!r}", param_hint="--mode"
        )
    if mode != "static" and calibration_method != "minmax":
        raise typer.BadParameter(
            f"--calibration-method {calibration_method} applies to --mode static only (--mode "
            f"{mode} has no such choice); drop it or use --mode static",
            param_hint="--calibration-method",
        )
    if mode != "openvino" and nncf_preset != "mixed":
        raise typer.BadParameter(
            f"--nncf-preset {nncf_preset} applies to --mode openvino only; drop it or use "
            "--mode openvino",
            param_hint="--nncf-preset",
        )
    from dlmodels.export.openvino import NNCF_PRESETS

    if mode == "openvino" and nncf_preset not in NNCF_PRESETS:
        raise typer.BadParameter(
            f"must be one of {', '.join(NNCF_PRESETS)}, got {nncf_preset!r}",
            param_hint="--nncf-preset",
        )
    reduce = {"auto": None, "on": True, "off": False}.get(reduce_range.lower(), "bad")
    if reduce == "bad":
        raise typer.BadParameter(
            f"must be auto, on or off, got {reduce_range!r}", param_hint="--reduce-range"
        )
    if mode == "openvino" and (reduce is not None or not per_channel):
        # NNCF picks these itself (per-channel weights; its overflow fix for CPUs without VNNI).
        raise typer.BadParameter(
            "--reduce-range and --no-per-channel apply to the onnxruntime modes; --mode "
            "openvino quantizes with NNCF's own settings (choose them with --nncf-preset)",
            param_hint="--reduce-range / --no-per-channel",
        )
    calibration = None
    if mode in ("static", "openvino"):
        if data is None:
            raise typer.BadParameter(
                f"--mode {mode} quantization needs calibration data: pass --data "
                "DATA.npz|FOLDER" + (" (or use --mode dynamic)" if mode == "static" else ""),
                param_hint="--data",
            )
        _existing_file(data, "file", "--data")
        from dlmodels.data.arrays import load_arrays

        io = export.onnx_io(onnx_path)
        shapes = [[d if isinstance(d, int) else None for d in i["shape"]] for i in io["inputs"]]
        calibration, _ = load_arrays(
            data,
            [i["name"] for i in io["inputs"]],
            input_shapes=shapes,
            image_size=None if image_size is None else _parse_size(image_size),
            max_samples=calibration_samples,
            seed=seed,
        )
    if mode == "openvino":
        _quantize_openvino(
            onnx_path, output, calibration, nncf_preset, calibration_samples, overwrite, json_output
        )
        return
    report = export.quantize_with_report(
        onnx_path,
        output,
        calibration=calibration,
        mode=mode,
        per_channel=per_channel,
        reduce_range=reduce,
        max_calibration_samples=calibration_samples,
        overwrite=overwrite,
        **({"calibration_method": calibration_method} if mode == "static" else {}),
    )
    settings = {"path": str(report.path), **report.settings()}
    if json_output:
        sys.stdout.write(json.dumps(settings) + "\n")
        return
    shown = dict(settings)
    coverage = shown.pop("coverage", None)
    shown.pop("selection", None)
    if coverage:  # one line instead of every node: "compute ops int8=12/12"
        shown["compute_ops_int8"] = f"{coverage['compute_int8']}/{coverage['compute_total']}"
    typer.echo(" ".join(f"{k}={v}" for k, v in shown.items()))


def _quantize_openvino(onnx_path, output, calibration, preset, samples, overwrite, json_output):
    """`dlmodels quantize --mode openvino`: an NNCF int8 IR, then the settings it recorded."""
    from dlmodels.export import openvino as ovx

    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout is the result
        xml = ovx.quantize_openvino(
            onnx_path, output, calibration, preset=preset, subset_size=samples, overwrite=overwrite
        )
    counts = ovx.OpenVINOModel(xml, precision="int8", threads=1).runtime_precisions()
    convs = counts.get("Convolution", {})
    settings = {
        "path": str(xml.parent),
        "mode": "openvino",
        "calibration_samples": len(next(iter(calibration.values()))),
        **(ovx.nncf_settings(xml) or {}),
        "convolutions_int8": f"{sum(n for p, n in convs.items() if p in ('i8', 'u8'))}/"
        f"{sum(convs.values())}",
    }
    if json_output:
        sys.stdout.write(json.dumps(settings) + "\n")
    else:
        typer.echo(" ".join(f"{k}={v}" for k, v in settings.items()))


@app.command("demo")
def demo_cmd(
    output_dir: Annotated[Path, typer.Option(help="where artifacts go")] = Path("artifacts"),
    image_size: Annotated[str | None, typer.Option(help="HxW; default: the demo setting")] = None,
    epochs: Annotated[int | None, typer.Option(help="default: the tuned demo setting")] = None,
    train_samples: Annotated[int | None, typer.Option(min=8)] = None,
    seed: int = 0,
):
    """Train a U-Net on synthetic shapes, export .keras / SavedModel / ONNX / int8 ONNX, verify
    every artifact against Keras and print size, parity, mIoU and batch-1 latency side by side.
    Exit status 1 when a quality bar is missed.

    Examples:

        dlmodels demo

        dlmodels demo --output-dir /tmp/smoke --image-size 32x32 --epochs 1 --train-samples 32
    """
    _quiet_tf()
    size = None if image_size is None else _parse_size(image_size)
    from dlmodels import demo

    results = demo.run_demo(
        output_dir=output_dir,
        image_size=size,
        epochs=epochs,
        train_samples=train_samples,
        seed=seed,
    )
    if not results["passed"]:
        raise typer.Exit(code=1)


_BENCH_OUT = Path("benchmarks/results/unet_latency.json")
"""`dlmodels bench`'s --output default; --training and --export read it as "not given"."""


@app.command("bench")
def bench_cmd(
    model_path: Annotated[
        Path | None, typer.Argument(help="a .keras model; default: a U-Net from the demo config")
    ] = None,
    output: Annotated[Path, typer.Option(help="JSON results file")] = _BENCH_OUT,
    iters: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="timed calls per runtime (default 50); with --export: at batch 1 (default 30, "
            "as `python -m dlmodels.bench.export`; larger batches: 6)",
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print only the JSON")] = False,
    training: Annotated[
        bool,
        typer.Option(
            "--training",
            help="instead: our Trainer's steps/s against model.fit (ResNet-50 and the demo "
            "U-Net, one device and MirroredStrategy); default output "
            "benchmarks/results/training.json",
        ),
    ] = False,
    quick: Annotated[bool, typer.Option("--quick", help="with --training: tiny models")] = False,
    export: Annotated[
        bool,
        typer.Option(
            "--export",
            help="instead: every deployment runtime and precision of MODEL (TF, onnxruntime "
            "fp32 / int8 / fp16, OpenVINO fp32 / bf16 / int8 and NNCF int8) at --batches, "
            "against the machine's MatMul peak; default output <MODEL stem>_export.json, "
            "or benchmarks/results/export_<builtin>.json",
        ),
    ] = False,
    builtin: Annotated[
        str | None,
        typer.Option(
            help="with --export and no MODEL: a built-in model with random weights: resnet50 "
            "(the default), unet or deeplabv3plus",
        ),
    ] = None,
    batches: Annotated[
        str, typer.Option(help="with --export: batch sizes, comma-separated")
    ] = "1,32",
):
    """Batch-1 latency of Keras/TF, ONNX fp32 and int8 measured side by side; writes JSON.
    With --training: training throughput of the Trainer against model.fit. With --export:
    every deployment precision of one model side by side.

    Examples:

        dlmodels bench

        dlmodels bench artifacts/model.keras --iters 100 --output bench.json --json

        dlmodels bench --training --quick --output training.json

        dlmodels bench artifacts/model.keras --export --batches 1,8

        dlmodels bench --export --builtin unet
    """
    if training and export:
        raise typer.BadParameter("choose one of --training and --export", param_hint="--export")
    if builtin is not None and not export:
        raise typer.BadParameter("--builtin goes with --export", param_hint="--builtin")
    if batches != "1,32" and not export:
        raise typer.BadParameter("--batches goes with --export", param_hint="--batches")
    if quick and not training:
        raise typer.BadParameter("--quick goes with --training", param_hint="--quick")
    if iters is not None and training:
        raise typer.BadParameter(
            "--training times whole epochs, not calls: leave out --iters "
            "(python -m dlmodels.bench.training --help has its settings)",
            param_hint="--iters",
        )
    if export:
        _export_bench(model_path, builtin, output, iters, batches, json_output)
        return
    if training:
        if model_path is not None:
            raise typer.BadParameter("--training benchmarks its own models", param_hint="MODEL")
        # Imported before TensorFlow starts: it splits the CPU into 2 logical devices.
        from dlmodels.bench import training as training_bench

        out = training_bench.DEFAULT_OUT if output == _BENCH_OUT else output
        argv = ["--out", str(out)] + (["--quick"] if quick else [])
        # With --json, stdout carries only the JSON: the progress lines go to stderr.
        with contextlib.redirect_stdout(sys.stderr if json_output else sys.stdout):
            training_bench.main(argv)
        if json_output:
            sys.stdout.write(out.read_text() + "\n")
        return
    _quiet_tf()
    if model_path is not None:
        _existing_file(model_path, "model file", "MODEL_PATH")
    from dlmodels import demo

    payload = demo.run_bench(
        model_path=model_path, output=output, iters=50 if iters is None else iters
    )
    if json_output:
        sys.stdout.write(json.dumps(payload["results"], default=str) + "\n")
    else:
        _console().print_json(json.dumps(payload["results"], default=str))


def _export_bench(model_path, builtin, output, iters, batches, json_output):
    """`dlmodels bench --export`: `dlmodels.bench.export.run` on a .keras file or a built-in."""
    if model_path is not None and builtin is not None:
        raise typer.BadParameter("give MODEL or --builtin, not both", param_hint="--builtin")
    try:
        sizes = [int(b) for b in batches.split(",")]
    except ValueError:
        raise typer.BadParameter(
            f"{batches!r} is not a comma-separated list of batch sizes (e.g. 1,32)",
            param_hint="--batches",
        ) from None
    _quiet_tf()
    if model_path is not None:
        _existing_file(model_path, "model file", "MODEL_PATH")
    from dlmodels.bench import export as export_bench

    # --iters left out: the export benchmark's own default, so that the CLI and
    # `python -m dlmodels.bench.export` time the same number of calls.
    timing = {} if iters is None else {"iters": iters}
    with contextlib.redirect_stdout(sys.stderr if json_output else sys.stdout):
        payload = export_bench.run(
            model_path if model_path is not None else (builtin or "resnet50"),
            output=(
                output
                if output != _BENCH_OUT
                # A file's results beside the working directory, never over the committed
                # benchmarks/results/export_<builtin>.json.
                else Path(f"{model_path.stem}_export.json")
                if model_path is not None
                else "default"
            ),
            batches=sizes,
            **timing,
        )
    if json_output:
        sys.stdout.write(json.dumps(payload["rows"], default=str) + "\n")


@app.command(
    "serve",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def serve_cmd(ctx: typer.Context):
    """Serve a model repository over the TF Serving REST and KServe v2 protocols
    (onnxruntime, no TensorFlow); `dlmodels serve --help` for the options. Same as
    `python -m serving`.

    Examples:

        dlmodels serve --model-repository artifacts/

        dlmodels serve --model-repository repo/ --format int8 --port 8080

        dlmodels serve --model-repository repo/ --check
    """
    from serving.__main__ import main as serve_main

    raise typer.Exit(_delegate(ctx, serve_main))


@app.command(
    "launch",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def launch_cmd(ctx: typer.Context):
    """Run a training command on N local workers (generated TF_CONFIG), or write a Kubeflow
    TFJob; `dlmodels launch --help` for the options.

    Examples:

        dlmodels launch -n 2 -- python train.py --epochs 3

        dlmodels launch -n 8 --tfjob job.yaml --image reg/dlmodels:1 --gpus 1 -- python train.py
    """
    _quiet_tf()  # the launcher imports TensorFlow: keep its start-up lines off stderr
    from dlmodels.training.launch import main as launch_main

    raise typer.Exit(_delegate(ctx, launch_main))


def _examples(ctx: typer.Context) -> str:
    """The "Examples:" part of a command's docstring, dedented (empty when it has none)."""
    import textwrap

    text = ctx.command.help or ""
    _, sep, tail = text.partition("Examples:")
    return "Examples:\n" + textwrap.indent(textwrap.dedent(tail).strip("\n"), "  ") if sep else ""


def _delegate(ctx: typer.Context, main) -> int:
    """Run a verb whose options an argparse parser owns (serve, launch) on the arguments after
    the verb. Its `--help` gets the verb's examples appended, as typer's verbs show theirs."""
    import contextlib
    import io

    args = list(ctx.args)
    own = args[: args.index("--")] if "--" in args else args  # after --: the user's command
    if "-h" not in own and "--help" not in own:
        return main(args)
    text = io.StringIO()
    try:
        with contextlib.redirect_stdout(text):
            main(args)
    except SystemExit as done:  # argparse exits after printing the help
        if done.code not in (0, None):
            raise
    help_text = text.getvalue().rstrip("\n")
    if "Examples:" not in help_text:  # the parser may carry them itself (an epilog)
        help_text += "\n\n" + _examples(ctx)
    typer.echo(help_text)
    return 0


def main(argv: list[str] | None = None):
    """console_scripts entry point (`dlmodels`)."""
    app(args=argv, prog_name="dlmodels")


if __name__ == "__main__":
    main()

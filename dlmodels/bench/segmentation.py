"""The segmentation zoo benchmark: every U-Net variant and DeepLabV3+ trained on the synthetic
shapes, exported, verified and timed in one run.

For each model: parameters, GMACs at the training size (`dlmodels.bench.flops.count_macs`),
held-out mIoU after a short CPU training run, training time, and through
`dlmodels.export.write_repository` the ONNX fp32 and static int8 artifacts verified in a fresh
onnxruntime process (parity, int8 mIoU) and their batch-1 latency next to Keras/TF, all
measured in the same run. Results go to `benchmarks/results/segmentation.json`:

    python -m dlmodels.bench.segmentation                    # every model in ZOO
    python -m dlmodels.bench.segmentation --models unet resunet --epochs 3
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

DEFAULT_OUT = Path("benchmarks/results/segmentation.json")

# name -> builder keyword arguments. U-Nets: 3 levels from 16 filters (the demo's U-Net);
# DeepLabV3+: the smallest ResNet as its backbone (see below).
ZOO = {
    "unet": {"depth": 3, "base_filters": 16, "upsampling": "bilinear"},
    "attention_unet": {"depth": 3, "base_filters": 16, "upsampling": "bilinear"},
    "resunet": {"depth": 3, "base_filters": 16, "upsampling": "bilinear"},
    "unet_plus_plus": {"depth": 3, "base_filters": 16, "upsampling": "bilinear"},
    "unet3plus": {"depth": 3, "base_filters": 16, "cat_channels": 16},
    # The paper's ASPP rates (6, 12, 18) are for 513x513 crops; at 64x64 and output stride 16
    # the C5 map is 4x4 and those rates would read only padding, so they are scaled down with
    # the image (513 / 64 ~ 8x); the ASPP and decoder widths are halved to 128.
    "deeplabv3plus": {
        "backbone": "resnet18",
        "output_stride": 16,
        "rates": (1, 2, 3),
        "aspp_filters": 128,
        "decoder_filters": 128,
    },
}

# Per-model changes to TRAINING: the ResNet-18 DeepLabV3+ (16.6M parameters, trained from
# scratch) needs more epochs than the 0.5M-parameter U-Nets to converge.
TRAINING_OVERRIDES = {"deeplabv3plus": {"epochs": 14}}

TRAINING = {
    "image_size": (64, 64),
    "epochs": 7,
    "batch_size": 16,
    "train_samples": 2000,
    "learning_rate": 3e-3,
}


def _log(verbose, *parts):
    if verbose:
        print(*parts, flush=True)


def _row(name, kwargs, training, *, iters, seed, verbose):
    from dlmodels import demo
    from dlmodels.bench.flops import count_macs

    start = time.perf_counter()
    result = demo.train_segmentation(
        model_name=name,
        image_size=training["image_size"],
        epochs=training["epochs"],
        batch_size=training["batch_size"],
        train_samples=training["train_samples"],
        learning_rate=training["learning_rate"],
        model_kwargs=kwargs,
        strategy="default",
        seed=seed,
        progress=False,
    )
    model = result.model
    row = {
        "model": name,
        "builder_kwargs": kwargs,
        "params": int(model.count_params()),
        "gmacs": count_macs(model, (*training["image_size"], 3)) / 1e9,
        "miou": result.test_miou,
        "per_class_iou": result.per_class_iou,
        "train_seconds": result.train_seconds,
    }
    _log(verbose, f"{name}: mIoU {row['miou']:.4f} in {row['train_seconds']:.0f} s")
    with tempfile.TemporaryDirectory() as tmp:
        report = demo.export_and_verify(
            model, tmp, formats=("onnx", "int8"), iters=iters, seed=seed, overwrite=True
        )
    rows = report.rows()
    by_format = {r["format"]: r for r in rows}
    row.update(
        {
            "keras_p50_ms": rows[0].get("p50_ms"),
            "onnx_fp32": _artifact(by_format.get("onnx")),
            "onnx_int8": _artifact(by_format.get("int8")),
            "export_passed": report.passed,
            "total_seconds": time.perf_counter() - start,
        }
    )
    _log(
        verbose,
        f"{name}: ORT fp32 {row['onnx_fp32'].get('p50_ms')} ms, int8 "
        f"{row['onnx_int8'].get('p50_ms')} ms, int8 mIoU {row['onnx_int8'].get('miou')}",
    )
    return row


def _artifact(row) -> dict:
    if row is None:
        return {}
    keep = ("artifact", "size_bytes", "max_abs_error", "mean_abs_error", "miou", "p50_ms")
    return {k: row.get(k) for k in keep} | {"passed": row.get("passed")}


def run(
    models=None,
    *,
    output=DEFAULT_OUT,
    epochs=None,
    training=None,
    iters=30,
    seed=0,
    verbose=True,
    merge=False,
) -> dict:
    """Train, export, verify and time each model; write and return the results.

    Args:
        models: names from `ZOO` (default: all).
        output: the JSON file written (atomically); None writes nothing.
        epochs: override `TRAINING["epochs"]`.
        training: overrides of other `TRAINING` entries (image_size, train_samples, ...).
        iters: timed batch-1 calls per artifact.
        seed: data, initialization and calibration seed.
        merge: keep the rows of other models already in `output` (a run that adds or redoes
            some models); their own machine and load entries are kept with them.
    """
    from dlmodels.bench.harness import machine_info, write_results

    names = list(ZOO) if not models else list(models)
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        raise ValueError(f"unknown models {unknown}; the benchmark knows {', '.join(ZOO)}")
    unknown = sorted(set(training or {}) - set(TRAINING))
    if unknown:
        raise ValueError(f"unknown training settings {unknown}; known: {', '.join(TRAINING)}")
    training = {**TRAINING, **(training or {})}
    if epochs is not None:
        training["epochs"] = int(epochs)
    rows = []
    for n in names:
        settings = {**training, **TRAINING_OVERRIDES.get(n, {})}
        if epochs is not None:
            settings["epochs"] = int(epochs)
        rows.append(_row(n, ZOO[n], settings, iters=iters, seed=seed, verbose=verbose))
        rows[-1]["training"] = {**settings, "image_size": list(settings["image_size"])}
    payload = {
        "benchmark": "segmentation",
        "data": "dlmodels.data.shapes (synthetic; 4 classes), held-out test split",
        "training": {**training, "image_size": list(training["image_size"])},
        "threads": "onnxruntime default intra-op threads; TF default",
        "load_average_at_end": list(os.getloadavg()),
        "rows": rows,
        "machine": machine_info(),
    }
    if merge and output is not None and Path(output).exists():
        import json

        previous = json.loads(Path(output).read_text())
        done = {r["model"] for r in rows}
        kept = [
            {
                **r,
                "run": r.get("run")
                or {k: previous.get(k) for k in ("created", "load_average_at_end")},
            }
            for r in previous.get("rows", [])
            if r["model"] not in done
        ]
        order = {n: i for i, n in enumerate(ZOO)}
        payload["rows"] = sorted(kept + rows, key=lambda r: order.get(r["model"], len(order)))
    if output is not None:
        write_results(output, payload)
    return payload


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--models", nargs="*", default=None, choices=list(ZOO))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--merge", action="store_true", help="keep other models' rows already in --output"
    )
    args = parser.parse_args(argv)
    run(
        args.models,
        output=args.output,
        epochs=args.epochs,
        iters=args.iters,
        seed=args.seed,
        merge=args.merge,
    )


if __name__ == "__main__":
    main()

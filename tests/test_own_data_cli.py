"""`dlmodels train --data DIR`, `export --data DIR`, `verify --data DIR` on folders of the user's
own images, run as a user would: the console script in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PIL = pytest.importorskip("PIL.Image")


def _cli(*args, cwd):
    exe = Path(sys.executable).with_name("dlmodels")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "COLUMNS": "200"}
    return subprocess.run(
        [str(exe), *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env,
        timeout=600,
    )  # fmt: skip


def _segmentation_folder(root: Path, n=24, size=(32, 32)):
    """Squares (class 1) and bars (class 2) on a dark background, with some void (255) pixels."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        mask = np.zeros(size, np.uint8)
        y, x = rng.integers(2, 16, 2)
        mask[y : y + 12, x : x + 12] = 1 + i % 2
        if i % 2:
            mask[y : y + 12, x + 4 : x + 8] = 1  # a bar of class 1 through class 2
        mask[0, :4] = 255
        image = np.stack([mask == 1, mask == 2, np.zeros(size, bool)], -1) * 200 + 20
        image = (image + rng.integers(0, 30, image.shape)).clip(0, 255).astype(np.uint8)
        PIL.fromarray(image).save(root / "images" / f"img{i:02d}.png")
        PIL.fromarray(mask).save(root / "masks" / f"img{i:02d}.png")
    return root


def test_train_export_verify_from_an_image_mask_folder(tmp_path):
    data = _segmentation_folder(tmp_path / "mydata")
    model = tmp_path / "m.keras"
    train = _cli(
        "train", "--data", data, "--ignore-index", "255", "--epochs", "3", "--batch-size", "4",
        "--depth", "2", "--base-filters", "8", "--output", model, "--strategy", "default",
        cwd=tmp_path,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-2000:]
    assert "segmentation: 24 images 32x32x3" in train.stdout
    assert "3 classes (ignore 255)" in train.stdout
    assert "train/validation/test 19/3/2" in train.stdout
    assert "test miou" in train.stdout
    out = tmp_path / "repo"
    export = _cli(
        "export", model, "--data", data, "--ignore-index", "255", "--output-dir", out,
        "--formats", "onnx,int8", cwd=tmp_path,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    onnx_entry, int8_entry = manifest["artifacts"]
    assert onnx_entry["num_classes"] == 3 and onnx_entry["task"] == "segmentation"
    assert onnx_entry["parity"]["max_abs_error_vs_keras"] < 1e-4
    assert int8_entry["format"] == "int8" and int8_entry["metric"]["name"] == "miou"
    verify = _cli(
        "verify", model, out / "model.onnx", "--data", data, "--ignore-index", "255", "--json",
        cwd=tmp_path,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr[-2000:]
    report = json.loads(verify.stdout)
    assert report["max_abs_error"] < 1e-4


def test_train_data_errors_are_one_line(tmp_path):
    data = _segmentation_folder(tmp_path / "d", n=6)
    (data / "images" / "img00.png").rename(data / "images" / "lonely.png")
    result = _cli("train", "--data", data, "--output", tmp_path / "m.keras", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "lonely.png" in lines[0]

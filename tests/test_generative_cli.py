"""`dlmodels train --model vae|cgan` and `dlmodels sample`: files written, one-line user errors."""

import subprocess
import sys

import keras
import numpy as np
import pytest

from dlmodels.cli import app
from dlmodels.models import VAE, ConditionalGAN


def cli(*args):
    """Run the CLI in a subprocess (the real entry point and its exit codes)."""
    return subprocess.run(
        [sys.executable, "-m", "dlmodels", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def invoke(*args):
    """Run the CLI in this process (typer's runner; stderr kept apart)."""
    from typer.testing import CliRunner

    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "40"})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    vae = VAE(latent_dim=2, hidden_units=(8,))
    cgan = ConditionalGAN(latent_dim=4, embedding_dim=2, filters=(8, 4), num_classes=10)
    vae.save(root / "vae.keras")
    cgan.save(root / "cgan.keras")
    return root


def test_train_cgan_and_sample(tmp_path):
    model = tmp_path / "cgan.keras"
    result = cli("train", "--model", "cgan", "--epochs", "1", "--output", model)
    assert result.returncode == 0, result.stderr
    assert "conditional accuracy" in result.stdout
    png, npz = tmp_path / "grid.png", tmp_path / "grid.npz"
    result = cli("sample", model, "--output", png, "--labels", "1,7", "--n", "3", "--npz", npz)
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = np.load(npz)
    assert data["x"].shape == (6, 8, 8, 1)
    np.testing.assert_array_equal(data["y"], [1, 1, 1, 7, 7, 7])


def test_train_vae_in_process(tmp_path):
    from typer.testing import CliRunner

    model = tmp_path / "vae.keras"
    result = CliRunner().invoke(
        app,
        ["train", "--model", "vae", "--epochs", "1", "--latent-dim", "2", "--output", str(model)],
    )
    assert result.exit_code == 0, result.output
    assert "held-out -ELBO" in result.output
    loaded = keras.saving.load_model(model, safe_mode=True)
    assert isinstance(loaded, VAE) and loaded.latent_dim == 2
    png = tmp_path / "vae.png"
    result = invoke("sample", model, "--output", png, "--rows", "2")
    assert result.exit_code == 0, result.output
    assert png.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--labels", "3,12"], r"outside \[0, 10\)"),
        (["--labels", "a,b"], "class ids"),
        (["--output", "grid.jpg"], "must end in .png"),
    ],
)
def test_sample_user_errors_are_one_line(saved, args, message, tmp_path):
    import re

    result = invoke("sample", saved / "cgan.keras", "--output", tmp_path / "g.png", *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]


def test_sample_refuses_other_models_and_labels_for_a_vae(saved, tmp_path):
    from dlmodels.models import UNet

    unet = tmp_path / "unet.keras"
    UNet((16, 16, 1), 2, depth=1, base_filters=2).save(unet)
    result = cli("sample", unet, "--output", tmp_path / "u.png")
    assert result.returncode == 2
    assert "takes a VAE or ConditionalGAN" in result.stderr
    result = cli("sample", saved / "vae.keras", "--output", tmp_path / "v.png", "--labels", "1")
    assert result.returncode == 2
    assert "a VAE takes no labels" in result.stderr
    result = cli(
        "train", "--model", "cgan", "--gan-loss", "hinge", "--output", tmp_path / "c.keras"
    )
    assert result.returncode == 2
    assert "--gan-loss" in result.stderr


def test_train_vae_on_shapes(tmp_path):
    model = tmp_path / "vae_shapes.keras"
    result = invoke(
        "train", "--model", "vae", "--dataset", "shapes", "--epochs", "1", "--latent-dim", "2",
        "--output", model,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "vae on shapes: held-out -ELBO" in result.stdout
    loaded = keras.saving.load_model(model, safe_mode=True)
    assert isinstance(loaded, VAE) and loaded.image_shape == (16, 16, 1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "vae", "--dataset", "mnist"], "--dataset.*digits, shapes.*'mnist'"),
        (["--model", "cgan", "--image-size", "16"], "digits are 8x8"),
        (["--model", "cgan", "--dataset", "shapes", "--image-size", "10"], "divisible by 4"),
        (["--model", "unet", "--dataset", "digits"], "segmentation model"),
    ],
)
def test_train_dataset_user_errors_are_one_line(args, message, tmp_path):
    import re

    result = invoke("train", *args, "--epochs", "1", "--output", tmp_path / "m.keras")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "m.keras").exists()

"""Models exported once per session into a model repository the server tests share: a tiny
U-Net (segmentation), a small CNN classifier, a GRU sequence classifier, a VAE decoder and a
conditional GAN generator (two inputs, one of them integer)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tests.serving._server import ServerProcess


def _classifier():
    keras.utils.set_random_seed(1)
    inp = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="c1")(inp)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(5, name="logits")(x)
    return keras.Model(inp, out, name="tiny_classifier")


def _two_heads():
    """Two outputs (a mask and scores): the TF Serving row format answers a dict per row."""
    keras.utils.set_random_seed(2)
    inp = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inp)
    mask = keras.layers.Conv2D(2, 1, name="mask")(x)
    scores = keras.layers.Dense(3, name="scores")(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inp, [mask, scores], name="two_heads")


ALL = ("unet", "classifier", "gru", "vae_decoder", "cgan_generator", "two_heads")


def export_models(root, which=ALL):
    """Export the test models into `root/NAME/` (fp32 ONNX + manifest); returns sample inputs
    per model (a dict by input name, batch 2)."""
    import dlmodels
    from dlmodels import export

    rng = np.random.default_rng(0)
    samples = {}
    for name in which:
        keras.utils.set_random_seed(0)
        if name == "unet":
            model = dlmodels.models.UNet((32, 32, 3), 3, depth=2, base_filters=4)
            x = {"image": rng.uniform(0, 1, (2, 32, 32, 3)).astype("float32")}
        elif name == "classifier":
            model = _classifier()
            x = {"image": rng.uniform(0, 1, (2, 32, 32, 3)).astype("float32")}
        elif name == "gru":
            model = dlmodels.models.SequenceClassifier((10, 4), 3, units=8)
            x = {model.inputs[0].name: rng.standard_normal((2, 10, 4)).astype("float32")}
        elif name == "vae_decoder":
            vae = dlmodels.models.VAE((8, 8, 1), latent_dim=4, hidden_units=(16,))
            model = vae.decoder
            x = {model.inputs[0].name: rng.standard_normal((2, 4)).astype("float32")}
        elif name == "cgan_generator":
            gan = dlmodels.models.ConditionalGAN(
                (8, 8, 1), num_classes=3, latent_dim=4, filters=(8, 4)
            )
            model = gan.generator
            z, labels = model.inputs
            x = {
                z.name: rng.standard_normal((2, 4)).astype("float32"),
                labels.name: np.array([[0], [2]])
                .reshape((2, *labels.shape[1:]))
                .astype(labels.dtype),
            }
        elif name == "two_heads":
            model = _two_heads()
            x = {"image": rng.uniform(0, 1, (2, 8, 8, 3)).astype("float32")}
        else:
            raise ValueError(name)
        export.write_repository(model, root / name, samples=x, formats=("onnx",))
        samples[name] = x
    return samples


@pytest.fixture(scope="session")
def repo(tmp_path_factory):
    """(repository dir, samples by model name)."""
    root = tmp_path_factory.mktemp("serving") / "repo"
    root.mkdir()
    return root, export_models(root)


@pytest.fixture(scope="session")
def server(repo):
    """The real server in a subprocess over `repo` (dynamic batching on; inference in worker
    threads even for these tiny models: the in-process fuzz app and the operations tests cover
    the inline path)."""
    proc = ServerProcess(repo[0], "--max-queue-delay-ms", "2", "--inline-below-ms", "0")
    yield proc
    proc.stop()

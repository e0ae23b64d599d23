"""The generative benchmark on a short budget: JSON fields, a falling held-out -ELBO, a cGAN
whose samples a real-digit classifier recognises as the asked-for class, pictures."""

import json

import numpy as np
import pytest

from dlmodels.bench import generative


def test_short_benchmark_run(tmp_path):
    out = tmp_path / "generative.json"
    payload = generative.run(
        out,
        tmp_path / "pictures",
        vae_epochs=3,
        cgan_epochs=25,
        samples=500,
        export_models=False,
        verbose=False,
    )
    data = json.loads(out.read_text())
    assert data["machine"]["cores"] >= 1
    elbo = data["vae"]["test_neg_elbo_nats"]
    assert elbo["final"] < elbo["after_epoch_1"] < elbo["initial"]
    assert data["vae"]["test_neg_elbo_falling"] is True
    assert data["cgan"]["classifier_real_test_accuracy"] > 0.9
    # Conditioning works: the classifier recognises the asked-for class, far above chance.
    assert data["cgan"]["conditional_accuracy"] >= 0.8, data["cgan"]
    for path in payload["pictures"].values():
        with open(path, "rb") as f:
            assert f.read(4) == b"\x89PNG"


def test_conditional_accuracy_sees_ignored_labels():
    """A generator that ignores its label scores at chance: the metric can fail."""

    class Fixed:
        num_classes = 10

        def sample(self, labels, seed=None):
            return np.repeat(images[:1], len(labels), axis=0)

    from dlmodels.data import digits

    images, _ = digits.load("test", num_samples=1)
    classifier, _ = generative.train_digit_classifier()
    accuracy = generative.conditional_accuracy(Fixed(), classifier, n=1000)
    assert accuracy == pytest.approx(0.1, abs=0.03)

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


def test_shapes_run_adds_a_section_and_keeps_the_digits_results(tmp_path):
    """A VAE on the synthetic shapes: a few epochs lower the held-out -ELBO; the shapes section
    is added to an existing JSON without touching its other keys."""
    out = tmp_path / "generative.json"
    digits_part = {"benchmark": "generative", "vae": {"epochs": 40}, "cgan": {"epochs": 60}}
    out.write_text(json.dumps(digits_part))
    section = generative.run_shapes(
        out, tmp_path / "pictures", vae_epochs=2, pictures=False, verbose=False
    )
    data = json.loads(out.read_text())
    for key, value in digits_part.items():
        assert data[key] == value
    assert data["shapes"]["vae"]["config"]["input_shape"] == [16, 16, 1]
    assert data["shapes"] == json.loads(json.dumps(section, default=str))
    curve = [c["test_neg_elbo"] for c in section["vae"]["curve"]]
    assert len(curve) == 3 and curve[2] < curve[1] < curve[0], curve
    assert section["vae"]["test_neg_elbo_falling"] is True


def test_shapes_classifier_recognises_real_shapes_and_not_a_fixed_image():
    """The cGAN's yardstick on shapes: near-perfect on real test shapes, chance (1/3) for a
    generator that ignores its label."""
    classifier, accuracy = generative.train_classifier(dataset="shapes")
    assert accuracy > 0.9

    images, _ = generative.load_data("shapes", "test")

    class Fixed:
        num_classes = 3

        def sample(self, labels, seed=None):
            return np.repeat(images[:1], len(labels), axis=0)

    assert generative.conditional_accuracy(Fixed(), classifier, n=600) == pytest.approx(
        1 / 3, abs=0.06
    )

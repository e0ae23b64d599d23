"""Generative benchmark: a VAE and a conditional GAN trained on real digits, measured.

    python -m dlmodels.bench.generative      # writes benchmarks/results/generative.json

What is measured (scikit-learn's 8x8 digits, `dlmodels.data.digits`, stratified 80/20 split):

- VAE (Kingma & Welling 2014): the held-out negative ELBO in nats per image after every epoch,
  a Monte-Carlo estimate `E_q[-log p(x|z)] + KL(q(z|x) || N(0, I))` with `elbo_samples` draws
  of z per test image (Bernoulli likelihood on the [0, 1] pixel intensities: the usual
  continuous relaxation, so the value is a cross-entropy, not a discrete log-likelihood);
- cGAN (Mirza & Osindero 2014): conditional accuracy, i.e. how often a classifier trained on
  the *real* training digits (scikit-learn logistic regression on the 64 pixels) recognises the
  class the generator was asked for, over 1,000 samples with random labels; the classifier's
  own accuracy on the real test digits next to it;
- export: the VAE encoder and decoder and the cGAN generator through
  `dlmodels.export.write_repository` (.keras, SavedModel, ONNX), parity against Keras, and the
  list of random ONNX ops in each graph (must be empty);
- pictures (PNG): cGAN samples with one row per class, VAE reconstructions, prior samples, a
  latent traversal and the held-out -ELBO curve.

The second data set, synthetic shapes (`dlmodels.data.shapes_generative`: one anti-aliased
circle, rectangle or triangle per 16x16 grayscale image, its class as the label), is run with

    python -m dlmodels.bench.generative --dataset shapes --vae-epochs 10 --cgan-epochs 0

which trains on it and adds a "shapes" section to the JSON, keeping what is there (the digits
results). Its cGAN classifier is a logistic regression on the 2-D Fourier magnitudes of the
pixels (translation-invariant: on raw pixels a linear model cannot tell shapes apart wherever
they sit).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path("benchmarks/results/generative.json")
DEFAULT_ARTIFACTS = Path("artifacts/generative")
DATASETS = ("digits", "shapes")
RANDOM_ONNX_OPS = (
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
)


def _log(verbose, *parts):
    if verbose:
        print(*parts, flush=True)


# -- data -------------------------------------------------------------------------------------
def _data_module(dataset):
    from dlmodels._validation import check_choice

    check_choice("dataset", dataset, DATASETS, owner="bench.generative")
    if dataset == "digits":
        from dlmodels.data import digits

        return digits
    from dlmodels.data import shapes_generative

    return shapes_generative


def _size_kwargs(dataset, image_size):
    if image_size is None:
        return {}
    if dataset == "digits":
        from dlmodels.errors import UserError

        raise UserError("bench.generative: the digits are 8x8; `image_size` is for 'shapes'.")
    return {"image_size": image_size}


def load_data(dataset, split, seed=0, image_size=None):
    """`(x, y)` of a generative data set: "digits" (8x8, 10 classes, split "train" / "test") or
    "shapes" (single shapes, 3 classes, 16x16 unless `image_size`,
    `dlmodels.data.shapes_generative`)."""
    return _data_module(dataset).load(split, seed=seed, **_size_kwargs(dataset, image_size))


def num_classes(dataset) -> int:
    return _data_module(dataset).NUM_CLASSES


def train_dataset(dataset, batch_size, seed=0, image_size=None):
    """The shuffled training `tf.data.Dataset` of `(images, labels)` batches."""
    return _data_module(dataset).dataset(
        "train", batch_size=batch_size, seed=seed, **_size_kwargs(dataset, image_size)
    )


# -- VAE --------------------------------------------------------------------------------------
def negative_elbo(vae, x, samples=8, seed=0, batch_size=512) -> float:
    """Monte-Carlo held-out negative ELBO in nats per image: the mean over images of
    `mean_k [-log p(x | z_k)] + KL(q(z|x) || N(0, I))`, `z_k = mu + sigma eps_k`."""
    from dlmodels.losses import gaussian_kl_per_example

    x = np.asarray(x, "float32")
    mu, log_var = vae.encode(x, batch_size)
    kl = np.asarray(gaussian_kl_per_example(mu, log_var))
    rng = np.random.default_rng(seed)
    flat = x.reshape(len(x), -1)
    nll = np.zeros(len(x), np.float64)
    for _ in range(samples):
        z = mu + np.exp(0.5 * log_var) * rng.standard_normal(mu.shape).astype("float32")
        out = np.asarray(vae.decoder.predict(z, batch_size=batch_size, verbose=0), np.float64)
        out = out.reshape(len(x), -1)
        if vae.likelihood == "bernoulli":
            # binary cross-entropy with logits, stable form
            per = np.maximum(out, 0) - out * flat + np.log1p(np.exp(-np.abs(out)))
        else:
            per = 0.5 * (flat - out) ** 2 + 0.5 * np.log(2 * np.pi)
        nll += per.sum(1) / samples
    return float(np.mean(nll + kl))


def train_vae(
    *,
    epochs=40,
    latent_dim=8,
    architecture="conv",
    batch_size=64,
    learning_rate=2e-3,
    beta=1.0,
    elbo_samples=8,
    seed=0,
    strategy=None,
    verbose=True,
    dataset="digits",
    image_size=None,
):
    """Train a VAE on the train split of `dataset` ("digits" or "shapes"); returns
    (vae, curve) where curve lists the held-out -ELBO before training (epoch 0) and after every
    epoch."""
    import keras
    import tensorflow as tf

    from dlmodels.models import VAE
    from dlmodels.training import Trainer

    strategy = strategy or tf.distribute.get_strategy()
    keras.utils.set_random_seed(seed)
    x_test, _ = load_data(dataset, "test", seed=seed, image_size=image_size)
    with strategy.scope():
        vae = VAE(
            input_shape=x_test.shape[1:],
            latent_dim=latent_dim,
            architecture=architecture,
            beta=beta,
            seed=seed,
            name="vae",
        )
        optimizer = keras.optimizers.Adam(learning_rate)
    trainer = Trainer(vae.task(optimizer), strategy=strategy, progress=False)
    curve = [{"epoch": 0, "test_neg_elbo": negative_elbo(vae, x_test, elbo_samples, seed)}]

    def record(epoch, logs):
        value = negative_elbo(vae, x_test, elbo_samples, seed)
        curve.append({"epoch": epoch + 1, "train_loss": logs["loss"], "test_neg_elbo": value})
        _log(verbose, f"vae epoch {epoch + 1}: train {logs['loss']:.2f}, test -ELBO {value:.2f}")

    ds = train_dataset(dataset, batch_size, seed, image_size)
    trainer.fit(ds, epochs=epochs, callbacks=[record])
    return vae, curve


# -- cGAN -------------------------------------------------------------------------------------
def fourier_magnitudes(flat, image_shape):
    """Translation-invariant features of flattened images: log(1 + |rFFT2|) per channel."""
    images = np.asarray(flat, "float32").reshape(len(flat), *image_shape)
    spectrum = np.abs(np.fft.rfft2(images, axes=(1, 2)))
    return np.log1p(spectrum).reshape(len(flat), -1)


def train_classifier(seed=0, dataset="digits", image_size=None):
    """A classifier of the real training images, taking flattened images; returns
    (classifier, real test accuracy). Digits: logistic regression on the 64 pixels. Shapes:
    logistic regression on `fourier_magnitudes` (a shape may sit anywhere, so raw pixels are no
    linear cue to its class)."""
    from sklearn.linear_model import LogisticRegression

    x, y = load_data(dataset, "train", seed=seed, image_size=image_size)
    xt, yt = load_data(dataset, "test", seed=seed, image_size=image_size)
    if dataset == "digits":
        clf = LogisticRegression(max_iter=3000)
    else:
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import FunctionTransformer, StandardScaler

        features = FunctionTransformer(
            fourier_magnitudes, kw_args={"image_shape": tuple(x.shape[1:])}
        )
        clf = make_pipeline(features, StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(x.reshape(len(x), -1), y)
    return clf, float(clf.score(xt.reshape(len(xt), -1), yt))


def train_digit_classifier(seed=0):
    """Logistic regression on the real training digits' 64 pixels; returns (classifier, real
    test accuracy)."""
    return train_classifier(seed, "digits")


def conditional_accuracy(cgan, classifier, n=1000, seed=0) -> float:
    """Share of `n` generated images (random labels) that `classifier` assigns to the class the
    generator was conditioned on."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, cgan.num_classes, n).astype("int32")
    images = cgan.sample(labels, seed=seed + 1)
    predicted = classifier.predict(images.reshape(n, -1))
    return float(np.mean(predicted == labels))


def train_cgan(
    *,
    epochs=60,
    batch_size=64,
    loss="non_saturating",
    conditioning="projection",
    latent_dim=32,
    seed=0,
    strategy=None,
    verbose=True,
    dataset="digits",
    image_size=None,
):
    """Train a ConditionalGAN on the train split of `dataset` ("digits" or "shapes");
    returns (cgan, history)."""
    import keras
    import tensorflow as tf

    from dlmodels.models import ConditionalGAN
    from dlmodels.training import Trainer

    strategy = strategy or tf.distribute.get_strategy()
    keras.utils.set_random_seed(seed)
    wgan = loss == "wgan_gp"
    x_test, _ = load_data(dataset, "test", seed=seed, image_size=image_size)
    with strategy.scope():
        cgan = ConditionalGAN(
            input_shape=x_test.shape[1:],
            num_classes=num_classes(dataset),
            latent_dim=latent_dim,
            loss=loss,
            conditioning=conditioning,
            seed=seed,
            name="cgan",
        )

        def adam():
            # DCGAN's Adam(2e-4, beta_1=0.5); WGAN-GP's Adam(1e-4, 0, 0.9).
            if wgan:
                return keras.optimizers.Adam(1e-4, beta_1=0.0, beta_2=0.9)
            return keras.optimizers.Adam(2e-4, beta_1=0.5)

        g_opt, d_opt = adam(), adam()
    task = cgan.task(g_opt, d_opt, d_steps=5 if wgan else 1)
    trainer = Trainer(task, strategy=strategy, progress=False)

    def show(epoch, logs):
        if (epoch + 1) % 10 == 0:
            _log(verbose, f"cgan epoch {epoch + 1}: d {logs['d_loss']:.3f} g {logs['g_loss']:.3f}")

    history = trainer.fit(
        train_dataset(dataset, batch_size, seed, image_size), epochs=epochs, callbacks=[show]
    )
    return cgan, history


# -- pictures ---------------------------------------------------------------------------------
def save_grid(images, path, rows, cols, title=None, row_labels=None):
    """Save `rows x cols` single-channel images (values in [0, 1]) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = np.asarray(images)[..., 0] if np.asarray(images).ndim == 4 else np.asarray(images)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.7, rows * 0.7 + (0.4 if title else 0)))
    axes = np.asarray(axes).reshape(rows, cols)
    for i in range(rows):
        for j in range(cols):
            ax = axes[i, j]
            k = i * cols + j
            if k < len(images):
                ax.imshow(images[k], cmap="gray_r", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0 and row_labels is not None:
                ax.set_ylabel(str(row_labels[i]), rotation=0, labelpad=10)
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def cgan_grid(cgan, path, per_class=10, seed=0):
    """One row per class, `per_class` samples each."""
    labels = np.repeat(np.arange(cgan.num_classes), per_class)
    images = cgan.sample(labels, seed=seed)
    return save_grid(
        images,
        path,
        cgan.num_classes,
        per_class,
        title="cGAN samples, one row per class",
        row_labels=range(cgan.num_classes),
    )


def vae_pictures(vae, x_test, directory, seed=0, curve=None, what="digits") -> dict:
    """Reconstructions, prior samples, a latent traversal (and the -ELBO curve) as PNGs."""
    directory = Path(directory)
    originals = np.asarray(x_test[:20])
    recon = vae.reconstruct(originals)
    pairs = np.concatenate([originals[:10], recon[:10], originals[10:20], recon[10:20]])
    out = {
        "reconstructions": save_grid(
            pairs,
            directory / "vae_reconstructions.png",
            4,
            10,
            title=f"VAE: test {what} (rows 1, 3) and reconstructions (rows 2, 4)",
        ),
        "samples": save_grid(
            vae.sample(100, seed=seed), directory / "vae_samples.png", 10, 10, "VAE prior samples"
        ),
    }
    values = np.linspace(-2.5, 2.5, 11, dtype="float32")
    mu, _ = vae.encode(originals[:1])
    z = np.repeat(mu, vae.latent_dim * len(values), axis=0)
    for d in range(vae.latent_dim):
        z[d * len(values) : (d + 1) * len(values), d] = values
    out["latent_traversal"] = save_grid(
        vae.decode(z),
        directory / "vae_latent_traversal.png",
        vae.latent_dim,
        len(values),
        title="VAE latent traversal: row d sets z_d to -2.5 .. 2.5",
        row_labels=[f"z{d}" for d in range(vae.latent_dim)],
    )
    if curve:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 3))
        ax.plot([c["epoch"] for c in curve], [c["test_neg_elbo"] for c in curve], marker=".")
        ax.set_xlabel("epoch")
        ax.set_ylabel("held-out -ELBO (nats / image)")
        fig.tight_layout()
        out["elbo_curve"] = directory / "vae_elbo.png"
        fig.savefig(out["elbo_curve"], dpi=80)
        plt.close(fig)
    return {k: str(v) for k, v in out.items()}


# -- export -----------------------------------------------------------------------------------
def onnx_op_types(path) -> set[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = set()

    def walk(graph):
        for node in graph.node:
            ops.add(node.op_type)
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return ops


def export_parts(parts, directory, formats=("keras", "saved_model", "onnx"), overwrite=True):
    """`write_repository` for each `(name, model, samples)`; returns {name: summary}."""
    from dlmodels import export

    results = {}
    for name, model, samples in parts:
        report = export.write_repository(
            model,
            Path(directory) / name,
            samples=samples,
            formats=formats,
            task="generative",
            overwrite=overwrite,
        )
        summary = {
            "passed": report.passed,
            "manifest": str(report.manifest_path),
            "max_abs_error": {a.format: a.max_abs_error for a in report.artifacts},
        }
        if "onnx" in report.formats:
            ops = onnx_op_types(report["onnx"].path)
            summary["onnx_random_ops"] = sorted(ops & set(RANDOM_ONNX_OPS))
        results[name] = summary
    return results


# -- the benchmark ----------------------------------------------------------------------------
def run(
    output=DEFAULT_OUT,
    artifacts=DEFAULT_ARTIFACTS,
    *,
    vae_epochs=40,
    cgan_epochs=60,
    latent_dim=8,
    samples=1000,
    seed=0,
    export_models=True,
    pictures=True,
    verbose=True,
) -> dict:
    """Train, measure, draw and export; write the JSON to `output`. Returns the payload."""
    from dlmodels.bench.harness import write_results
    from dlmodels.data import digits

    begin = time.perf_counter()
    x_test, _ = digits.load("test", seed=seed)
    x_train, _ = digits.load("train", seed=seed)

    t = time.perf_counter()
    vae, curve = train_vae(epochs=vae_epochs, latent_dim=latent_dim, seed=seed, verbose=verbose)
    vae_seconds = time.perf_counter() - t

    t = time.perf_counter()
    cgan, history = train_cgan(epochs=cgan_epochs, seed=seed, verbose=verbose)
    cgan_seconds = time.perf_counter() - t
    classifier, clf_accuracy = train_digit_classifier(seed)
    accuracy = conditional_accuracy(cgan, classifier, n=samples, seed=seed)
    _log(
        verbose, f"cGAN conditional accuracy {accuracy:.3f} (classifier on real {clf_accuracy:.3f})"
    )

    payload = {
        "benchmark": "generative",
        "data": {
            "name": "scikit-learn load_digits (8x8, 10 classes), pixels / 16",
            "train": len(x_train),
            "test": len(x_test),
            "split": f"stratified, seed {seed}",
        },
        "vae": {
            "config": vae.get_config(),
            "params": int(vae.count_params()),
            "epochs": vae_epochs,
            "train_seconds": round(vae_seconds, 1),
            **_elbo_summary(curve),
            "elbo_estimate": (
                "Monte Carlo, 8 draws of z per test image; Bernoulli likelihood on [0, 1] "
                "intensities"
            ),
        },
        "cgan": {
            "config": cgan.get_config(),
            "generator_params": int(cgan.generator.count_params()),
            "discriminator_params": int(cgan.discriminator.count_params()),
            "epochs": cgan_epochs,
            "train_seconds": round(cgan_seconds, 1),
            "final_d_loss": history["d_loss"][-1],
            "final_g_loss": history["g_loss"][-1],
            "conditional_accuracy": accuracy,
            "conditional_samples": samples,
            "classifier": (
                "scikit-learn LogisticRegression on the 64 pixels of the real training digits"
            ),
            "classifier_real_test_accuracy": clf_accuracy,
            "passes_80_percent": accuracy >= 0.8,
        },
    }
    if pictures:
        payload["pictures"] = {
            **vae_pictures(vae, x_test, artifacts, seed=seed, curve=curve),
            "cgan_samples": str(cgan_grid(cgan, Path(artifacts) / "cgan_samples.png", seed=seed)),
        }
    if export_models:
        rng = np.random.default_rng(seed)
        mu, _ = vae.encode(x_test[:64])
        z = rng.standard_normal((64, cgan.latent_dim)).astype("float32")
        labels = (np.arange(64) % cgan.num_classes).astype("int32")
        payload["export"] = export_parts(
            [
                ("vae_encoder", vae.encoder, x_test[:64]),
                ("vae_decoder", vae.decoder, mu),
                ("cgan_generator", cgan.generator, {"z": z, "label": labels}),
            ],
            artifacts,
        )
    payload["total_seconds"] = round(time.perf_counter() - begin, 1)
    write_results(output, payload)
    _log(verbose, f"wrote {output}")
    return payload


def _elbo_summary(curve):
    values = [c["test_neg_elbo"] for c in curve]
    return {
        "test_neg_elbo_nats": {
            "initial": values[0],
            "after_epoch_1": values[1] if len(values) > 1 else None,
            "final": values[-1],
            "best": min(values),
        },
        "test_neg_elbo_falling": bool(values[-1] < values[1] < values[0])
        if len(values) > 2
        else None,
        "curve": curve,
    }


def run_shapes(
    output=DEFAULT_OUT,
    artifacts=DEFAULT_ARTIFACTS,
    *,
    vae_epochs=10,
    cgan_epochs=0,
    latent_dim=8,
    samples=1000,
    seed=0,
    pictures=True,
    verbose=True,
) -> dict:
    """Train the VAE (and, with `cgan_epochs` > 0, the cGAN) on the synthetic shapes and write
    the results as the "shapes" section of the JSON at `output`, keeping its other keys (the
    digits run) as they are. Returns the section."""
    import datetime as dt
    import json

    from dlmodels.bench.harness import machine_info, write_results
    from dlmodels.data import shapes_generative

    begin = time.perf_counter()
    x_test, _ = load_data("shapes", "test", seed=seed)
    x_train, _ = load_data("shapes", "train", seed=seed)
    t = time.perf_counter()
    vae, curve = train_vae(
        epochs=vae_epochs, latent_dim=latent_dim, seed=seed, verbose=verbose, dataset="shapes"
    )
    section = {
        "data": {
            "name": "dlmodels.data.shapes_generative: one anti-aliased circle, rectangle or "
            "triangle per 16x16x1 image in [0, 1], 3 balanced random classes",
            "train": len(x_train),
            "test": len(x_test),
            "split": f"separate seeded streams, seed {seed}",
        },
        "vae": {
            "config": vae.get_config(),
            "params": int(vae.count_params()),
            "epochs": vae_epochs,
            "train_seconds": round(time.perf_counter() - t, 1),
            **_elbo_summary(curve),
            "elbo_estimate": (
                "Monte Carlo, 8 draws of z per test image; Bernoulli likelihood on [0, 1] "
                "intensities (256 pixels, so not comparable with the 64-pixel digits)"
            ),
        },
    }
    directory = Path(artifacts) / "shapes"
    if pictures:
        section["pictures"] = vae_pictures(
            vae, x_test, directory, seed=seed, curve=curve, what="shapes"
        )
    if cgan_epochs:
        t = time.perf_counter()
        cgan, history = train_cgan(epochs=cgan_epochs, seed=seed, verbose=verbose, dataset="shapes")
        cgan_seconds = time.perf_counter() - t
        classifier, clf_accuracy = train_classifier(seed, "shapes")
        accuracy = conditional_accuracy(cgan, classifier, n=samples, seed=seed)
        section["cgan"] = {
            "config": cgan.get_config(),
            "epochs": cgan_epochs,
            "train_seconds": round(cgan_seconds, 1),
            "final_d_loss": history["d_loss"][-1],
            "final_g_loss": history["g_loss"][-1],
            "conditional_accuracy": accuracy,
            "conditional_samples": samples,
            "chance": 1.0 / shapes_generative.NUM_CLASSES,
            "classifier": "scikit-learn LogisticRegression on the log Fourier magnitudes of the "
            "real training shapes",
            "classifier_real_test_accuracy": clf_accuracy,
            "passes_80_percent": accuracy >= 0.8,
        }
        if pictures:
            section.setdefault("pictures", {})["cgan_samples"] = str(
                cgan_grid(cgan, directory / "cgan_samples.png", seed=seed)
            )
    section["total_seconds"] = round(time.perf_counter() - begin, 1)
    section["machine"] = machine_info()
    section["created"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    output = Path(output)
    existing = json.loads(output.read_text()) if output.exists() else {"benchmark": "generative"}
    existing["shapes"] = section
    write_results(output, existing)
    _log(verbose, f"added the shapes section to {output}")
    return section


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--artifacts", type=Path, default=DEFAULT_ARTIFACTS)
    parser.add_argument(
        "--dataset",
        choices=DATASETS,
        default="digits",
        help="digits: the full run, rewrites the JSON; shapes: adds a 'shapes' section to it",
    )
    parser.add_argument("--vae-epochs", type=int, default=None, help="default 40 / 10 (shapes)")
    parser.add_argument("--cgan-epochs", type=int, default=None, help="default 60 / 0 (shapes)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.dataset == "shapes":
        run_shapes(
            args.output,
            args.artifacts,
            vae_epochs=10 if args.vae_epochs is None else args.vae_epochs,
            cgan_epochs=0 if args.cgan_epochs is None else args.cgan_epochs,
            seed=args.seed,
        )
        return
    run(
        args.output,
        args.artifacts,
        vae_epochs=40 if args.vae_epochs is None else args.vae_epochs,
        cgan_epochs=60 if args.cgan_epochs is None else args.cgan_epochs,
        seed=args.seed,
    )


if __name__ == "__main__":
    main()

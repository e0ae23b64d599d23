"""LiteRT fp32 / fp16 / int8: converted from the float32 clone, run with ai-edge-litert in a
fresh process, judged against Keras on held-out synthetic data."""

import importlib.metadata
import json
import sys

import keras
import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")

from dlmodels import export
from dlmodels.export import litert
from dlmodels.export.verify import FINITE_ONLY
from dlmodels.models import registry

SIZE = 32


def blobs(n, seed):
    """32x32 images with one bright disc of a random colour on a dark noisy background; returns
    (images, disc mask as class 0/1, index of the disc's strongest colour channel)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    x = np.empty((n, SIZE, SIZE, 3), "float32")
    masks = np.empty((n, SIZE, SIZE), "int32")
    strongest = rng.integers(0, 3, n)
    colours = rng.uniform(0.2, 0.5, (n, 3)) + 0.5 * np.eye(3)[strongest]
    for i in range(n):
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
        x[i] = 0.1 * rng.uniform(0, 1, (SIZE, SIZE, 3)) + mask[..., None] * colours[i]
        masks[i] = mask
    return x, masks, strongest.astype("int32")


def miou(labels, logits, num_classes=2):
    """Mean IoU over classes present in labels or predictions (numpy reference)."""
    pred = np.argmax(logits, -1)
    ious = []
    for c in range(num_classes):
        inter = np.sum((pred == c) & (labels == c))
        union = np.sum((pred == c) | (labels == c))
        if union:
            ious.append(inter / union)
    return float(np.mean(ious))


def accuracy(labels, logits):
    return float(np.mean(np.argmax(logits, -1) == labels))


@pytest.fixture(scope="module")
def unet():
    """Depth-2 U-Net (4 base filters, BatchNorm, transposed-conv upsampling), trained for a few
    epochs to segment the discs so that its mIoU means something."""
    keras.utils.set_random_seed(0)
    model = registry.get(
        "unet", input_shape=(SIZE, SIZE, 3), num_classes=2, depth=2, base_filters=4
    )
    x, masks, _ = blobs(96, seed=1)
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(True))
    model.fit(x, masks, epochs=3, batch_size=8, verbose=0)
    return model


@pytest.fixture(scope="module")
def classifier():
    """Conv-BN-ReLU x2 -> global pooling -> Dense(3) logits: which colour channel the disc is
    strongest in (trained for a few epochs)."""
    keras.utils.set_random_seed(1)
    inp = keras.Input((SIZE, SIZE, 3), name="image")
    h = keras.layers.Conv2D(8, 3, padding="same", name="conv1")(inp)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn1")(h))
    h = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.GlobalMaxPooling2D(name="pool")(h)
    logits = keras.layers.Dense(3, name="logits")(h)
    model = keras.Model(inp, logits, name="tiny_classifier")
    x, _, y = blobs(128, seed=2)
    model.compile(keras.optimizers.Adam(3e-2), keras.losses.SparseCategoricalCrossentropy(True))
    model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def held_out():
    return blobs(24, seed=100)


@pytest.fixture(scope="module")
def unet_repo(unet, held_out, tmp_path_factory):
    """fp32, fp16 and int8 LiteRT files of the U-Net through write_repository (one SavedModel
    of the float32 clone, three conversions, three fresh-process verifications)."""
    x, masks, _ = held_out
    calib, _, _ = blobs(32, seed=7)  # disjoint from the held-out data
    # fp16 errors scale with the outputs (11-bit significand): the documented bar, 1e-2 for
    # outputs of order one, times the size of this trained model's logits.
    scale = max(1.0, float(np.max(np.abs(unet.predict(x, verbose=0)))))
    return scale, export.write_repository(
        unet,
        tmp_path_factory.mktemp("litert") / "unet",
        formats=("litert", "litert_fp16", "litert_int8"),
        samples=x,
        labels=masks,
        metric=miou,
        metric_name="miou",
        calibration=calib,
        fp16_atol=litert.TOLERANCES["fp16"] * scale,
        int8_max_metric_drop=0.02,
    )


def test_unet_fp32_fp16_int8_parity_and_miou(unet, unet_repo, held_out):
    scale, report = unet_repo
    assert report.formats == ["litert", "litert_fp16", "litert_int8"]
    assert report.passed, report.failures()
    # The trained U-Net segments the held-out discs: the metric is worth protecting.
    assert report.keras_metric > 0.9
    fp32, fp16, int8 = report["litert"], report["litert_fp16"], report["litert_int8"]
    assert fp32.max_abs_error <= 1e-4 and fp32.agreement == 1.0
    assert fp32.metric == pytest.approx(report.keras_metric, abs=1e-9)
    # fp16 weights: above fp32 round-off, inside the documented (output-scaled) bar.
    assert litert.TOLERANCES["fp16"] == 1e-2 and 2 < scale < 50
    assert 1e-5 < fp16.max_abs_error <= 1e-2 * scale
    assert fp16.mean_abs_error <= 1e-3 * scale and fp16.agreement >= 0.999
    # int8: quantized (errors far above fp16's), yet the same segmentation: mIoU drop <= 0.02.
    assert int8.max_abs_error > fp16.max_abs_error
    assert int8.agreement >= 0.97
    assert report.keras_metric - int8.metric <= 0.02
    assert int8.judged_by == "argmax agreement >= 0.9 and miou drop <= 0.02"
    # Sizes: fp16 weights take about half of fp32's bytes, int8 less again.
    assert int8.size_bytes < fp16.size_bytes < fp32.size_bytes
    # The metric is the file's own: recomputed here from its outputs in this process.
    x, masks, _ = held_out
    got = litert.LiteRTModel(int8.path).run(x)["logits"]
    assert int8.metric == pytest.approx(miou(masks, got), abs=1e-12)


def _dtypes_and_ops(path):
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    kernels = {  # 4-D constant tensors: the conv / transposed-conv kernels
        np.dtype(t["dtype"]).name for t in interp.get_tensor_details() if len(t["shape"]) == 4
    }
    return kernels, {d["op_name"] for d in interp._get_ops_details()}


def test_precisions_are_what_they_say(unet_repo):
    """fp32 file: float32 kernels; fp16: float16 kernels dequantized at load; int8: int8
    kernels and activations between a QUANTIZE after the float input and a DEQUANTIZE before
    the float output."""
    _, unet_repo = unet_repo
    kinds32, ops32 = _dtypes_and_ops(unet_repo["litert"].path)
    kinds16, ops16 = _dtypes_and_ops(unet_repo["litert_fp16"].path)
    kinds8, ops8 = _dtypes_and_ops(unet_repo["litert_int8"].path)
    assert "float16" not in kinds32 and "int8" not in kinds32 and "QUANTIZE" not in ops32
    assert "float16" in kinds16 and "int8" not in kinds16 and "DEQUANTIZE" in ops16
    assert "int8" in kinds8 and "float16" not in kinds8
    assert {"QUANTIZE", "DEQUANTIZE", "CONV_2D"} <= ops8
    image = {"name": "image", "shape": ["batch", SIZE, SIZE, 3], "dtype": "float32"}
    io = litert.litert_io(unet_repo["litert_int8"].path)
    assert io["inputs"] == [image]
    assert io["outputs"] == [
        {"name": "logits", "shape": ["batch", SIZE, SIZE, 2], "dtype": "float32"}
    ]


def test_manifest_entries(unet_repo):
    _, unet_repo = unet_repo
    import hashlib

    from dlmodels.runtime.manifest import load_manifest

    data = json.loads(unet_repo.manifest_path.read_text())
    arts = {a["format"]: a for a in data["artifacts"]}
    assert set(arts) == {"litert", "litert_fp16", "litert_int8"}
    for fmt, a in arts.items():
        path = unet_repo.output_dir / a["path"]
        assert a["path"] == export.ARTIFACT_PATHS[fmt]
        assert a["size_bytes"] == path.stat().st_size
        assert a["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert a["inputs"] == [
            {"name": "image", "shape": ["batch", SIZE, SIZE, 3], "dtype": "float32"}
        ]
        assert a["outputs"][0]["output_kind"] == "logits"
        assert a["parity"]["passed"] is True and a["parity"]["n_samples"] == 24
        assert a["parity"]["method"].startswith("ai_edge_litert Interpreter")
        assert a["metric"]["name"] == "miou"
    q = arts["litert_int8"]["quantization"]
    assert q["calibration_samples"] == 32 and q["activation_type"] == "int8"
    assert q["io_type"] == "float32"
    assert "quantization" not in arts["litert"]
    assert data["tools"]["ai-edge-litert"] == importlib.metadata.version("ai-edge-litert")
    read = {a.format: a for a in load_manifest(unet_repo.manifest_path).artifacts}
    assert read["litert_fp16"].inputs[0].shape == ("batch", SIZE, SIZE, 3)


@pytest.fixture(scope="module")
def classifier_tflite(classifier, tmp_path_factory):
    return litert.to_litert(classifier, tmp_path_factory.mktemp("clf") / "c.tflite")


def test_classifier_fp32_dynamic_batch_and_int8_accuracy(
    classifier, classifier_tflite, held_out, tmp_path
):
    x, _, y = held_out
    calib, _, _ = blobs(32, seed=8)
    keras_logits = classifier.predict(x, verbose=0)
    keras_acc = accuracy(y, keras_logits)
    assert keras_acc >= 0.9  # learned the task
    report = litert.verify_litert(
        classifier,
        classifier_tflite,
        x,
        labels=y,
        metric=accuracy,
        expected={"logits": keras_logits},
    )
    assert report.passed and report.max_abs_error <= 1e-4, report
    assert report.metric_litert == report.metric_keras == keras_acc
    # One file, any batch: the interpreter resizes the dynamic batch (shape_signature -1).
    m = litert.LiteRTModel(classifier_tflite)
    for n in (1, 5):
        got = m.run(x[:n])["logits"]
        assert got.shape == (n, 3)
        assert np.max(np.abs(got - keras_logits[:n])) <= 1e-4
    int8 = litert.to_litert(
        classifier, tmp_path / "c.int8.tflite", precision="int8", calibration=calib
    )
    report = litert.verify_litert(
        classifier, int8, x, precision="int8", labels=y, metric=accuracy,
        expected={"logits": keras_logits}, max_metric_drop=0.05,
    )  # fmt: skip
    assert report.passed and report.min_agreement == 0.9, report
    assert "accuracy drop <= 0.05" in report.judged_by
    assert report.metric_keras - report.metric_litert <= 1 / 24  # at most one image of 24


def test_int8_verdict_judges_the_metric_drop_and_says_when_only_finiteness(monkeypatch):
    """verify_litert's int8 bar: agreement and metric drop (default 0.01); an output without
    classes and no metric is judged on finite outputs only, and the report says so."""
    keras_out = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    shifted = {"logits": keras_out - 0.1}  # same argmax, lower mean
    monkeypatch.setattr(litert, "litert_predict", lambda *a, **k: shifted)

    def mean_logit(labels, out):
        return float(np.mean(out))

    kw = {"precision": "int8", "expected": {"logits": keras_out}}
    report = litert.verify_litert(None, "x.tflite", keras_out, labels=0, metric=mean_logit, **kw)
    assert report.agreement == 1.0 and report.max_metric_drop == 0.01
    assert not report.passed and "mean_logit drop <= 0.01" in report.judged_by, report
    assert litert.verify_litert(
        None, "x.tflite", keras_out, labels=0, metric=mean_logit, max_metric_drop=0.2, **kw
    ).passed
    one = {"logits": keras_out[:, :1]}
    monkeypatch.setattr(litert, "litert_predict", lambda *a, **k: one)
    with pytest.warns(UserWarning, match="finite outputs only"):
        report = litert.verify_litert(None, "x.tflite", keras_out, precision="int8", expected=one)
    assert report.passed and report.judged_by == FINITE_ONLY


def test_fresh_process_verification_catches_a_corrupted_file(
    classifier, classifier_tflite, held_out, tmp_path
):
    x, _, _ = held_out
    expected = {"logits": classifier.predict(x[:4], verbose=0)}
    good = classifier_tflite
    assert litert.verify_litert(classifier, good, x[:4], expected=expected).passed
    # Corrupt the weights: LiteRT stores the Dense kernel transposed, (out, in), as float32;
    # find those bytes in the flatbuffer and negate them. The file still loads and runs.
    data = bytearray(good.read_bytes())
    kernel = classifier.get_layer("logits").kernel.numpy()
    start = bytes(data).find(kernel.T.astype("<f4").tobytes())
    assert start > 0
    data[start : start + kernel.size * 4] = (-kernel.T).astype("<f4").tobytes()
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(bytes(data))
    report = litert.verify_litert(classifier, bad, x[:4], expected=expected)
    assert not report.passed and report.max_abs_error > 1e-2, report
    # A truncated file does not load: the worker fails and says so.
    cut = tmp_path / "cut.tflite"
    cut.write_bytes(good.read_bytes()[: len(data) // 2])
    with pytest.raises(RuntimeError, match="LiteRT worker failed"):
        litert.verify_litert(classifier, cut, x[:4], expected=expected)


def test_worker_does_not_import_tensorflow(classifier_tflite, held_out):
    _, names, tf_loaded = litert._run_worker(classifier_tflite, held_out[0][:2])
    assert names == ["logits"] and tf_loaded is False


class _Igamma(keras.layers.Layer):
    """An op the TFLite converter has no builtin kernel for."""

    def call(self, x):
        import tensorflow as tf

        return tf.math.igamma(keras.ops.abs(x) + 1.0, keras.ops.abs(x) + 1.0)


def test_unsupported_op_names_op_and_layer_and_writes_nothing(tmp_path):
    inp = keras.Input((4,), name="x")
    model = keras.Model(inp, _Igamma(name="odd")(keras.layers.Dense(4, name="d")(inp)))
    with pytest.raises(litert.LiteRTConversionError, match=r"op Igamma in layer 'odd'"):
        litert.to_litert(model, tmp_path / "m.tflite")
    assert list(tmp_path.iterdir()) == []


def test_clear_errors_before_any_file(classifier, tmp_path, monkeypatch):
    target = tmp_path / "m.tflite"
    with pytest.raises(ValueError, match=r"precision='int4'.*'fp16'"):
        litert.to_litert(classifier, target, precision="int4")
    with pytest.raises(ValueError, match="needs `calibration`"):
        litert.to_litert(classifier, target, precision="int8")
    with pytest.raises(ValueError, match="calibration is empty"):
        litert.to_litert(classifier, target, precision="int8", calibration=[])
    with pytest.raises(ValueError, match=r"shape \(2, 16, 16, 3\).*\(batch, 32, 32, 3\)"):
        litert.to_litert(
            classifier, target, precision="int8", calibration=np.zeros((2, 16, 16, 3), "float32")
        )
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    with pytest.raises(ValueError, match=r'pip install "dlmodels\[litert\]"'):
        litert.to_litert(classifier, target)
    x = np.zeros((2, SIZE, SIZE, 3), "float32")
    with pytest.raises(ValueError, match=r"dlmodels\[litert\]"):
        export.write_repository(classifier, tmp_path / "repo", samples=x, formats="keras,litert")
    assert list(tmp_path.iterdir()) == []

"""write_repository: one pipeline for any functional model, each artifact run and compared."""

import json

import keras
import numpy as np
import pytest

from dlmodels import export
from tests.export._tiny import images


def _int_input_model():
    """A float image and integer token ids in, a segmentation map and a softmax score out."""
    keras.utils.set_random_seed(3)
    image = keras.Input((16, 16, 3), name="image")
    tokens = keras.Input((4,), dtype="int32", name="tokens")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(image)
    mask = keras.layers.Conv2D(3, 1, name="mask")(x)
    emb = keras.layers.Flatten()(keras.layers.Embedding(10, 2, name="embed")(tokens))
    pooled = keras.layers.GlobalAveragePooling2D()(x)
    merged = keras.layers.Concatenate()([pooled, emb])
    score = keras.layers.Dense(2, activation="softmax", name="score")(merged)
    return keras.Model([image, tokens], [mask, score], name="mixed_io")


def _samples(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": images(n, seed), "tokens": rng.integers(0, 10, (n, 4)).astype("int64")}


def test_integer_and_float_inputs_two_outputs_every_format(tmp_path):
    model = _int_input_model()
    report = export.write_repository(
        model, tmp_path, samples=_samples(6), calibration=_samples(8, seed=1)
    )
    assert report.formats == ["keras", "saved_model", "onnx", "int8"]
    assert report.passed, report.failures()
    for fmt in ("keras", "saved_model", "onnx"):
        assert report[fmt].max_abs_error <= 1e-4, fmt
    assert report["int8"].agreement >= 0.9
    manifest = json.loads(report.manifest_path.read_text())
    arts = {a["format"]: a for a in manifest["artifacts"]}
    assert set(arts) == {"keras", "saved_model", "onnx", "int8"}
    for fmt, a in arts.items():
        ins = {i["name"]: i for i in a["inputs"]}
        outs = {o["name"]: o for o in a["outputs"]}
        assert ins["tokens"]["dtype"] == "int32" and ins["image"]["dtype"] == "float32", fmt
        assert outs["mask"]["output_kind"] == "logits", fmt
        assert outs["score"]["output_kind"] == "softmax", fmt
        assert a["task"] == "segmentation" and a["num_classes"] == 3
        assert a["parity"]["n_samples"] == 6 and a["parity"]["passed"] is True
    assert arts["int8"]["quantization"]["calibration_samples"] == 8
    assert arts["int8"]["quantization"]["activation_type"] == "uint8"
    assert "quantization" not in arts["onnx"]
    assert arts["keras"]["parity"]["method"].startswith("reloaded")
    # The TensorFlow-free reader of dlmodels.runtime understands every new key.
    from dlmodels.runtime.manifest import load_manifest

    read = {a.format: a for a in load_manifest(report.manifest_path).artifacts}
    assert read["int8"].quantization["reduce_range"] in (True, False)
    assert (read["onnx"].task, read["onnx"].num_classes) == ("segmentation", 3)
    assert [o.output_kind for o in read["saved_model"].outputs] == ["logits", "softmax"]


def test_keras_row_is_measured_on_the_reloaded_file(model, tmp_path, monkeypatch):
    """A faked `.keras` row (error 0 without reading the file) would not see this perturbation."""
    calls = []
    real = keras.saving.load_model

    def perturbed(path, *args, **kwargs):
        calls.append(kwargs.get("safe_mode"))
        loaded = real(path, *args, **kwargs)
        kernel = loaded.get_layer("logits").kernel
        kernel.assign(kernel.numpy() + 0.5)
        return loaded

    x = images(3, seed=4)
    clean = export.write_repository(model, tmp_path / "clean", formats=["keras"], samples=x)
    assert clean["keras"].max_abs_error <= 1e-6 and clean.passed
    monkeypatch.setattr(keras.saving, "load_model", perturbed)
    bad = export.write_repository(model, tmp_path / "bad", formats=["keras"], samples=x)
    assert calls == [True]  # reloaded once, in safe mode
    assert bad["keras"].max_abs_error > 0.1
    assert not bad.passed
    saved = json.loads(bad.manifest_path.read_text())["artifacts"][0]
    assert saved["parity"]["max_abs_error_vs_keras"] == bad["keras"].max_abs_error


def test_metric_on_keras_and_every_artifact(model, tmp_path):
    x = images(4, seed=6)
    labels = np.argmax(model.predict(x, verbose=0), -1)

    def pixel_accuracy(y, logits):
        return float(np.mean(np.argmax(logits, -1) == y))

    report = export.write_repository(
        model,
        tmp_path,
        formats="onnx,int8",
        samples=x,
        labels=labels,
        metric=pixel_accuracy,
        calibration=images(16, seed=7),
        int8_max_metric_drop=0.5,
    )
    assert report.keras_metric == 1.0 and report["onnx"].metric == 1.0
    (int8_logits,) = export.onnx_predict(report["int8"].path, x)
    assert report["int8"].metric == pixel_accuracy(labels, int8_logits)  # the file's own outputs
    assert 0.5 <= report["int8"].metric <= 1.0
    assert "pixel_accuracy drop <= 0.5" in report["int8"].judged_by
    arts = json.loads(report.manifest_path.read_text())["artifacts"]
    assert [a["format"] for a in arts] == ["onnx", "int8"]
    assert arts[1]["metric"] == {
        "name": "pixel_accuracy",
        "keras": 1.0,
        "artifact": report["int8"].metric,
    }
    assert not (tmp_path / "model.keras").exists()


class RunningMeanLogit:
    """Stateful like a `keras.metrics.Metric`: each call adds to a running mean."""

    name = "running_mean_logit"

    def __init__(self):
        self.reset_state()

    def reset_state(self):
        self.total, self.count = 0.0, 0

    def __call__(self, labels, logits):
        self.total += float(np.mean(logits))
        self.count += 1
        return self.total / self.count


def test_a_stateful_metric_scores_each_artifact_on_its_own_outputs(model, tmp_path):
    """Without a reset, the int8 file's score would be the running mean over Keras', ONNX's and
    its own outputs."""
    x = images(4, seed=6)
    report = export.write_repository(
        model,
        tmp_path,
        formats="onnx,int8",
        samples=x,
        labels=np.zeros(len(x)),
        metric=RunningMeanLogit(),
        calibration=images(16, seed=7),
        int8_max_metric_drop=10.0,
    )
    assert report.keras_metric == pytest.approx(float(np.mean(model.predict(x, verbose=0))))
    (int8_logits,) = export.onnx_predict(report["int8"].path, x)
    assert report["int8"].metric == pytest.approx(float(np.mean(int8_logits)), abs=1e-6)
    assert report["int8"].metric != pytest.approx(report.keras_metric, abs=1e-5)


def test_refuses_existing_targets_before_any_work(model, tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"manifest\.json"):
        export.write_repository(model, tmp_path, formats=["onnx"], samples=images(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


@pytest.mark.parametrize(
    ("samples", "kwargs", "match"),
    [
        (np.zeros((2, 8, 8, 3), "float32"), {}, r"input 'image' .*\(None, 16, 16, 3\)"),
        (np.zeros((16, 16, 3), "float32"), {}, "add the batch axis"),
        ({"img": np.zeros((2, 16, 16, 3))}, {}, "missing"),
        (np.zeros((2, 16, 16, 3)), {"formats": ["tflite"]}, "choose one or more"),
        (np.zeros((2, 16, 16, 3)), {"metric": lambda y, o: 0.0}, "without labels"),
        # Checked before the .keras file (first in FORMATS) is written.
        (np.zeros((2, 16, 16, 3)), {"opset": 12}, r"opset=12 is out of range.*13\.\.18"),
        # int8 selection arguments: checked before .keras / ONNX files are written.
        (
            np.zeros((2, 16, 16, 3)),
            {
                "formats": ["keras", "int8"],
                "int8_held_out": images(2),
                "int8_candidates": [{}, {"x": 1}],
            },
            r"candidates\[1\] has unknown keys \['x'\]",
        ),
        (
            np.zeros((2, 16, 16, 3)),
            {
                "formats": ["keras", "int8"],
                "int8_held_out": images(2),
                "int8_selection_metric": "miou",
            },
            "int8_selection_metric must be callable",
        ),
        (np.zeros((2, 16, 16, 3)), {"formats": ["keras"], "int8_held_out": images(2)}, "no 'int8'"),
        (
            np.zeros((2, 16, 16, 3)),
            {"formats": ["keras", "int8"], "calibration": []},
            "calibration is empty",
        ),
    ],
)
def test_clear_value_errors(model, tmp_path, samples, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export.write_repository(model, tmp_path, samples=samples, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_leaves_no_stale_manifest(model, tmp_path, monkeypatch):
    """Overwriting: the old manifest goes before the first artifact is replaced, so a failure
    half-way never leaves a manifest describing files that changed or are gone."""
    x = images(2, seed=8)
    export.write_repository(model, tmp_path, formats=["keras", "onnx"], samples=x)
    assert (tmp_path / "manifest.json").exists()
    seen = {}

    def failing_to_onnx(*args, **kwargs):
        seen["manifest_during_export"] = (tmp_path / "manifest.json").exists()
        raise RuntimeError("injected: tf2onnx crashed")

    monkeypatch.setattr(export, "to_onnx", failing_to_onnx)
    with pytest.raises(RuntimeError, match="injected"):
        export.write_repository(
            model, tmp_path, formats=["keras", "onnx"], samples=x, overwrite=True
        )
    assert seen == {"manifest_during_export": False}
    assert not (tmp_path / "manifest.json").exists()
    assert not list(tmp_path.glob("manifest.json*"))
    assert (tmp_path / "model.keras").exists()  # complete, replaced before the failure
    monkeypatch.undo()
    report = export.write_repository(
        model, tmp_path, formats=["keras", "onnx"], samples=x, overwrite=True
    )
    assert report.passed and report.manifest_path.exists()


def test_keras_file_is_reloaded_with_dlmodels_load_model(model, tmp_path, monkeypatch):
    """dlmodels.load_model registers every dlmodels serializable (layers, losses, metrics)."""
    import dlmodels

    calls = []
    real = dlmodels.load_model

    def recording(path, **kwargs):
        calls.append(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(dlmodels, "load_model", recording)
    report = export.write_repository(model, tmp_path, formats=["keras"], samples=images(2))
    assert report.passed and calls == [{"safe_mode": True}]


def test_sequential_models_export_like_functional_ones(tmp_path):
    """Keras 3's Sequential has no `output_names`; every exporter takes its functional view."""
    model = keras.Sequential(
        [
            keras.Input((6,), name="features"),
            keras.layers.Dense(4, name="hidden"),
            keras.layers.Dense(3, name="scores"),
        ],
        name="seq",
    )
    x = np.random.default_rng(0).standard_normal((8, 6)).astype("float32")
    report = export.write_repository(
        model, tmp_path / "seq", samples=x, formats=("keras", "saved_model", "onnx")
    )
    assert report.passed, report.failures()
    assert export.onnx_io(tmp_path / "seq" / "model.onnx")["outputs"][0]["name"] == "scores"
    assert export.verify(model, tmp_path / "seq" / "model.onnx", x).passed


def test_simplified_onnx_with_node_counts_in_manifest_and_progress(model, tmp_path, monkeypatch):
    """simplify=True: the ONNX file is onnxslim's graph, verified again in a fresh process,
    node counts before/after in the manifest; the format loop runs through `_progress.track`."""
    import hashlib

    import onnx

    from dlmodels.export import repository

    seen = []
    real_track = repository.track

    def recording_track(items, description, total=None):
        seen.append((list(items), description))
        return real_track(items, description, total)

    monkeypatch.setattr(repository, "track", recording_track)
    x = images(3, seed=9)
    report = export.write_repository(model, tmp_path, formats="onnx", samples=x, simplify=True)
    assert seen == [(["onnx"], "exporting")]
    assert report.passed and report["onnx"].max_abs_error <= 1e-4, report.failures()
    path = tmp_path / "model.onnx"
    graph = onnx.load(str(path))
    props = {p.key: p.value for p in graph.metadata_props}
    entry = json.loads(report.manifest_path.read_text())["artifacts"][0]
    simp = entry["simplification"]
    assert simp["tool"] == props["dlmodels.simplified_by"]
    assert simp["nodes_after"] == len(graph.graph.node) <= simp["nodes_before"]
    assert simp["nodes_before"] == int(props["dlmodels.nodes_before"])
    assert simp["max_abs_error_vs_keras"] <= 1e-4 and simp["n_samples"] == 3
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert entry["parity"]["passed"] is True


def test_one_shot_calibration_generator_serves_onnx_and_litert_int8(model, tmp_path):
    """The calibration data are read once: a generator drained by the ONNX int8 step would
    leave LiteRT int8 with "calibration is empty"."""
    pytest.importorskip("ai_edge_litert")
    batches = (images(3, seed) for seed in (1, 2))
    report = export.write_repository(
        model, tmp_path, samples=images(2), formats=("onnx", "int8", "litert_int8"),
        calibration=batches, int8_min_agreement=None,
    )  # fmt: skip
    assert report["int8"].quantization["calibration_samples"] == 6
    assert report["litert_int8"].quantization["calibration_samples"] == 6

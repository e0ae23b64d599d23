"""Bench harness: right keys, positive numbers, results JSON with machine info. Timing
assertions only where the gap is built in (a predictor that sleeps): the machine is shared."""

import json
import time

import numpy as np
import pytest

from dlmodels import bench, export
from tests.export._tiny import images, tiny_segmenter

KEYS = {"p50_ms", "p90_ms", "mean_ms", "iters"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_segmenter(0, filters=8)
    root = tmp_path_factory.mktemp("bench")
    fp32 = export.to_onnx(model, root / "m.onnx")
    int8 = export.quantize(fp32, root / "m.int8.onnx", calibration=images(8))
    return model, fp32, int8


def test_measure_latency():
    stats = bench.measure_latency(lambda x: np.tanh(x).sum(), np.ones((8, 8)), warmup=1, iters=7)
    assert set(stats) == KEYS
    assert stats["iters"] == 7
    assert 0 < stats["p50_ms"] <= stats["p90_ms"]
    assert stats["mean_ms"] > 0
    with pytest.raises(ValueError, match="iters"):
        bench.measure_latency(lambda x: x, 1, iters=0)


def test_predictors_match_keras(setup):
    model, fp32, _ = setup
    x = images(1)
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(bench.keras_predictor(model)(x), expected, atol=1e-5)
    np.testing.assert_allclose(bench.ort_predictor(fp32, threads=1)(x), expected, atol=1e-4)


def test_compare_rows(setup):
    model, fp32, int8 = setup
    rows = bench.compare(
        model, {"ONNX fp32": fp32, "ONNX int8": int8}, images(1), warmup=1, iters=6, rounds=3
    )
    assert [r["name"] for r in rows] == ["keras (TF)", "ONNX fp32", "ONNX int8"]
    for r in rows:
        assert set(r) >= KEYS
        assert r["iters"] == 6
        assert 0 < r["p50_ms"] <= r["p90_ms"]
        # The ratio is taken against the Keras row's median, not some other statistic.
        assert r["speedup_vs_keras"] == pytest.approx(rows[0]["p50_ms"] / r["p50_ms"])
    assert rows[1]["size_bytes"] == fp32.stat().st_size
    assert rows[2]["size_bytes"] == int8.stat().st_size


def test_timings_tell_a_slow_predictor_from_a_fast_one():
    """A predictor that sleeps 5 ms per call must time at >= 5 ms and slower than a no-op."""

    def slow(x):
        time.sleep(0.005)

    timings = bench.compare_predictors(
        {"slow": slow, "fast": lambda x: None}, None, warmup=0, iters=6, rounds=2
    )
    # Only what a loaded machine cannot flip: sleeping never takes less than asked, and a no-op
    # would have to be delayed past 5 ms on most of its calls to reach the sleeper's median.
    assert timings["slow"]["p50_ms"] >= 5.0
    assert timings["fast"]["p50_ms"] < timings["slow"]["p50_ms"]


def test_keras_predictor_takes_dicts_and_lists():
    import keras

    image, vec = keras.Input((4, 4, 3), name="image"), keras.Input((2,), name="vector")
    pooled = keras.layers.GlobalAveragePooling2D()(image)
    out = keras.layers.Dense(2, name="out")(keras.layers.Concatenate()([pooled, vec]))
    model = keras.Model({"image": image, "vector": vec}, out)
    rng = np.random.default_rng(0)
    x = {"image": rng.random((1, 4, 4, 3), "float32"), "vector": rng.random((1, 2), "float32")}
    expected = model.predict(x, verbose=0)
    predict = bench.keras_predictor(model)
    np.testing.assert_allclose(predict(x), expected, atol=1e-6)
    np.testing.assert_allclose(predict([x["image"], x["vector"]]), expected, atol=1e-6)


def test_compare_predictors_interleaves():
    calls = []
    preds = {"a": lambda x: calls.append("a"), "b": lambda x: calls.append("b")}
    timings = bench.compare_predictors(preds, None, warmup=0, iters=4, rounds=2)
    assert calls == ["a", "a", "b", "b", "a", "a", "b", "b"]
    assert {k: v["iters"] for k, v in timings.items()} == {"a": 4, "b": 4}


def test_machine_info_and_write_results(tmp_path):
    info = bench.machine_info()
    for key in ("cpu", "logical_cores", "python", "tensorflow", "keras", "onnxruntime", "platform"):
        assert info[key], key
    path = bench.write_results(tmp_path / "results" / "x.json", {"results": [{"p50_ms": 1.0}]})
    data = json.loads(path.read_text())
    assert data["results"] == [{"p50_ms": 1.0}]
    assert data["machine"]["python"] == info["python"]
    assert "created" in data
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]

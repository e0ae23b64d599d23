"""The export benchmark: every runtime x batch row present, GOP/s and peaks consistent."""

import json

import numpy as np
import pytest

pytest.importorskip("openvino")

from dlmodels.bench import export as bench

TINY = {"input_shape": (32, 32, 3), "depth": 2, "base_filters": 4, "num_classes": 3}


@pytest.fixture
def openvino_compiles(monkeypatch):
    """Every `OpenVINOModel` the benchmark compiles for a model row (the MatMul peak graphs
    left out), as (batch_size, OpenVINO models of another batch still alive at that moment)."""
    import gc
    import weakref

    from dlmodels.export import openvino as ovx

    compiles, alive = [], []

    class Recording(ovx.OpenVINOModel):
        def __init__(self, path, *args, batch_size=None, **kwargs):
            super().__init__(path, *args, batch_size=batch_size, **kwargs)
            if self.path.name.startswith("matmul"):
                return  # a peak graph, not a model row
            gc.collect()
            others = [m for m in (r() for r in alive) if m and m.batch_size != batch_size]
            compiles.append((batch_size, len(others)))
            del others
            alive.append(weakref.ref(self))

    monkeypatch.setattr(ovx, "OpenVINOModel", Recording)
    return compiles


def test_every_row_present_and_consistent(tmp_path, openvino_compiles):
    out = tmp_path / "export_unet.json"
    payload = bench.run(
        "unet",
        output=out,
        batches=(1, 2),
        iters=2,
        iters_large=2,
        warmup=1,
        rounds=1,
        threads=1,
        model_kwargs=TINY,
        calibration_samples=4,
        peak_size=64,
        peak_iters=2,
        profile=True,
        profile_iters=2,
        verbose=False,
    )
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(payload["rows"]))
    assert json.loads(out.read_text())["profiles"] == json.loads(json.dumps(payload["profiles"]))
    rows = {(r["runtime"], r["batch"]): r for r in payload["rows"]}
    keys = [k for k, _, _ in bench.RUNTIMES]
    assert set(rows) == {(k, b) for k in keys for b in (1, 2)}
    from dlmodels.export import openvino as ovx

    bf16 = ovx.supports_bf16()
    has_nncf = bench._nncf_version() is not None
    # macs_per_image is dlmodels.bench.flops.count_macs (checked by hand in test_flops.py);
    # effective_macs_per_image its count without the taps on padding: fewer here, as every
    # 3x3 SAME conv of the U-Net has border taps reading padding.
    assert payload["macs_per_image"] > 0
    macs, effective = payload["macs_per_image"], payload["effective_macs_per_image"]
    assert 0.5 * macs < effective < macs
    assert "effective_gops" in payload["gops_definition"]
    for (key, batch), r in rows.items():
        if (key == "openvino_bf16" and not bf16) or (key == "openvino_int8_nncf" and not has_nncf):
            assert "skipped" in r
            continue
        assert 0 < r["p50_ms"] <= r["p90_ms"] and r["iters"] == 2
        assert r["gops"] == pytest.approx(2 * macs * batch / (r["p50_ms"] * 1e6))
        assert r["fraction_of_peak"] == pytest.approx(r["gops"] / r["peak_gops"])
        assert r["effective_gops"] == pytest.approx(2 * effective * batch / (r["p50_ms"] * 1e6))
        assert r["fraction_of_peak_effective"] == pytest.approx(
            r["effective_gops"] / r["peak_gops"]
        )
        assert r["peak_gops"] == payload["peaks"][r["peak"]]["gops"]
        assert r["images_per_s"] == pytest.approx(batch * 1e3 / r["p50_ms"])
        base = rows[("ort_fp32", batch)]["p50_ms"]
        assert r["speedup_vs_ort_fp32"] == pytest.approx(base / r["p50_ms"])
    # Peaks: same precision, same runtime family; 2 n^3 operations over the median.
    p = payload["peaks"]["ort_fp32"]
    assert p["gops"] == pytest.approx(2 * 64**3 / (p["best_ms"] * 1e6))
    assert p["gops"] >= p["gops_median"] and p["best_ms"] <= p["p50_ms"]
    assert rows[("ort_int8", 1)]["peak"] == "ort_int8"
    assert rows[("tf", 1)]["peak"] in ("ort_fp32", "openvino_fp32")
    # Each row ran its own artifact: fp32 runtimes agree with Keras, reduced precisions less.
    for b in (1, 2):
        assert rows[("tf", b)]["max_abs_error_vs_keras"] < 1e-5
        assert rows[("ort_fp32", b)]["max_abs_error_vs_keras"] < 1e-4
        assert rows[("openvino_fp32", b)]["max_abs_error_vs_keras"] < 1e-4
        assert rows[("ort_fp16", b)]["max_abs_error_vs_keras"] < 1e-1
        assert rows[("ort_int8", b)]["argmax_agreement"] >= 0.5
    sizes = {r["runtime"]: r.get("size_bytes") for r in payload["rows"] if r["batch"] == 1}
    assert sizes["ort_fp16"] < 0.75 * sizes["ort_fp32"]
    assert sizes["ort_int8"] == sizes["openvino_int8"]  # one QDQ file, two runtimes
    if has_nncf:
        # The NNCF row ran its own int8 IR (its own size: of this tiny model, the XML graph
        # outweighs the weights), every convolution in u8, and agrees with Keras.
        assert sizes["openvino_int8_nncf"] not in (None, sizes["openvino_fp32"])
        info = payload["openvino_int8"]["openvino_int8_nncf"]
        assert info["convolutions"] == payload["openvino_int8"]["openvino_int8"]["convolutions"]
        assert list(info["convolutions"]) == ["u8"] and info["convolutions"]["u8"] > 0
        # The settings NNCF recorded in the file that ran: all 4 calibration images, defaults.
        assert info["nncf"]["subset_size"] == 4 and info["nncf"]["preset"] == "mixed"
        assert info["nncf"]["fast_bias_correction"] is True
        assert payload["machine"]["nncf"] == info["nncf"]["nncf_version"]
        for b in (1, 2):
            nncf_row = rows[("openvino_int8_nncf", b)]
            assert nncf_row["peak"] == "ort_int8" and nncf_row["artifact"] == "openvino_int8_nncf"
            assert nncf_row["argmax_agreement"] >= 0.5
            assert nncf_row["max_abs_error_vs_keras"] > 1e-4  # quantized, not the fp32 graph
    else:
        assert "pip install 'dlmodels[openvino]'" in rows[("openvino_int8_nncf", 1)]["skipped"]
        assert "openvino_int8_nncf" not in payload["openvino_int8"]
    assert len(payload["load_average_before"]) == 3 and len(payload["load_average_after"]) == 3
    assert payload["threads"]["runtimes"] == 1
    # OpenVINO ran models compiled for each timed batch (static shapes), the others any batch.
    assert payload["openvino_batch"] == "static"
    # Compiled once per batch (no dynamic compile thrown away), and the batch-1 models freed
    # before the batch-2 ones are compiled: one batch's models in memory at a time.
    per_batch = sum(
        k.startswith("openvino_") and b == 1 and "skipped" not in r for (k, b), r in rows.items()
    )
    assert openvino_compiles == [(1, 0)] * per_batch + [(2, 0)] * per_batch
    for (key, batch), r in rows.items():
        if "skipped" not in r:
            assert r["compiled_batch"] == (batch if key.startswith("openvino_") else None), key
    assert np.isfinite(payload["params"])
    # The int8 file's coverage: every conv of the tiny U-Net quantized.
    cov = payload["int8_quantization"]["coverage"]
    assert cov["compute_total"] > 0 and cov["compute_share_int8"] == 1.0
    # Profiles: onnxruntime ran one int8 conv kernel per conv of the graph, and the fp32 graph
    # the same number of (float) conv kernels; the side-by-side table adds up to each total.
    for b in (1, 2):
        prof = payload["profiles"][f"batch_{b}"]
        assert prof["ort_int8"]["by_op_type"]["QLinearConv"]["nodes"] == cov["compute_total"]
        fp32_convs = sum(
            v["nodes"]
            for k, v in prof["ort_fp32"]["by_op_type"].items()
            if k in ("Conv", "FusedConv", "NchwcConv")
        )
        assert fp32_convs == cov["compute_total"]
        assert "Conv" not in prof["ort_int8"]["by_op_type"]  # no conv left in float
        for key in ("fp32", "int8"):
            total = prof[f"ort_{key}"]["kernel_ms_per_call"]
            assert sum(r[f"{key}_ms"] for r in prof["by_op"]) == pytest.approx(total)
        conv = next(r for r in prof["by_op"] if r["op"] == "Conv")
        assert conv["int8_kernels"] == ["QLinearConv"]


def test_profile_counts_only_the_profiled_calls_and_lines_ops_up(tmp_path):
    """One MatMul node: one op type, one node, all the kernel time. 20 warm-up calls precede 2
    profiled ones: were they counted, the kernel time per call would exceed the wall time."""
    path = tmp_path / "mm.onnx"
    bench._matmul_onnx(path, 128, "fp32")
    x = np.random.default_rng(0).standard_normal((128, 128)).astype(np.float32)
    prof = bench.profile_ort(path, x, threads=1, iters=2, warmup=20)
    assert list(prof["by_op_type"]) == ["MatMul"]
    mm = prof["by_op_type"]["MatMul"]
    assert mm["nodes"] == 1 and mm["share"] == 1.0
    assert mm["ms_per_call"] == prof["kernel_ms_per_call"]
    assert 0 < prof["kernel_ms_per_call"] <= prof["wall_ms_per_call"]
    with pytest.raises(ValueError, match="optimization must be one of"):
        bench.profile_ort(path, x, optimization="max")

    # compare_profiles lines kernels up by the ONNX op they implement.
    def prof(**ms):
        return {"by_op_type": {k: {"ms_per_call": v} for k, v in ms.items()}}

    rows = bench.compare_profiles(
        prof(Conv=6.0, NchwcConv=3.0, Upsample=1.0, ReorderOutput=0.5),
        prof(QLinearConv=2.0, Resize=1.5, QuantizeLinear=0.3, DequantizeLinear=0.2),
    )
    by_op = {r["op"]: r for r in rows}
    assert [r["op"] for r in rows] == [
        "Conv", "Resize", "Quantize / Dequantize", "layout (NCHWc reorder)"
    ]  # fmt: skip
    assert (by_op["Conv"]["fp32_ms"], by_op["Conv"]["int8_ms"]) == (9.0, 2.0)
    assert by_op["Conv"]["speedup"] == 4.5 and by_op["Resize"]["speedup"] == pytest.approx(1 / 1.5)
    assert by_op["Quantize / Dequantize"]["speedup"] is None
    assert by_op["Quantize / Dequantize"]["int8_kernels"] == ["QuantizeLinear", "DequantizeLinear"]
    assert sum(r["int8_share"] for r in rows) == pytest.approx(1.0)
    assert by_op["Conv"]["int8_share"] == pytest.approx(2.0 / 4.0)


def test_peak_graphs_compute_a_matmul(tmp_path):
    """The peak graphs compute x @ W: checked against numpy, so the GOP/s count real work."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    for kind in ("fp32", "int8"):
        path = tmp_path / f"{kind}.onnx"
        bench._matmul_onnx(path, 16, kind)
        w = numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])
        rng = np.random.default_rng(0)
        if kind == "int8":
            x = rng.integers(0, 256, (16, 16), dtype=np.uint8)
            want = x.astype(np.int64) @ w.astype(np.int64)
        else:
            x = rng.standard_normal((16, 16)).astype(np.float32)
            want = x @ w
        (got,) = ort.InferenceSession(str(path)).run(None, {"x": x})
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_resolve_model_loads_dlmodels_layers_in_a_fresh_process(tmp_path):
    """A .keras file with dlmodels layers (what `dlmodels train` saves) loads in a process that
    imported nothing but the benchmark: resolve_model registers the dlmodels classes."""
    import subprocess
    import sys

    import keras

    from dlmodels.layers.conv import ConvNormAct

    inp = keras.Input((8, 8, 3), name="image")
    path = tmp_path / "cna.keras"
    keras.Model(inp, ConvNormAct(4)(inp), name="cna").save(path)
    code = (
        f"from dlmodels.bench import export; m, kw, name, w = export.resolve_model({str(path)!r}); "
        f"print(type(m.layers[1]).__name__, name, kw['file'] == {str(path)!r})"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ConvNormAct", "cna", "True"]


def test_resolve_model_refuses_what_it_cannot_benchmark(tmp_path):
    import keras

    inp = keras.Input((8, 8, 3), name="image")
    two = keras.Model(inp, [keras.layers.Conv2D(2, 1)(inp), keras.layers.Conv2D(3, 1)(inp)])
    with pytest.raises(ValueError, match=r"has 2 outputs; benchmark keras.Model\(model.inputs"):
        bench.resolve_model(two)
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"cannot load .*broken.keras as a Keras model"):
        bench.resolve_model(str(broken))


def test_bad_arguments():
    with pytest.raises(ValueError, match="choose one of"):
        bench.build_model("vgg16")
    with pytest.raises(ValueError, match="iters must be an int >= 1"):
        bench.run("unet", output=None, iters=0, verbose=False)
    with pytest.raises(ValueError, match="batches must be ints"):
        bench.run("unet", output=None, batches=(), verbose=False)
    with pytest.raises(ValueError, match="openvino_batch must be 'static' or 'dynamic'"):
        bench.run("unet", output=None, openvino_batch="fixed", verbose=False)


def test_accuracy_side_reports_every_runtime(tmp_path):
    out = tmp_path / "acc.json"
    payload = bench.accuracy(
        output=out,
        training={
            "image_size": (32, 32),
            "epochs": 1,
            "train_samples": 32,
            "model_kwargs": {"depth": 2, "base_filters": 4, "upsampling": "bilinear"},
        },
        test_samples=8,
        calibration_samples=8,
        threads=1,
        verbose=False,
    )
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(payload["rows"]))
    rows = {r["runtime"]: r for r in payload["rows"]}
    assert list(rows) == [k for k, _, _ in bench.RUNTIMES]
    keras_miou = payload["keras_miou"]
    assert 0.0 <= keras_miou <= 1.0
    assert rows["tf"]["miou"] == keras_miou and rows["tf"]["max_abs_error_vs_keras"] < 1e-5
    for key in ("ort_fp32", "openvino_fp32"):
        assert rows[key]["max_abs_error_vs_keras"] < 1e-4
        assert rows[key]["miou"] == pytest.approx(keras_miou, abs=1e-3)
    if bench._nncf_version() is not None:
        # The NNCF IR was calibrated on the train split and scored like every row.
        nncf = rows["openvino_int8_nncf"]
        # Measured on this config: 98.0% agreement, 0.11 points drop.
        assert nncf["argmax_agreement"] >= 0.9 and abs(nncf["miou_drop_points"]) <= 2
        assert rows["openvino_int8_nncf"]["max_abs_error_vs_keras"] > 1e-4
        assert payload["openvino_int8"]["openvino_int8_nncf"]["nncf"]["subset_size"] == 8
    for r in rows.values():
        if "skipped" not in r:
            assert r["miou_drop_points"] == pytest.approx(100 * (keras_miou - r["miou"]))

"""The CLI and the end-to-end slice: train -> export -> verify -> benchmark."""

import json

import pytest
from typer.testing import CliRunner

from dlmodels import demo
from dlmodels.cli import app

runner = CliRunner()


def test_models_lists_registry():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    assert "unet" in result.output
    assert "Ronneberger" in result.output


def test_bad_image_size_is_rejected_before_work():
    result = runner.invoke(app, ["demo", "--image-size", "96x"])
    assert result.exit_code != 0
    assert "--image-size" in result.output


def test_export_missing_model_path(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path / "nope.keras")])
    assert result.exit_code != 0
    assert "does not exist" in result.output


def test_small_end_to_end_slice(tmp_path):
    """A tiny run of the demo pipeline: every artifact written, verified and timed."""
    results = demo.run_demo(
        output_dir=tmp_path, image_size=(32, 32), epochs=1, train_samples=64, seed=3
    )
    rows = {r["artifact"]: r for r in results["rows"]}
    assert set(rows) == {"keras (TF)", "SavedModel", "ONNX fp32", "ONNX int8"}
    assert rows["SavedModel"]["max_abs_error"] <= 1e-4
    assert rows["ONNX fp32"]["max_abs_error"] <= 1e-4
    assert abs(rows["ONNX fp32"]["miou"] - rows["keras (TF)"]["miou"]) < 1e-3
    for name in ("model.keras", "model.onnx", "model.int8.onnx", "manifest.json"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "saved_model" / "1" / "saved_model.pb").exists()
    assert rows["ONNX int8"]["size_bytes"] < rows["ONNX fp32"]["size_bytes"]
    saved = json.loads((tmp_path / "demo_results.json").read_text())
    assert saved["checks"]["ONNX max abs error <= 0.0001"] is True
    assert all(r["p50_ms"] > 0 for r in results["rows"])


@pytest.mark.slow
def test_full_demo_meets_the_bar(tmp_path):
    """`make demo`'s own configuration: mIoU >= 0.90 held out, parity, int8 within 1 point."""
    results = demo.run_demo(output_dir=tmp_path)
    checks = results["checks"]
    assert checks["test mIoU >= 0.90"], results["test_miou"]
    assert checks["ONNX max abs error <= 0.0001"]
    assert checks["int8 mIoU within 1 point of fp32"]


def test_train_then_export_commands(tmp_path):
    model_path = tmp_path / "m.keras"
    args = ["train", "--output", str(model_path), "--image-size", "32", "--epochs", "1"]
    args += ["--train-samples", "32", "--depth", "2", "--base-filters", "4", "--batch-size", "8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert model_path.exists() and "test mIoU" in result.output
    # A second train into the same path refuses to overwrite the first model.
    again = runner.invoke(app, args)
    assert again.exit_code != 0 and isinstance(again.exception, FileExistsError)
    out = tmp_path / "export"
    result = runner.invoke(
        app, ["export", str(model_path), "--output-dir", str(out), "--formats", "onnx,int8"]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert "ONNX int8" in result.output
    assert (out / "model.onnx").exists() and (out / "model.int8.onnx").exists()
    assert [a["format"] for a in manifest["artifacts"]] == ["onnx", "int8"]
    for artifact in manifest["artifacts"]:
        assert artifact["metric"]["name"] == "miou"
        assert 0.0 <= artifact["metric"]["keras"] <= 1.0  # the baseline before quantization
    assert manifest["artifacts"][0]["parity"]["max_abs_error_vs_keras"] <= 1e-4
    bad = runner.invoke(app, ["export", str(model_path), "--formats", "tflite"])
    assert bad.exit_code != 0 and "unknown formats" in bad.output


def test_bench_command_writes_json_with_machine_info(tmp_path):
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "--output", str(out), "--iters", "3"])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    rows = {r["artifact"]: r for r in payload["results"]}
    assert set(rows) == {"keras (TF)", "ONNX fp32", "ONNX int8"}
    assert rows["ONNX fp32"]["max_abs_error"] <= 1e-4
    assert rows["keras (TF)"]["speedup_vs_keras"] == 1.0
    assert all(r["p50_ms"] > 0 for r in rows.values())
    assert payload["machine"]["cores"] >= 1 and payload["machine"]["tensorflow"]

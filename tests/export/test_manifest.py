"""manifest.json: every promised field, sizes equal to the files on disk."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from dlmodels import export


def test_manifest_fields_and_sizes(model, onnx_file, int8_file, tmp_path):
    out = tmp_path / "artifacts"
    keras_path = export.to_keras(model, out / "model.keras")
    # Readers refuse artifacts outside the manifest's directory, so the writer does too.
    with pytest.raises(ValueError, match="outside"):
        export.write_manifest(out / "manifest.json", [{"format": "onnx", "path": onnx_file}])
    assert not (out / "manifest.json").exists()
    (out / "onnx").mkdir()
    onnx_file = Path(shutil.copy(onnx_file, out / "onnx" / "tiny.onnx"))
    int8_file = Path(shutil.copy(int8_file, out / "tiny.int8.onnx"))
    sm_path = export.to_saved_model(model, out / "saved_model" / "1")
    entries = [
        export.ArtifactEntry(format="keras", path=keras_path, metric_after=0.9),
        {"format": "saved_model", "path": sm_path, "max_abs_error": 0.0},
        export.ArtifactEntry(
            format="onnx",
            path=onnx_file,
            max_abs_error=1e-6,
            metric_before=0.9,
            metric_after=0.9,
            metric_name="miou",
        ),
        export.ArtifactEntry(
            format="int8",
            path=int8_file,
            max_abs_error=0.05,
            metric_before=0.9,
            metric_after=0.89,
            metric_name="miou",
            extra={"agreement": np.float32(0.98)},
        ),
    ]
    path = export.write_manifest(out / "manifest.json", entries, model=model)
    data = json.loads(path.read_text())
    assert data["manifest_version"] == 1 and data["created"].endswith("+00:00")
    assert data["source_model"]["name"] == "tiny"
    assert data["source_model"]["params"] == model.count_params()
    assert data["source_model"]["config"]["layers"][0]["name"] == "image"
    for tool in ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "dlmodels", "python"):
        assert data["tools"][tool], tool
    arts = {a["format"]: a for a in data["artifacts"]}
    assert arts["keras"]["path"] == "model.keras"
    assert arts["keras"]["size_bytes"] == os.path.getsize(keras_path)
    assert arts["onnx"]["size_bytes"] == os.path.getsize(onnx_file)
    assert arts["int8"]["size_bytes"] == os.path.getsize(int8_file)
    sm_size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(sm_path) for f in fs)
    assert arts["saved_model"]["size_bytes"] == sm_size
    # Relative paths resolve from the manifest's directory.
    assert (out / arts["onnx"]["path"]).resolve() == onnx_file.resolve()
    for fmt in ("onnx", "int8", "saved_model", "keras"):
        a = arts[fmt]
        assert [i["name"] for i in a["inputs"]] == ["image"], fmt
        assert [o["name"] for o in a["outputs"]] == ["logits"], fmt
        assert a["inputs"][0]["dtype"] == "float32"
    assert arts["onnx"]["inputs"][0]["shape"] == ["batch", 16, 16, 3]
    assert arts["saved_model"]["inputs"][0]["shape"] == [None, 16, 16, 3]
    assert arts["int8"]["parity"]["max_abs_error_vs_keras"] == 0.05
    assert arts["int8"]["metric"] == {"name": "miou", "keras": 0.9, "artifact": 0.89}
    assert abs(arts["int8"]["extra"]["agreement"] - 0.98) < 1e-6
    assert not [p for p in os.listdir(out) if ".tmp-" in p]
    # SHA-256: of the bytes for a file; for a directory, of its sorted "relpath sha256" lines.
    assert arts["onnx"]["sha256"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    assert arts["int8"]["sha256"] == hashlib.sha256(int8_file.read_bytes()).hexdigest()
    lines = sorted(
        f"{p.relative_to(sm_path).as_posix()} {hashlib.sha256(p.read_bytes()).hexdigest()}\n"
        for p in Path(sm_path).rglob("*")
        if p.is_file()
    )
    assert arts["saved_model"]["sha256"] == hashlib.sha256("".join(lines).encode()).hexdigest()
    # Any change to a file inside the SavedModel changes the directory digest.
    from dlmodels.export.manifest import artifact_sha256

    assert artifact_sha256(sm_path) == arts["saved_model"]["sha256"]
    (Path(sm_path) / "assets").mkdir(exist_ok=True)
    (Path(sm_path) / "assets" / "extra.txt").write_text("x")
    assert artifact_sha256(sm_path) != arts["saved_model"]["sha256"]


def test_manifest_from_demo_rows(model, onnx_file, int8_file, tmp_path):
    onnx_file = shutil.copy(onnx_file, tmp_path / "model.onnx")
    int8_file = shutil.copy(int8_file, tmp_path / "model.int8.onnx")
    rows = [
        {"artifact": "keras (TF)", "format": "keras", "path": None, "miou": 0.93},
        {
            "artifact": "ONNX fp32",
            "format": "onnx",
            "path": str(onnx_file),
            "size_bytes": 1,
            "max_abs_error": 2e-6,
            "miou": 0.93,
            "passed": True,
        },
        {
            "artifact": "ONNX int8",
            "format": "int8",
            "path": str(int8_file),
            "max_abs_error": 0.04,
            "miou": 0.925,
            "agreement": 0.99,
            "p50_ms": 1.5,
        },
    ]
    path = export.write_manifest(
        tmp_path / "manifest.json", model=model, artifacts=[r for r in rows if r["path"]]
    )
    arts = json.loads(path.read_text())["artifacts"]
    assert [a["format"] for a in arts] == ["onnx", "int8"]
    assert arts[0]["size_bytes"] == os.path.getsize(onnx_file)  # measured, not copied
    assert arts[1]["metric"] == {"name": "miou", "keras": None, "artifact": 0.925}
    assert arts[1]["extra"] == {"artifact": "ONNX int8", "agreement": 0.99, "p50_ms": 1.5}
    # With the keras row present its metric becomes the baseline.
    path = export.write_manifest(
        tmp_path / "manifest.json",
        model=model,
        artifacts=[*rows[1:], {**rows[0], "path": str(onnx_file)}],
    )
    arts = json.loads(path.read_text())["artifacts"]
    assert arts[1]["metric"]["keras"] == 0.93

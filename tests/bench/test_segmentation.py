import json

import pytest

from dlmodels.bench import segmentation
from dlmodels.bench.flops import count_macs


def test_segmentation_benchmark_writes_consistent_rows(tmp_path):
    out = tmp_path / "seg.json"
    payload = segmentation.run(
        ["unet"],
        output=out,
        epochs=1,
        training={"image_size": (32, 32), "train_samples": 64, "batch_size": 16},
        iters=2,
        verbose=False,
    )
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(payload["rows"]))
    (row,) = payload["rows"]
    import dlmodels.models as registry

    model = registry.get("unet", input_shape=(32, 32, 3), num_classes=4, **segmentation.ZOO["unet"])
    assert row["params"] == model.count_params()
    assert row["gmacs"] == pytest.approx(count_macs(model) / 1e9)
    assert 0.0 <= row["miou"] <= 1.0
    # The fp32 artifact is the trained model: same mIoU as Keras, parity within the export bar.
    assert row["onnx_fp32"]["miou"] == pytest.approx(row["miou"], abs=1e-3)
    assert row["onnx_fp32"]["max_abs_error"] < 1e-4
    assert row["onnx_int8"]["size_bytes"] < row["onnx_fp32"]["size_bytes"] / 2
    assert payload["machine"]["cores"] >= 1


def test_segmentation_benchmark_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown models"):
        segmentation.run(["segnet"], output=None, verbose=False)
    with pytest.raises(ValueError, match="unknown training settings"):
        segmentation.run(["unet"], output=None, training={"epoch": 1}, verbose=False)

"""The sequence benchmark runs end to end on tiny settings and reports what it promises."""

import json

from dlmodels.bench.sequence import run


def test_sequence_benchmark_smoke(tmp_path):
    out = tmp_path / "sequence.json"
    run(
        out,
        epochs=2,
        iters=2,
        rounds=1,
        batches=(1, 4),
        units=(4,),
        reference=False,
        lstm=False,
        extra_series=(),
    )
    result = json.loads(out.read_text())
    gru = result["models"]["gru_forecaster"]
    arts = gru["artifacts"]
    assert arts["onnx tf2onnx Loop"]["Loop"] >= 1 and "GRU" not in arts["onnx tf2onnx Loop"]
    assert arts["onnx native GRU"]["GRU"] == 1 and "Loop" not in arts["onnx native GRU"]
    assert arts["onnx native GRU"]["parity_passed_1e-4"]
    assert arts["onnx native GRU int8 dynamic"]["MatMulInteger"] >= 1
    assert set(gru["latency_ms"]) == {"batch_1", "batch_4"}
    assert gru["latency_ms"]["batch_1"]["native_speedup_vs_loop"] > 0
    assert result["baselines"]["seasonal_naive_mae"] > 0 and result["machine"]["cores"] >= 1
    assert "gru_beats_seasonal_naive_by" in result["summary"]

"""The sequence benchmark runs end to end on tiny settings and reports what it promises; the
recorded results hold the goals the README claims."""

import json
import math
from pathlib import Path

import pytest

from dlmodels.bench.sequence import GRU_INT8_NOTE, run

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "sequence.json"


def test_sequence_benchmark_smoke(tmp_path):
    out = tmp_path / "sequence.json"
    run(
        out,
        window=(11, 22),
        epochs=2,
        iters=2,
        rounds=1,
        batches=(1, 4),
        units=(4,),
        reference=False,
        lstm=False,
        extra_series=(),
        classifier=False,
    )
    result = json.loads(out.read_text())
    gru = result["models"]["gru_forecaster"]
    arts = gru["artifacts"]
    assert arts["onnx tf2onnx Loop"]["Loop"] >= 1 and "GRU" not in arts["onnx tf2onnx Loop"]
    assert arts["onnx native GRU"]["GRU"] == 1 and "Loop" not in arts["onnx native GRU"]
    assert arts["onnx native GRU"]["parity_passed_1e-4"]
    assert arts["onnx native GRU int8 dynamic"]["MatMulInteger"] >= 1
    assert set(gru["latency_ms"]) == {"batch_1", "batch_4"}
    for batch, row in gru["latency_ms"].items():
        want = row["onnx tf2onnx Loop"]["p50_ms"] / row["onnx native GRU"]["p50_ms"]
        assert math.isfinite(want) and row["native_speedup_vs_loop"] == pytest.approx(want), batch
    selection = result["data"]["selection"]
    assert set(selection["validation_mae_by_window"]) == {"11", "22"}
    best = min(selection["validation_mae_by_window"].items(), key=lambda kv: kv[1])
    assert selection["chosen_window"] == int(best[0]) == result["data"]["window"]
    assert result["baselines"]["seasonal_naive_mae"] > 0 and result["machine"]["cores"] >= 1
    assert "gru_beats_seasonal_naive_by" in result["summary"]
    assert result["summary"]["int8_dynamic"]["gru_forecaster (no-op: GRU stays fp32)"]["note"]


def test_recorded_results_meet_the_goals():
    """benchmarks/results/sequence.json (what the README quotes) meets the issue's goals and
    says honestly what int8 does and how the window was chosen."""
    result = json.loads(RESULTS.read_text())
    summary = result["summary"]
    assert summary["goal_20pct_met"] is True and summary["gru_beats_seasonal_naive_by"] >= 0.20
    assert summary["native_vs_loop_speedup_batch1"] >= 3.0
    assert summary["native_parity_max_abs_error"] <= 1e-4
    for model in result["models"].values():
        for name, art in model["artifacts"].items():
            if "int8" not in name:
                assert art["parity_passed_1e-4"], name
    int8 = summary["int8_dynamic"]
    assert next(iter(int8)).startswith("lstm_forecaster")  # the int8 section leads with LSTM
    lstm = int8["lstm_forecaster (DynamicQuantizeLSTM)"]
    assert lstm["quantized_ops"]["DynamicQuantizeLSTM"] >= 1
    assert int8["gru_forecaster (no-op: GRU stays fp32)"]["note"] == GRU_INT8_NOTE
    assert "validation" in result["data"]["selection"]["how"]
    accuracies = summary["masked_classifier_accuracy"].values()
    assert max(accuracies) < 1.0, "the synthetic task is too easy to show a metric drop"

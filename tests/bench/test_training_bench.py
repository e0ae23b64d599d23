"""The training throughput benchmark in a tiny config: measured numbers that agree with each
other, and proof that both timed paths (Trainer, model.fit) trained the same number of steps."""

import json
import statistics

import pytest

from dlmodels.bench import training

STEPS, REPEATS = 2, 2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "training.json"
    # conftest split the CPU into 2 logical devices, so "mirrored" has 2 replicas here.
    training.main(["--quick", "--out", str(out), "--steps", str(STEPS), "--repeats", str(REPEATS)])
    return json.loads(out.read_text())


def test_json_holds_consistent_measured_numbers(results):
    rows = results["results"]
    assert [(r["model"], r["strategy"], r["replicas"]) for r in rows] == [
        ("unet_tiny", "one_device", 1),
        ("unet_tiny", "mirrored", 2),
    ]
    for row in rows:
        assert len(row["trainer_epoch_seconds"]) == len(row["fit_epoch_seconds"]) == REPEATS
        # steps/s are recomputed here from the recorded epoch times (median), and the ratios
        # from those rates.
        for path in ("trainer", "fit"):
            rate = STEPS / statistics.median(row[f"{path}_epoch_seconds"])
            assert rate > 0
            assert row[f"{path}_steps_per_s"] == pytest.approx(rate, rel=1e-12)
            assert row[f"{path}_images_per_s"] == pytest.approx(rate * 8, rel=1e-12)
            cpu = statistics.median(row[f"{path}_epoch_cpu_seconds"]) / STEPS
            assert cpu > 0
            assert row[f"{path}_cpu_seconds_per_step"] == pytest.approx(cpu, rel=1e-12)
        assert row["ratio"] == pytest.approx(
            row["trainer_steps_per_s"] / row["fit_steps_per_s"], rel=1e-12
        )
        assert row["ratio_best"] == pytest.approx(
            min(row["fit_epoch_seconds"]) / min(row["trainer_epoch_seconds"]), rel=1e-12
        )
        assert row["cpu_ratio"] == pytest.approx(
            row["fit_cpu_seconds_per_step"] / row["trainer_cpu_seconds_per_step"], rel=1e-12
        )
        # Both paths trained, and the same number of optimizer steps: warm-up + timed epochs.
        assert row["trainer_optimizer_steps"] == row["fit_optimizer_steps"] == 3 * STEPS
        assert row["trainer_weights_moved"] > 1e-4 and row["fit_weights_moved"] > 1e-4
    assert rows[1]["trainer_sync_batch_norm"] and not rows[0]["trainer_sync_batch_norm"]
    machine = results["machine"]
    assert machine["cpu"] and machine["tensorflow"] and machine["keras"]
    assert results["settings"] == {"steps_per_epoch": STEPS, "repeats": REPEATS, "warmup_epochs": 1}
    gpu = results["gpu"]
    if not gpu["available"]:
        assert gpu["images_per_s"] is None and "no GPU" in gpu["reason"]


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match=r"\['nope'\] unknown; choose from \['unet_tiny'\]"):
        training.run(["nope"], quick=True, output=None)

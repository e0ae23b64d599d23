"""The training throughput benchmark in a tiny config: steady-state epochs timed inside each
call (the first epoch of every call left out), numbers that agree with each other, and proof
that both timed paths (Trainer, model.fit) trained the same number of steps."""

import json
import statistics

import pytest

from dlmodels.bench import training

STEPS, REPEATS, EPOCHS_PER_ROUND = 2, 2, 3  # EPOCHS_PER_ROUND: main's default


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "training.json"
    # conftest split the CPU into 2 logical devices, so "mirrored" has 2 replicas here.
    training.main(["--quick", "--out", str(out), "--steps", str(STEPS), "--repeats", str(REPEATS)])
    return json.loads(out.read_text())


def test_epoch_clock_splits_a_call_by_hand():
    """Fake clocks (wall, cpu) read in order: call start, begin/end of 3 epochs, call end."""
    wall = iter([10.0, 10.5, 12.0, 12.25, 13.0, 13.5, 16.0, 19.0])
    cpu = iter([1.0, 1.25, 2.0, 2.25, 3.5, 3.75, 4.0, 4.25])
    clock = training.EpochClock(clocks=(wall.__next__, cpu.__next__))
    clock.call_started()
    for epoch in range(3):
        clock.on_epoch_begin(epoch)
        clock.on_epoch_end(epoch, {"loss": 1.0})
    clock.call_ended()
    s = clock.summary()
    assert s["first_epoch"] == (2.0, 1.0)  # call start -> end of epoch 1
    assert s["epochs"] == [(1.0, 1.5), (3.0, 0.5)]  # end of epoch k-1 -> end of epoch k
    assert s["begin_to_end"] == [(0.75, 1.25), (2.5, 0.25)]  # Keras' begin -> end, epochs 2, 3
    assert s["after_last_epoch"] == (3.0, 0.25)
    assert s["call"] == (9.0, 3.25)
    # A Trainer records no begins: no begin_to_end, the rest the same.
    wall = iter([0.0, 1.0, 3.0, 4.0])
    clock = training.EpochClock(clocks=(wall.__next__,))
    clock.call_started()
    clock.on_epoch_end(0)
    clock.on_epoch_end(1)
    clock.call_ended()
    s = clock.summary()
    assert (s["first_epoch"], s["epochs"], s["begin_to_end"]) == ((1.0,), [(2.0,)], [])
    with pytest.raises(RuntimeError, match="no complete call"):
        training.EpochClock().summary()


def test_json_holds_consistent_measured_numbers(results):
    rows = results["results"]
    assert [(r["model"], r["strategy"], r["replicas"]) for r in rows] == [
        ("unet_tiny", "one_device", 1),
        ("unet_tiny", "mirrored", 2),
        ("unet_tiny", "mirrored", 2),  # the Trainer without SyncBN: the work fit does
        ("unet_tiny", "mirrored", 2),  # both synchronised: fit with Keras' synchronized=True
    ]
    steady = EPOCHS_PER_ROUND - 1
    for row in rows:
        assert row["epochs_per_round"] == EPOCHS_PER_ROUND
        assert row["timed_epochs_per_path"] == REPEATS * steady
        for path in ("trainer", "fit"):
            # Every call ran EPOCHS_PER_ROUND epochs; its first one is recorded apart, the
            # other ones are the timed epochs.
            assert len(row[f"{path}_epoch_seconds"]) == REPEATS * steady
            assert len(row[f"{path}_epoch_cpu_seconds"]) == REPEATS * steady
            for key in ("first_epoch", "after_last_epoch", "call"):
                assert len(row[f"{path}_{key}_seconds"]) == REPEATS
                assert len(row[f"{path}_{key}_cpu_seconds"]) == REPEATS
            # The spans partition each call: first epoch + timed epochs + after the last
            # epoch = the whole call (wall and CPU), so no timed epoch holds the first one.
            for unit in ("", "_cpu"):
                epochs = row[f"{path}_epoch{unit}_seconds"]
                for r in range(REPEATS):
                    parts = (
                        row[f"{path}_first_epoch{unit}_seconds"][r]
                        + sum(epochs[r * steady : (r + 1) * steady])
                        + row[f"{path}_after_last_epoch{unit}_seconds"][r]
                    )
                    assert parts == pytest.approx(row[f"{path}_call{unit}_seconds"][r], abs=1e-9)
                    assert min(epochs) > 0
            # steps/s are recomputed here from the recorded epoch times (median), and the
            # ratios from those rates.
            rate = STEPS / statistics.median(row[f"{path}_epoch_seconds"])
            assert row[f"{path}_steps_per_s"] == pytest.approx(rate, rel=1e-12)
            assert row[f"{path}_images_per_s"] == pytest.approx(rate * 8, rel=1e-12)
            cpu = statistics.median(row[f"{path}_epoch_cpu_seconds"]) / STEPS
            assert row[f"{path}_cpu_seconds_per_step"] == pytest.approx(cpu, rel=1e-12)
        # The libraries' own narrower spans lie inside ours, epoch by epoch: Keras'
        # on_epoch_begin -> on_epoch_end, the Trainer's history["seconds"].
        for narrow, path in (
            ("fit_begin_to_end_epoch_seconds", "fit"),
            ("trainer_reported_epoch_seconds", "trainer"),
        ):
            assert len(row[narrow]) == REPEATS * steady
            for inner, outer in zip(row[narrow], row[f"{path}_epoch_seconds"], strict=True):
                assert 0 < inner <= outer
        assert row["ratio"] == pytest.approx(
            row["trainer_steps_per_s"] / row["fit_steps_per_s"], rel=1e-12
        )
        assert row["ratio_best"] == pytest.approx(
            min(row["fit_epoch_seconds"]) / min(row["trainer_epoch_seconds"]), rel=1e-12
        )
        assert row["cpu_ratio"] == pytest.approx(
            row["fit_cpu_seconds_per_step"] / row["trainer_cpu_seconds_per_step"], rel=1e-12
        )
        assert row["call_ratio"] == pytest.approx(
            statistics.median(row["fit_call_seconds"])
            / statistics.median(row["trainer_call_seconds"]),
            rel=1e-12,
        )
        # Both paths trained, and the same number of optimizer steps: one warm-up epoch, then
        # REPEATS calls of EPOCHS_PER_ROUND epochs of STEPS steps.
        expected = (1 + REPEATS * EPOCHS_PER_ROUND) * STEPS
        assert row["expected_optimizer_steps"] == expected == 14
        assert row["trainer_optimizer_steps"] == row["fit_optimizer_steps"] == expected
        assert row["trainer_weights_moved"] > 1e-4 and row["fit_weights_moved"] > 1e-4
    assert [r["trainer_sync_batch_norm"] for r in rows] == [False, True, False, True]
    assert [r["fit_sync_batch_norm"] for r in rows] == [False, False, False, True]
    # The tiny U-Net's 10 BatchNorms, switched to Keras' cross-replica moments in the last row.
    assert [r["fit_synchronized_layers"] for r in rows] == [0, 0, 0, 10]
    # Same start, data and optimizer: the same maths trains the same weights. Per-replica
    # moments on both sides run the same ops (bit-identical here); both synchronised differ
    # only by rounding (two-pass vs E[x^2] - E[x]^2 moments, amplified by Adam's first steps);
    # synchronised against per-replica moments is a different model update.
    one, sync_vs_plain, plain, both_sync = (r["weights_max_abs_diff"] for r in rows)
    assert one < 1e-6 and plain < 1e-6
    assert both_sync < sync_vs_plain / 10
    machine = results["machine"]
    assert machine["cpu"] and machine["tensorflow"] and machine["keras"]
    assert results["settings"] == {
        "steps_per_epoch": STEPS,
        "repeats": REPEATS,
        "epochs_per_round": EPOCHS_PER_ROUND,
        "warmup_epochs": 1,
        "sync_batch_norm": "all",
        "steps_per_execution": 1,
        "precision": "float32",
    }
    # float32 by default: every convolution of both copies computes in float32.
    for r in rows:
        assert r["precision"] == "float32"
        assert list(r["trainer_compute_dtypes"]) == ["float32"]
        assert r["fit_compute_dtypes"] == r["trainer_compute_dtypes"]
    # The default: one step per tf.function call on both sides, read back from each.
    assert {(r["trainer_steps_per_execution"], r["fit_steps_per_execution"]) for r in rows} == {
        (1, 1)
    }
    gpu = results["gpu"]
    if not gpu["available"]:
        assert gpu["images_per_s"] is None and "no GPU" in gpu["reason"]


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match=r"\['nope'\] unknown; choose from \['unet_tiny'\]"):
        training.run(["nope"], quick=True, output=None)


def test_sync_batch_norm_choice_is_checked():
    with pytest.raises(ValueError, match="`sync_batch_norm`='maybe'; choose one of on, off, keras"):
        training.run(quick=True, output=None, sync_batch_norm="maybe")


def test_a_round_needs_a_steady_epoch():
    import tensorflow as tf

    spec = training.QUICK_MODELS["unet_tiny"]
    strategy = tf.distribute.get_strategy()
    with pytest.raises(ValueError, match=r"`epochs_per_round`=1 must be an int >= 2"):
        training.measure(spec, strategy, steps=2, repeats=1, epochs_per_round=1)


def test_synchronize_batch_norm_gives_fit_the_global_batch_moments():
    """The "keras" pairing's claim, against an independent reference: `fit` under
    MirroredStrategy (2 logical CPUs, 4 images each) with Keras' `synchronized=True` takes the
    step one device takes on the whole batch of 8 (whose plain BatchNorm sees all 8 images), down
    to float32 rounding; with per-replica moments it does not. Plain SGD, so the update is linear
    in the gradient (Adam's first steps would turn rounding into +-lr sign flips)."""
    import keras
    import numpy as np
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    spec = training.QUICK_MODELS["unet_tiny"]
    ds = training.synthetic_dataset(spec, 2, seed=0)
    mirrored = tf.distribute.MirroredStrategy(training.mirrored_devices())
    assert mirrored.num_replicas_in_sync == 2
    initial = None

    def fit(strategy, sync):
        nonlocal initial
        with strategy.scope():
            model, _, loss = training._build(spec)
            initial = model.get_weights() if initial is None else initial
            model.set_weights(initial)
            switched = training.synchronize_batch_norm(model) if sync else 0
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
        model.fit(ds, epochs=1, steps_per_epoch=2, verbose=0, shuffle=False)
        return model, switched

    one, _ = fit(tf.distribute.get_strategy(), False)
    synced, switched = fit(mirrored, True)
    plain, _ = fit(mirrored, False)
    # One moving mean per BatchNormalization (they sit inside the U-Net's conv blocks).
    assert switched == sum(v.path.endswith("moving_mean") for v in one.weights) == 10

    def diff(a, b):  # every weight, moving statistics included
        return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))

    reference = one.get_weights()
    assert diff(reference, initial) > 1e-2  # one device trained
    assert diff(synced.get_weights(), reference) < 1e-5  # measured 4.8e-7
    # Per-replica moments: another update (measured 2.3e-2).
    assert diff(plain.get_weights(), reference) > 1e-3


@pytest.fixture
def trainer_calls(monkeypatch):
    """Every call of each Trainer's compiled multi-step function, as the number of steps asked
    of it (`n`); one list per Trainer, in the order they were built."""
    from dlmodels.training.trainer import Trainer

    build = Trainer._build_multi_fn
    calls = []

    def counting(self):
        fn, mine = build(self), []
        calls.append(mine)

        def counted(iterator, n):
            mine.append(int(n))
            return fn(iterator, n)

        return counted

    monkeypatch.setattr(Trainer, "_build_multi_fn", counting)
    return calls


def test_steps_per_execution_runs_fewer_calls_and_the_same_steps(tmp_path, trainer_calls):
    """--steps-per-execution 2, 4 steps per epoch: the Trainer makes half the function calls
    (2 steps each) under both strategies; fit gets 2 on one device only; both still train the
    same optimizer steps, and on one device the same weights (fit with 2 steps per call runs
    the same ops)."""
    out = tmp_path / "training.json"
    training.main(
        [
            *("--quick", "--out", str(out), "--steps", "4", "--repeats", "1"),
            *("--epochs-per-round", "2", "--sync-batch-norm", "off", "--steps-per-execution", "2"),
        ]
    )
    results = json.loads(out.read_text())
    rows = results["results"]
    assert [r["strategy"] for r in rows] == ["one_device", "mirrored"]
    assert [r["trainer_steps_per_execution"] for r in rows] == [2, 2]
    # Keras' fit breaks under MirroredStrategy with more than one step per call: it keeps 1.
    assert [r["fit_steps_per_execution"] for r in rows] == [2, 1]
    assert results["settings"]["steps_per_execution"] == 2
    assert results["command"].endswith("--quick --steps-per-execution 2")
    # One warm-up epoch + 1 round of 2 epochs, 4 steps each: 12 steps in 6 calls of 2 (with
    # --steps-per-execution 1: 12 calls of 1).
    assert trainer_calls == [[2] * 6, [2] * 6]
    for row in rows:
        assert row["expected_optimizer_steps"] == 12
        assert row["trainer_optimizer_steps"] == row["fit_optimizer_steps"] == 12
        assert len(row["trainer_epoch_seconds"]) == len(row["fit_epoch_seconds"]) == 1
    assert rows[0]["weights_max_abs_diff"] < 1e-6


def test_steps_per_execution_not_dividing_an_epoch(trainer_calls):
    """Under MirroredStrategy only the Trainer gets N, and it ends each epoch with a shorter
    call: 3 steps per epoch with N=2 are calls of 2 + 1, so the epoch clock still ticks every
    3 steps and the optimizer step count is right."""

    spec = training.QUICK_MODELS["unet_tiny"]
    mirrored = training._strategy("mirrored")[0]  # own collective keys
    row = training.measure(
        spec,
        mirrored,
        steps=3,
        repeats=1,
        epochs_per_round=2,
        steps_per_execution=2,
        sync_batch_norm=False,
    )
    assert trainer_calls == [[2, 1] * 3]  # warm-up epoch + 2 epochs
    assert (row["trainer_steps_per_execution"], row["fit_steps_per_execution"]) == (2, 1)
    assert row["trainer_optimizer_steps"] == row["fit_optimizer_steps"] == 9
    assert len(row["trainer_epoch_seconds"]) == 1


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "4"])
def test_steps_per_execution_must_be_a_positive_int(bad):
    with pytest.raises(
        ValueError,
        match=rf"`steps_per_execution` must be a positive integer "
        rf"\(>= 1\), got {bad!r}",
    ):
        training.run(quick=True, output=None, steps_per_execution=bad)


def test_steps_per_execution_must_divide_the_epoch_where_fit_gets_it():
    """On a repeated dataset Keras' fit runs whole executions: 10 steps with N=4 would be 12."""
    import tensorflow as tf

    with pytest.raises(
        ValueError,
        match=r"`steps_per_execution`=4 must divide `steps`=10 "
        r"where `fit` gets it too \(one device\): Keras would run 12 steps",
    ):
        training.run(quick=True, output=None, steps=10, steps_per_execution=4)
    # Under MirroredStrategy fit keeps 1 and the Trainer handles any N.
    mirrored = training._strategy("mirrored")[0]  # own collective keys
    assert training._check_fit_steps_per_execution(4, 10, mirrored, owner="x") == 1
    assert (
        training._check_fit_steps_per_execution(5, 10, tf.distribute.get_strategy(), owner="x") == 5
    )


def test_keras_fit_under_mirrored_breaks_with_steps_per_execution():
    """Why fit keeps 1 under MirroredStrategy (Keras 3.15): its first call fails. If a Keras
    upgrade makes this pass, let `fit_supports_steps_per_execution` give fit N there too."""
    import tensorflow as tf

    spec = training.QUICK_MODELS["unet_tiny"]
    mirrored = training._strategy("mirrored")[0]  # own collective keys
    assert not training.fit_supports_steps_per_execution(mirrored)
    assert training.fit_supports_steps_per_execution(tf.distribute.get_strategy())
    with mirrored.scope():
        model, optimizer, loss = training._build(spec)
        model.compile(optimizer=optimizer, loss=loss, steps_per_execution=2)
    ds = training.synthetic_dataset(spec, 2)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="You must feed a value for placeholder"
    ):
        model.fit(ds, epochs=1, steps_per_epoch=2, verbose=0, shuffle=False)


def test_precision_builds_both_copies_under_the_policy(tmp_path):
    """--precision float32 mixed_bfloat16: one row per policy; in each, the Trainer's and fit's
    copies compute their convolutions in that policy's dtype (read back from the layers) and
    train the same steps; the global policy is float32 again afterwards."""
    import keras

    out = tmp_path / "precision.json"
    training.main(
        ["--quick", "--strategies", "one_device", "--steps", "2", "--repeats", "1",
         "--epochs-per-round", "2", "--precision", "float32", "mixed_bfloat16", "--out", str(out)]
    )  # fmt: skip
    payload = json.loads(out.read_text())
    rows = payload["results"]
    assert [r["precision"] for r in rows] == ["float32", "mixed_bfloat16"]
    assert payload["settings"]["precision"] == ["float32", "mixed_bfloat16"]
    assert payload["command"].endswith("--precision float32 mixed_bfloat16")
    for row, dtype in zip(rows, ("float32", "bfloat16"), strict=True):
        convs = row["trainer_compute_dtypes"]
        assert list(convs) == [dtype] and convs[dtype] > 0
        assert row["fit_compute_dtypes"] == convs
        assert row["trainer_optimizer_steps"] == row["fit_optimizer_steps"] == (1 + 1 * 2) * 2
        assert row["trainer_weights_moved"] > 0 and row["fit_weights_moved"] > 0
    assert keras.config.dtype_policy().name == "float32"
    with pytest.raises(ValueError, match=r"`precision`='float16'; choose one of"):
        training.run(quick=True, output=None, precision="float16")

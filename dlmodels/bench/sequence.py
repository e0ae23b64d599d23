"""Sequence benchmark: a recurrent forecaster on a statsmodels series against the seasonal-naive
baseline, and onnxruntime latency of the native-GRU export vs tf2onnx's Loop export vs dynamic
int8, all measured side by side in one run.

    python -m dlmodels.bench.sequence            # writes benchmarks/results/sequence.json

What is measured:

- accuracy: a GRU and an LSTM `SequenceForecaster` trained on the series (train part, early
  stopping on the validation part), one-step-ahead MAE on the held-out tail in the series' units,
  against the seasonal-naive forecast (the value one season earlier) and the naive forecast
  (the last value);
- export: the GRU forecaster as native ONNX GRU (`to_onnx_native_rnn`) and as tf2onnx's Loop
  (`to_onnx`), parity of each against Keras in a fresh onnxruntime process, op counts;
- latency (median of interleaved rounds, `compare_predictors`) at batch 1 and 32 of Keras
  (tf.function), ONNX Loop, ONNX native and ONNX native + dynamic int8, for the trained
  forecaster and for a larger reference GRU (50 steps, 32 features, 128 units, untrained);
- int8: led by the LSTM forecaster (DynamicQuantizeLSTM: test MAE and latency, int8 vs fp32).
  For GRU models dynamic int8 is a no-op for the recurrence (onnxruntime quantizes MatMul /
  Gemm / LSTM only; GRU nodes stay fp32, only the Dense head is int8), and the JSON says so;
- the forecaster's input window is chosen on the validation split (`WINDOW_CANDIDATES`), never
  on the test tail; units are fixed in advance;
- a masked bidirectional GRU classifier on the synthetic variable-length sequences: accuracy
  and latency of Keras, Loop, native and native + int8 (the mask-compaction path);
- accuracy only on further series ("co2" by default).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path("benchmarks/results/sequence.json")
CLASSIFIER_NOISE = 1.5
CLASSIFIER_MIN_LENGTH = 8
WINDOW_CANDIDATES = (11, 22, 33)
"""Input windows tried for the sunspots forecaster (1, 2 and 3 cycles of the 11-year season);
the one with the lowest validation MAE is kept. The test tail is not looked at to choose."""


def _mae(pred, target) -> float:
    return float(np.mean(np.abs(np.asarray(pred, np.float64) - np.asarray(target, np.float64))))


def _train_forecaster(data, cell, units, epochs, seed):
    import keras

    from dlmodels.models import SequenceForecaster

    keras.utils.set_random_seed(seed)
    model = SequenceForecaster(
        (data.window, data.series.shape[1]),
        data.horizon,
        cell=cell,
        units=units,
        name=f"{data.name}_{cell}_forecaster",
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    stop = keras.callbacks.EarlyStopping(patience=15, restore_best_weights=True)
    history = model.fit(
        data.train_dataset(batch_size=16, seed=seed),
        validation_data=data.val_dataset(),
        epochs=epochs,
        callbacks=[stop],
        shuffle=False,  # the dataset shuffles itself
        verbose=0,
    )
    return model, len(history.history["loss"])


def _latency_rows(model, paths: dict, batches, iters, rounds, seed=0, sample=None):
    from dlmodels.bench.harness import compare_predictors, keras_predictor, ort_predictor

    shape = tuple(model.inputs[0].shape[1:])
    rows = {}
    predictors = {"keras (TF)": keras_predictor(model)}
    predictors.update({name: ort_predictor(p) for name, p in paths.items()})
    rng = np.random.default_rng(seed)
    for batch in batches:
        if sample is None:
            x = rng.normal(size=(batch, *shape)).astype(np.float32)
        else:  # real rows (e.g. padded sequences), repeated up to the batch size
            x = np.ascontiguousarray(np.resize(sample, (batch, *sample.shape[1:])))
        timings = compare_predictors(predictors, x, warmup=5, iters=iters, rounds=rounds)
        rows[f"batch_{batch}"] = {name: t for name, t in timings.items()}
        loop = timings.get("onnx tf2onnx Loop", {}).get("p50_ms")
        native = timings.get("onnx native GRU", {}).get("p50_ms")
        if loop and native:
            rows[f"batch_{batch}"]["native_speedup_vs_loop"] = loop / native
    return rows


def _export_all(model, tmp: Path, tag: str, calibration=None):
    """native / loop / int8 files for a GRU model (native LSTM for an LSTM model)."""
    from dlmodels import export
    from dlmodels.export.onnx_rnn import op_counts, to_onnx_native_rnn

    paths = {
        "onnx tf2onnx Loop": export.to_onnx(model, tmp / f"{tag}_tf2onnx.onnx", native_rnn=False),
        "onnx native GRU": to_onnx_native_rnn(model, tmp / f"{tag}_native.onnx"),
    }
    paths["onnx native GRU int8 dynamic"] = export.quantize(
        paths["onnx native GRU"], tmp / f"{tag}_native_int8.onnx", mode="dynamic"
    )
    ops = {}
    for name, p in paths.items():
        counts = op_counts(p)
        ops[name] = {
            k: counts[k]
            for k in ("GRU", "LSTM", "Loop", "MatMulInteger", "DynamicQuantizeLinear")
            if counts[k]
        }
        ops[name]["size_bytes"] = os.path.getsize(p)
    return paths, ops


def _classifier_benchmark(batches, iters, rounds, *, epochs, seed):
    """A masked bidirectional GRU classifier on the synthetic sequences (variable length, zero
    padded): accuracy and latency of Keras, tf2onnx Loop, native GRU and native + int8."""
    import keras

    from dlmodels import export
    from dlmodels.data.series import SYNTHETIC_CLASSES, synthetic_sequences
    from dlmodels.models import SequenceClassifier

    x, y, _ = synthetic_sequences(
        1280,
        time=32,
        features=2,
        min_length=CLASSIFIER_MIN_LENGTH,
        noise=CLASSIFIER_NOISE,
        seed=seed,
    )
    x_train, y_train, x_test, y_test = x[:1024], y[:1024], x[1024:], y[1024:]
    keras.utils.set_random_seed(seed)
    model = SequenceClassifier(
        (None, 2), len(SYNTHETIC_CLASSES), units=32, bidirectional=True, masking=True
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x_train, y_train, batch_size=32, epochs=epochs, verbose=0)

    def accuracy(logits):
        return float(np.mean(np.argmax(logits, -1) == y_test))

    entry = {
        "data": (
            f"synthetic_sequences: 4 waveforms, 2 features, lengths {CLASSIFIER_MIN_LENGTH}..32 "
            f"zero-padded, noise std {CLASSIFIER_NOISE} (amplitude 0.7..1.3): hard enough that "
            "accuracy is below 1 and can move between Keras, ONNX and int8"
        ),
        "train / test": [len(x_train), len(x_test)],
        "params": int(model.count_params()),
        "keras_accuracy": accuracy(model.predict(x_test, verbose=0)),
    }
    with tempfile.TemporaryDirectory(prefix="dlmodels-bench-clf-") as tmp:
        paths, ops = _export_all(model, Path(tmp), "classifier")
        expected = export.keras_outputs(model, x_test)
        entry["artifacts"] = {}
        for name, p in paths.items():
            report = export.verify(model, p, x_test, atol=np.inf, expected=expected)
            (logits,) = export.onnx_predict(p, x_test)
            entry["artifacts"][name] = {
                **ops[name],
                "max_abs_error_vs_keras": report.max_abs_error,
                "accuracy": accuracy(logits),
            }
        entry["latency_ms"] = _latency_rows(model, paths, batches, iters, rounds, sample=x_test)
    return entry


GRU_INT8_NOTE = (
    "GRU int8 dynamic is a no-op for the recurrence on onnxruntime: its dynamic quantizer has "
    "int8 kernels for LSTM (DynamicQuantizeLSTM), MatMul and Gemm only, so GRU nodes stay fp32 "
    "and only the Dense head becomes int8 (MatMulInteger); its latency and MAE are the fp32 "
    "model's within noise."
)


def _int8_summary(result: dict) -> dict:
    """Dynamic int8 against fp32, leading with the LSTM forecaster (the only recurrent op
    onnxruntime quantizes); the GRU rows are reported as what they are."""
    out: dict = {}
    lstm = result["models"].get("lstm_forecaster")
    if lstm is not None:
        arts, lat = lstm["artifacts"], lstm["latency_ms"]
        fp32, int8 = "onnx native LSTM", "onnx native LSTM int8 dynamic"
        out["lstm_forecaster (DynamicQuantizeLSTM)"] = {
            "quantized_ops": {k: v for k, v in arts[int8].items() if k == "DynamicQuantizeLSTM"},
            "test_mae_fp32": arts[fp32]["test_mae"],
            "test_mae_int8": arts[int8]["test_mae"],
            "latency_p50_ms": {
                b: {"fp32": lat[b][fp32]["p50_ms"], "int8": lat[b][int8]["p50_ms"]} for b in lat
            },
        }
    gru = result["models"]["gru_forecaster"]
    arts = gru["artifacts"]
    out["gru_forecaster (no-op: GRU stays fp32)"] = {
        "note": GRU_INT8_NOTE,
        "test_mae_fp32": arts["onnx native GRU"]["test_mae"],
        "test_mae_int8": arts["onnx native GRU int8 dynamic"]["test_mae"],
    }
    return out


def run(
    out_path: str | os.PathLike | None = DEFAULT_OUT,
    *,
    series: str = "sunspots",
    window=WINDOW_CANDIDATES,
    test_size: int = 40,
    val_size: int = 30,
    units=(32,),
    epochs: int = 200,
    iters: int = 60,
    rounds: int = 6,
    batches=(1, 32),
    reference: bool = True,
    lstm: bool = True,
    extra_series=("co2",),
    classifier: bool = True,
    classifier_epochs: int = 15,
    seed: int = 0,
) -> dict:
    """Run the benchmark and write the JSON (`out_path=None`: return it only)."""
    from dlmodels import export
    from dlmodels.bench.harness import machine_info, write_results
    from dlmodels.data import series as series_data
    from dlmodels.export.onnx_rnn import op_counts, to_onnx_native_rnn

    # Window chosen on the validation split (never the test tail): one GRU per candidate,
    # the lowest validation MAE wins and that trained model is the GRU forecaster.
    windows = tuple(window) if isinstance(window, tuple | list) else (int(window),)
    candidates = {}
    for w in windows:
        cand = series_data.forecasting_data(
            series, window=w, horizon=1, test_size=test_size, val_size=val_size
        )
        model, epochs_run = _train_forecaster(cand, "gru", units, epochs, seed)
        val_mae = _mae(
            cand.denormalize(model.predict(cand.x_val, verbose=0)), cand.denormalize(cand.y_val)
        )
        candidates[w] = (val_mae, cand, model, epochs_run)
    window = min(candidates, key=lambda w: candidates[w][0])
    _, data, gru_model, gru_epochs = candidates[window]
    selection = {
        "how": (
            "window chosen on the validation split: a GRU forecaster per candidate window, "
            "lowest validation MAE kept; the held-out test tail is not used to choose. units "
            f"{list(units)} fixed in advance (not tuned); the LSTM uses the chosen window."
        ),
        "validation_mae_by_window": {str(w): candidates[w][0] for w in windows},
        "chosen_window": window,
    }
    target = data.y_test_raw
    baseline = {
        "seasonal_naive_mae": _mae(data.seasonal_naive_test(), target),
        "naive_last_value_mae": _mae(data.denormalize(data.x_test[:, -1:, :]), target),
        "season": data.season,
    }
    result: dict = {
        "benchmark": "sequence forecaster vs seasonal naive; native ONNX GRU vs tf2onnx Loop",
        "data": {
            "series": series,
            "source": "statsmodels.datasets (shipped with the package)",
            "length": len(data.series),
            "window": window,
            "horizon": 1,
            "held_out_tail": test_size,
            "validation": val_size,
            "train_windows": len(data.x_train),
            "test_windows": len(data.x_test),
            "normalization": "mean/std of the training part only",
            "selection": selection,
        },
        "baselines": baseline,
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="dlmodels-bench-seq-") as tmp:
        tmp = Path(tmp)
        for cell in ("gru", "lstm") if lstm else ("gru",):
            if cell == "gru":
                model, epochs_run = gru_model, gru_epochs
            else:
                model, epochs_run = _train_forecaster(data, cell, units, epochs, seed)
            pred = data.denormalize(model.predict(data.x_test, verbose=0))
            mae = _mae(pred, target)
            entry = {
                "params": int(model.count_params()),
                "units": list(units),
                "epochs_run": epochs_run,
                "test_mae": mae,
                "improvement_vs_seasonal_naive": 1.0 - mae / baseline["seasonal_naive_mae"],
                "improvement_vs_naive": 1.0 - mae / baseline["naive_last_value_mae"],
            }
            if cell == "gru":
                paths, ops = _export_all(model, tmp, "forecaster")
            else:
                native = to_onnx_native_rnn(model, tmp / "lstm_native.onnx")
                loop = export.to_onnx(model, tmp / "lstm_tf2onnx.onnx", native_rnn=False)
                paths = {
                    "onnx tf2onnx": loop,
                    "onnx native LSTM": native,
                    "onnx native LSTM int8 dynamic": export.quantize(
                        native, tmp / "lstm_int8.onnx", mode="dynamic"
                    ),
                }
                ops = {
                    n: {
                        k: v
                        for k, v in op_counts(p).items()
                        if k in ("LSTM", "Loop", "GRU", "DynamicQuantizeLSTM")
                    }
                    for n, p in paths.items()
                }
            expected = export.keras_outputs(model, data.x_test)
            entry["artifacts"] = {}
            for name, p in paths.items():
                int8 = "int8" in name
                report = export.verify(
                    model, p, data.x_test, atol=np.inf if int8 else 1e-4, expected=expected
                )
                (raw,) = export.onnx_predict(p, data.x_test)
                entry["artifacts"][name] = {
                    **ops[name],
                    "max_abs_error_vs_keras": report.max_abs_error,
                    "parity_passed_1e-4": bool(report.max_abs_error <= 1e-4),
                    "test_mae": _mae(data.denormalize(raw), target),
                }
            entry["latency_ms"] = _latency_rows(model, paths, batches, iters, rounds)
            result["models"][f"{cell}_forecaster"] = entry
        if reference:
            import keras

            keras.utils.set_random_seed(seed)
            inp = keras.Input((50, 32), name="series")
            out = keras.layers.Dense(1, name="head")(keras.layers.GRU(128, name="gru")(inp))
            ref = keras.Model(inp, out, name="reference_gru")
            paths, ops = _export_all(ref, tmp, "reference")
            x = np.random.default_rng(seed).normal(size=(8, 50, 32)).astype(np.float32)
            expected = export.keras_outputs(ref, x)
            parity = {
                name: export.verify(ref, p, x, atol=np.inf, expected=expected).max_abs_error
                for name, p in paths.items()
            }
            result["reference_gru_T50_F32_U128"] = {
                "params": int(ref.count_params()),
                "artifacts": {n: {**ops[n], "max_abs_error_vs_keras": parity[n]} for n in paths},
                "latency_ms": _latency_rows(ref, paths, batches, iters, rounds),
            }
    if classifier:
        result["masked_bidirectional_classifier"] = _classifier_benchmark(
            batches, iters, rounds, epochs=classifier_epochs, seed=seed
        )
    for name in extra_series:
        other = series_data.forecasting_data(name, window=2 * series_data.SEASON[name] + 2)
        model, epochs_run = _train_forecaster(other, "gru", units, epochs, seed)
        mae = _mae(other.denormalize(model.predict(other.x_test, verbose=0)), other.y_test_raw)
        naive = _mae(other.seasonal_naive_test(), other.y_test_raw)
        result.setdefault("other_series", {})[name] = {
            "length": len(other.series),
            "window": other.window,
            "window_choice": "fixed in advance: 2 seasons + 2 steps (not tuned)",
            "held_out_tail": len(other.series) - other.val_end,
            "epochs_run": epochs_run,
            "gru_test_mae": mae,
            "seasonal_naive_mae": naive,
            "naive_last_value_mae": _mae(
                other.denormalize(other.x_test[:, -1:, :]), other.y_test_raw
            ),
            "improvement_vs_seasonal_naive": 1.0 - mae / naive,
        }
    gru = result["models"]["gru_forecaster"]
    result["summary"] = {
        "gru_test_mae": gru["test_mae"],
        "seasonal_naive_mae": baseline["seasonal_naive_mae"],
        "gru_beats_seasonal_naive_by": gru["improvement_vs_seasonal_naive"],
        "goal_20pct_met": gru["improvement_vs_seasonal_naive"] >= 0.20,
        "native_vs_loop_speedup_batch1": gru["latency_ms"]["batch_1"].get("native_speedup_vs_loop"),
        "native_parity_max_abs_error": gru["artifacts"]["onnx native GRU"][
            "max_abs_error_vs_keras"
        ],
    }
    result["summary"]["int8_dynamic"] = _int8_summary(result)
    if classifier:
        clf = result["masked_bidirectional_classifier"]
        result["summary"]["masked_classifier_native_vs_loop_speedup"] = {
            b: clf["latency_ms"][b].get("native_speedup_vs_loop") for b in clf["latency_ms"]
        }
        result["summary"]["masked_classifier_accuracy"] = {
            "keras": clf["keras_accuracy"],
            **{name: a["accuracy"] for name, a in clf["artifacts"].items()},
        }
    if reference:
        lat = result["reference_gru_T50_F32_U128"]["latency_ms"]
        result["summary"]["reference_native_vs_loop_speedup"] = {
            b: lat[b].get("native_speedup_vs_loop") for b in lat
        }
    result["machine"] = machine_info()
    if out_path is not None:
        write_results(out_path, result)
    return result


if __name__ == "__main__":  # pragma: no cover
    import json

    summary = run()["summary"]
    print(json.dumps(summary, indent=2))

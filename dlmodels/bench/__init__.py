"""Latency harness behind `dlmodels bench`: Keras/TF and onnxruntime measured side by side.

Numbers from different processes or different minutes on a shared machine are not comparable,
so `compare` / `compare_predictors` time every candidate in the same run, in interleaved rounds,
and report medians.
"""

from dlmodels.bench.harness import (
    compare,
    compare_predictors,
    keras_predictor,
    machine_info,
    measure_latency,
    ort_predictor,
    write_results,
)

__all__ = [
    "compare",
    "compare_predictors",
    "keras_predictor",
    "machine_info",
    "measure_latency",
    "ort_predictor",
    "write_results",
]

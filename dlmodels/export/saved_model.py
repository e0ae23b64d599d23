"""TensorFlow SavedModel export with a `serving_default` signature TF Serving can load."""

from __future__ import annotations

import os
from pathlib import Path

import tensorflow as tf

from dlmodels.export._atomic import atomic_path, check_target
from dlmodels.export._signature import as_functional, serving_function


def to_saved_model(model, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Export `model` as a SavedModel directory with a named, batch-dynamic serving signature.

    The `serving_default` signature takes keyword inputs named after the Keras inputs
    (`model.inputs[i].name`, e.g. `image`) with batch dimension None and returns a dict keyed
    by `model.output_names`. The model runs with `training=False` (batch norm uses its moving
    statistics, dropout is off). For TF Serving pass a numbered version directory
    (`.../name/1`).

    Args:
        model: a functional Keras model (1..n inputs, 1..n outputs).
        path: destination directory; parent directories are created.
        overwrite: replace an existing directory (swapped in only once the new one is complete).
            Without it an existing `path` raises FileExistsError before anything is written.

    Returns:
        The directory written.
    """
    model = as_functional(model)
    path = Path(path)
    check_target(path, overwrite=overwrite)
    fn = serving_function(model)
    module = tf.Module()
    # Keras 3 variables wrap tf.Variables; tracking the underlying ones is what makes the
    # SavedModel carry the weights instead of freezing them into the graph.
    module.model_variables = [v.value for v in model.variables]
    module.serve = fn
    concrete = fn.get_concrete_function()
    with atomic_path(path, overwrite=overwrite, directory=True) as tmp:
        tf.saved_model.save(module, str(tmp), signatures={"serving_default": concrete})
    return path

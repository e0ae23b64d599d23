"""dlmodels: Keras 3 / TensorFlow models built for deployment.

Layers (`dlmodels.layers`) build paper-faithful models (`dlmodels.models`), which train under any
tf.distribute strategy (`dlmodels.training`) and export to verified `.keras`, SavedModel, ONNX and
int8 ONNX artifacts (`dlmodels.export`). `dlmodels.runtime` reads the export manifest and runs
the ONNX artifacts with onnxruntime alone.

`import dlmodels` is light: it imports neither TensorFlow nor Keras. The subpackages load on
first use (`dlmodels.models.get(...)`, `from dlmodels.layers import ConvNormAct`), so a serving
process that only needs `dlmodels.runtime` never pays for, or even installs, TensorFlow.
Loading a `.keras` file that holds dlmodels layers needs them registered with Keras. When Keras
is already imported, `import dlmodels` registers them (cheaply: Keras is loaded); otherwise use
`dlmodels.load_model(path)`, or import `dlmodels.layers` before `keras.saving.load_model`.
"""

import importlib
import sys

__version__ = "0.1.0"

_SUBMODULES = (
    "bench",
    "data",
    "export",
    "layers",
    "losses",
    "metrics",
    "models",
    "runtime",
    "training",
)

__all__ = ["__version__", "load_model", "register_serializables", *_SUBMODULES]


def __getattr__(name: str):
    # PEP 562: `dlmodels.models` imports the subpackage on first access; the import binds it
    # as a module attribute, so this runs once per subpackage.
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_SERIALIZABLE = ("layers", "losses", "metrics", "models")
"""Subpackages holding `register_keras_serializable` classes."""


def register_serializables() -> None:
    """Register every dlmodels layer, loss, metric and model class with Keras (imports Keras)."""
    for name in _SERIALIZABLE:
        importlib.import_module(f"{__name__}.{name}")


def load_model(path, **kwargs):
    """`keras.saving.load_model(path, **kwargs)` with the dlmodels classes registered first."""
    register_serializables()
    import keras

    return keras.saving.load_model(path, **kwargs)


def __dir__():
    return sorted({*globals(), *_SUBMODULES})


if "keras" in sys.modules:
    # Keras is loaded already, so registering costs little and `keras.saving.load_model` then
    # finds dlmodels' classes after a plain `import dlmodels`.
    register_serializables()

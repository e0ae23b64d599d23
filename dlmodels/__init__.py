"""dlmodels: Keras 3 / TensorFlow models built for deployment.

Layers (`dlmodels.layers`) build paper-faithful models (`dlmodels.models`), which train under any
tf.distribute strategy (`dlmodels.training`) and export to verified `.keras`, SavedModel, ONNX and
int8 ONNX artifacts (`dlmodels.export`).
"""

__version__ = "0.1.0"

from dlmodels import layers, models

__all__ = ["__version__", "layers", "models"]

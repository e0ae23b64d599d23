"""Building blocks, each a serializable Keras layer registered under package "dlmodels"."""

from dlmodels.layers.aspp import ASPP, rates_for_output_stride
from dlmodels.layers.attention import AttentionGate
from dlmodels.layers.conv import NORMS, ConvNormAct, make_activation, make_norm
from dlmodels.layers.features import FeatureTap
from dlmodels.layers.recurrent import GRUCell, LastStep, LSTMCell, SequenceCheck
from dlmodels.layers.residual import BottleneckBlock, ResidualBlock
from dlmodels.layers.resize import (
    AdaptiveAveragePooling2D,
    BilinearUpsampling,
    CropLike,
    ResizeLike,
)
from dlmodels.layers.sampling import Sampling

__all__ = [
    "ASPP",
    "NORMS",
    "AdaptiveAveragePooling2D",
    "AttentionGate",
    "BilinearUpsampling",
    "BottleneckBlock",
    "ConvNormAct",
    "CropLike",
    "FeatureTap",
    "GRUCell",
    "LSTMCell",
    "LastStep",
    "ResidualBlock",
    "ResizeLike",
    "Sampling",
    "SequenceCheck",
    "make_activation",
    "make_norm",
    "rates_for_output_stride",
]

"""Building blocks, each a serializable Keras layer registered under package "dlmodels"."""

from dlmodels.layers.attention import AttentionGate
from dlmodels.layers.conv import NORMS, ConvNormAct, make_activation, make_norm
from dlmodels.layers.features import FeatureTap
from dlmodels.layers.recurrent import GRUCell, LastStep, LSTMCell, SequenceCheck
from dlmodels.layers.residual import BottleneckBlock, ResidualBlock
from dlmodels.layers.sampling import Sampling

__all__ = [
    "NORMS",
    "AttentionGate",
    "BottleneckBlock",
    "ConvNormAct",
    "FeatureTap",
    "GRUCell",
    "LSTMCell",
    "LastStep",
    "ResidualBlock",
    "Sampling",
    "SequenceCheck",
    "make_activation",
    "make_norm",
]

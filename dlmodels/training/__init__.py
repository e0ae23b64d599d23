"""Training under tf.distribute: strategy resolution and a distributed custom loop."""

from dlmodels.training.strategy import STRATEGIES, is_chief, resolve_strategy
from dlmodels.training.trainer import Trainer

__all__ = ["STRATEGIES", "Trainer", "is_chief", "resolve_strategy"]

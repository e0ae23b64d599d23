"""Training under tf.distribute: strategy resolution, tasks and a distributed custom loop."""

from dlmodels.training.context import StepContext
from dlmodels.training.replicas import fold_seeds_per_replica, synchronized_batch_norm
from dlmodels.training.seq2seq import Seq2SeqTask
from dlmodels.training.strategy import STRATEGIES, is_chief, resolve_strategy
from dlmodels.training.tasks import GANTask, SupervisedTask, Task, VAETask
from dlmodels.training.trainer import Trainer

__all__ = [
    "STRATEGIES",
    "GANTask",
    "Seq2SeqTask",
    "StepContext",
    "SupervisedTask",
    "Task",
    "Trainer",
    "VAETask",
    "fold_seeds_per_replica",
    "is_chief",
    "resolve_strategy",
    "synchronized_batch_norm",
]

"""Training under tf.distribute: strategy resolution, tasks and a distributed custom loop."""

from dlmodels.training.context import StepContext
from dlmodels.training.ema import ExponentialMovingAverage
from dlmodels.training.launch import launch_local, ray_train, tfjob_manifest, write_tfjob
from dlmodels.training.precision import (
    PRECISIONS,
    Precision,
    precision_scope,
    resolve_precision,
)
from dlmodels.training.replicas import fold_seeds_per_replica, synchronized_batch_norm
from dlmodels.training.schedules import (
    WarmupCosineDecay,
    WarmupStepDecay,
    goyal_schedule,
    scaled_learning_rate,
)
from dlmodels.training.seq2seq import Seq2SeqTask
from dlmodels.training.strategy import STRATEGIES, is_chief, resolve_strategy
from dlmodels.training.tasks import GANTask, SupervisedTask, Task, VAETask
from dlmodels.training.trainer import NonFiniteLossError, Trainer

__all__ = [
    "PRECISIONS",
    "STRATEGIES",
    "ExponentialMovingAverage",
    "GANTask",
    "NonFiniteLossError",
    "Precision",
    "Seq2SeqTask",
    "StepContext",
    "SupervisedTask",
    "Task",
    "Trainer",
    "VAETask",
    "WarmupCosineDecay",
    "WarmupStepDecay",
    "fold_seeds_per_replica",
    "goyal_schedule",
    "is_chief",
    "launch_local",
    "precision_scope",
    "ray_train",
    "resolve_precision",
    "resolve_strategy",
    "scaled_learning_rate",
    "synchronized_batch_norm",
    "tfjob_manifest",
    "write_tfjob",
]

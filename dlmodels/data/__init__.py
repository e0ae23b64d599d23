"""Data sets for training, calibration and evaluation: numpy arrays and tf.data pipelines that
shard correctly under tf.distribute."""

from dlmodels.data import digits, folders, series, shapes, shapes_generative

__all__ = ["digits", "folders", "series", "shapes", "shapes_generative"]

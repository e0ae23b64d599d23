"""Exceptions that mean "the caller asked for something wrong", as opposed to a bug.

`UserError` subclasses ValueError, so code catching ValueError keeps working; what it adds is a
promise: the message says what was wrong with the arguments, data, files or model the caller
gave, and how to fix it. The `dlmodels` command line reports a UserError (and its subclasses
`dlmodels.runtime.ManifestError`, `dlmodels.export.UnsupportedOpError`) as one line with exit
status 2; any other ValueError coming out of Keras, TensorFlow, tf2onnx or onnxruntime is
treated as an internal error (exit 1). This module imports nothing, so the TensorFlow-free
runtime can use it.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A mistake in what the caller asked for (arguments, data, files, model): fixable by them."""

"""Exceptions that mean "the caller asked for something wrong", as opposed to a bug.

`UserError` subclasses ValueError, so code catching ValueError keeps working; what it adds is a
promise: the message says what was wrong with the arguments, data, files or model the caller
gave, and how to fix it. The `dlmodels` command line reports a UserError (and its subclasses
`dlmodels.runtime.ManifestError`, `dlmodels.export.UnsupportedOpError`) as one line with exit
status 2; any other ValueError coming out of Keras, TensorFlow, tf2onnx or onnxruntime is
treated as an internal error (exit 1). This module imports only the standard library, so the
TensorFlow-free runtime and server can use it.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["OneLineArgumentParser", "UserError"]


class UserError(ValueError):
    """A mistake in what the caller asked for (arguments, data, files, model): fixable by them."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line `error: ...` with exit status 2, as
    every `dlmodels` command reports them (`dlmodels serve`, `dlmodels launch`)."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)

"""Run an ONNX file in a fresh process: `python -m dlmodels.runtime.worker MODEL IN.npz OUT.npz`.

The parity check (`dlmodels.export.verify`) runs exported files here so the numbers are what a
serving process computes: this process imports numpy, onnxruntime and `dlmodels.runtime` only
(no TensorFlow, no state shared with the exporting process), and runs the file through the
same `OnnxModel` a server uses. IN.npz holds one array per model input, keyed by input name or
by position (`input_0`, ...). OUT.npz gets `output_0..output_{n-1}` in graph output order,
`output_names`, and `tensorflow_loaded` (a self-check that TensorFlow stayed out).

Exit status: 0 on success, 2 for wrong arguments, 3 when the arrays do not match the model's
inputs (names, count, dtype, rank or size; the reason goes to stderr).
"""

from __future__ import annotations

import sys

import numpy as np


def run_model_file(model, in_path: str, out_path: str) -> int:
    """Feed IN.npz to `model` (anything with `input_names` and `run(feeds) -> {name: array}`:
    `OnnxModel`, `OpenVINOModel`, `LiteRTModel`) and save OUT.npz; the exit status as above.

    Shared by the fresh-process workers of every runtime, so they read and write the same files.
    """
    with np.load(in_path) as data:
        given = {k: data[k] for k in data.files}
    positional = {f"input_{k}" for k in range(len(model.input_names))}
    if set(given) == positional and not set(given) & set(model.input_names):
        feeds = [given[f"input_{k}"] for k in range(len(model.input_names))]
    else:
        feeds = given
    try:
        outputs = model.run(feeds)
    except (TypeError, ValueError) as err:
        print(err, file=sys.stderr)
        return 3
    np.savez(
        out_path,
        output_names=np.array(list(outputs)),
        tensorflow_loaded=np.array("tensorflow" in sys.modules),
        **{f"output_{i}": v for i, v in enumerate(outputs.values())},
    )
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m dlmodels.runtime.worker MODEL.onnx IN.npz OUT.npz", file=sys.stderr)
        return 2
    from dlmodels.runtime.onnx_runner import OnnxModel

    model_path, in_path, out_path = argv
    return run_model_file(OnnxModel(model_path), in_path, out_path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

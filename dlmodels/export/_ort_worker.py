"""Run an ONNX file in a fresh process: `python _ort_worker.py MODEL IN.npz OUT.npz`.

Imports only numpy and onnxruntime, so the result reflects exactly what a serving process
without TensorFlow would compute (no shared TF/oneDNN state, no monkeypatching, no weights
lingering in memory). IN.npz holds one array per graph input, keyed by input name or by
position (`input_0`, ...). OUT.npz gets `output_0..output_{n-1}` in graph output order,
`output_names`, and `tensorflow_loaded` (a self-check that TensorFlow stayed out of this
process).
"""

import os
import sys

# Run as a script, sys.path[0] is this directory, where a module named `onnx.py` lives; drop it
# so nothing onnxruntime imports can be shadowed.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _here]

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402


def main(argv):
    if len(argv) != 3:
        print("usage: _ort_worker.py MODEL.onnx IN.npz OUT.npz", file=sys.stderr)
        return 2
    model_path, in_path, out_path = argv
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    graph_inputs = session.get_inputs()
    with np.load(in_path) as data:
        given = set(data.files)
        if all(i.name in given for i in graph_inputs):
            feeds = {i.name: data[i.name] for i in graph_inputs}
        elif given == {f"input_{k}" for k in range(len(graph_inputs))}:
            feeds = {i.name: data[f"input_{k}"] for k, i in enumerate(graph_inputs)}
        else:
            print(
                f"inputs {sorted(given)} do not match graph inputs "
                f"{[i.name for i in graph_inputs]}",
                file=sys.stderr,
            )
            return 3
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(names, feeds)
    arrays = {f"output_{i}": np.asarray(o) for i, o in enumerate(outputs)}
    np.savez(
        out_path,
        output_names=np.array(names),
        tensorflow_loaded=np.array("tensorflow" in sys.modules),
        **arrays,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Small ONNX graphs built with onnx.helper (no TensorFlow, no export: milliseconds each) and
manifests written by hand, for the runtime tests."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from onnx import TensorProto, helper


def two_input_graph(path: Path) -> Path:
    """`a`, `b`: float32 [batch, 3] -> `sum` = a + b, `prod` = a * b (both [batch, 3])."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 3])
    s = helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 3])
    p = helper.make_tensor_value_info("prod", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Mul", ["a", "b"], ["prod"]),
        ],
        "two_inputs",
        [a, b],
        [s, p],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def index_graph(path: Path) -> Path:
    """`ids`: int64 [batch] -> `doubled` = ids + ids (an integer input for dtype checks)."""
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])
    out = helper.make_tensor_value_info("doubled", TensorProto.INT64, ["batch"])
    graph = helper.make_graph(
        [helper.make_node("Add", ["ids", "ids"], ["doubled"])], "ids", [ids], [out]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def scalar_graph(path: Path) -> Path:
    """`scale`: float32 scalar (rank 0), `x`: float32 [batch, 3] -> `scaled` = x * scale."""
    scale = helper.make_tensor_value_info("scale", TensorProto.FLOAT, [])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    out = helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["scaled"])], "scalar", [scale, x], [out]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def spec(name, shape, dtype="float32", **extra):
    return {"name": name, "shape": shape, "dtype": dtype, **extra}


def manifest_dict(onnx_rel="model.onnx", **top) -> dict:
    """A manifest as `dlmodels.export.write_manifest` writes it, for `two_input_graph`."""
    return {
        "manifest_version": 1,
        "created": "2026-11-29T02:00:00+00:00",
        "source_model": {"name": "adder", "class": "Functional", "params": 0, "config": {}},
        "tools": {"onnxruntime": "1.32.0", "python": "3.11"},
        "artifacts": [
            {
                "format": "onnx",
                "path": onnx_rel,
                "size_bytes": 123,
                "inputs": [spec("a", ["batch", 3]), spec("b", ["batch", 3])],
                "outputs": [spec("sum", ["batch", 3]), spec("prod", ["batch", 3])],
                "parity": {"max_abs_error_vs_keras": 0.0},
                "metric": {"name": None, "keras": None, "artifact": None},
            }
        ],
        **top,
    }


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path

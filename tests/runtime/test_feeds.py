"""dlmodels.runtime.match_feeds: the one input matcher of OnnxModel, OpenVINOModel and
LiteRTModel. Outputs are compared element for element with numpy's own conversions, errors by
their whole text."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dlmodels.errors import UserError
from dlmodels.runtime import match_feeds

NAMES = ["a", "b"]
A = np.arange(6, dtype="float32").reshape(2, 3)
B = np.full((2, 3), 2.5, dtype="float32")


def _same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name, arr in want.items():
        assert got[name].dtype == arr.dtype, name
        assert got[name].flags["C_CONTIGUOUS"], name
        np.testing.assert_array_equal(got[name], arr)


@pytest.mark.parametrize("form", ["dict", "reversed dict", "list", "tuple"])
def test_dict_list_and_tuple_come_back_in_input_order(form):
    inputs = {
        "dict": {"a": A, "b": B},
        "reversed dict": {"b": B, "a": A},
        "list": [A, B],
        "tuple": (A, B),
    }[form]
    _same(match_feeds(inputs, NAMES, owner="m.onnx"), {"a": A, "b": B})


def test_single_array_and_nested_lists_for_a_single_input():
    _same(match_feeds(A, ["x"], owner="m"), {"x": A})
    # A list is always the list form (one entry per input), so [[1.5, 2.0]] feeds the array
    # [1.5, 2.0]; its float64 becomes the input's float32.
    got = match_feeds([[1.5, 2.0]], ["x"], ["float32"], owner="m")
    _same(got, {"x": np.array([1.5, 2.0], dtype="float32")})
    _same(match_feeds([A], ["x"], owner="m"), {"x": A})


def test_arrays_become_contiguous_without_changing_values():
    strided = np.arange(24, dtype="float32").reshape(4, 6)[:, ::2]
    transposed = np.asfortranarray(A)
    assert not strided.flags["C_CONTIGUOUS"] and not transposed.flags["C_CONTIGUOUS"]
    got = match_feeds([strided, transposed], NAMES, owner="m")
    _same(got, {"a": np.ascontiguousarray(strided), "b": np.ascontiguousarray(A)})


def test_a_scalar_input_stays_rank_0_in_every_runtime(tmp_path):
    """A rank-0 input (e.g. a temperature or a threshold) keeps shape (): numpy's
    ascontiguousarray would make it (1,), which onnxruntime and OpenVINO refuse."""
    from dlmodels.runtime import OnnxModel
    from tests.runtime._graphs import scalar_graph

    scale = np.array(2.5, dtype="float32")
    got = match_feeds({"x": A, "scale": scale}, ["scale", "x"], owner="m")
    assert got["scale"].shape == () and got["scale"].flags["C_CONTIGUOUS"]
    path = scalar_graph(tmp_path / "scalar.onnx")
    out = OnnxModel(path, threads=1).run({"scale": scale, "x": A})
    np.testing.assert_array_equal(out["scaled"], A * 2.5)
    import importlib.util

    if importlib.util.find_spec("openvino") is not None:
        ov = _standalone("openvino")
        out = ov.OpenVINOModel(path, threads=1).run({"scale": scale, "x": A})
        np.testing.assert_array_equal(out["scaled"], A * 2.5)


def test_missing_and_extra_names_are_named_exactly():
    with pytest.raises(UserError) as err:
        match_feeds({"a": A}, NAMES, owner="m.onnx")
    assert str(err.value) == "m.onnx: inputs missing ['b']; the model's inputs are ['a', 'b']"
    with pytest.raises(ValueError) as err:  # UserError is a ValueError
        match_feeds({"a": A, "b": B, "c": B, 7: B}, NAMES, owner="m.onnx")
    assert str(err.value) == (
        "m.onnx: inputs unexpected ['c', '7']; the model's inputs are ['a', 'b']"
    )
    with pytest.raises(UserError) as err:
        match_feeds({"b": B, "z": A}, NAMES, owner="x.tflite")
    assert str(err.value) == (
        "x.tflite: inputs missing ['a'], unexpected ['z']; the model's inputs are ['a', 'b']"
    )


def test_wrong_count_and_single_array_for_several_inputs():
    with pytest.raises(UserError) as err:
        match_feeds([A], NAMES, owner="m.xml")
    assert str(err.value) == (
        "m.xml: got 1 input arrays; the model has 2 inputs ['a', 'b'] (pass them in this "
        "order, or a dict by name)"
    )
    with pytest.raises(UserError) as err:
        match_feeds((A, B, B), ["x"], owner="m.xml")
    assert str(err.value).startswith("m.xml: got 3 input arrays; the model has 1 inputs ['x']")
    with pytest.raises(UserError) as err:
        match_feeds(A, NAMES, owner="m.xml")
    assert str(err.value) == (
        "m.xml: the model has inputs ['a', 'b']; pass a list in this order or a dict by name"
    )


def test_dtypes_keep_cast_or_refuse_by_the_casting_rule():
    f64 = A.astype("float64") + 0.1
    ints = np.array([[1, -2, 3]], dtype="int64")
    # No dtypes: every array keeps its own.
    _same(match_feeds([f64, ints], NAMES, owner="m"), {"a": f64, "b": ints})
    # same_kind: float64 -> float32 rounds like numpy's astype; a None entry keeps int64.
    got = match_feeds([f64, ints], NAMES, ["float32", None], owner="m")
    _same(got, {"a": f64.astype("float32"), "b": ints})
    # A mapping by name works like a list in input order.
    got = match_feeds([f64, ints], NAMES, {"b": np.float64}, owner="m")
    _same(got, {"a": f64, "b": ints.astype("float64")})
    # same_kind refuses floats into ints; the text names owner, input, both dtypes and the fix.
    with pytest.raises(TypeError) as err:
        match_feeds([f64, ints], NAMES, ["int32", None], owner="m.onnx")
    assert str(err.value) == (
        "m.onnx: input 'a' expects dtype int32, got float64 (not castable under "
        "casting='same_kind'); convert it with .astype('int32')"
    )
    # "no" demands the exact dtype, even float64 -> float32.
    with pytest.raises(TypeError, match=re.escape("got float64 (not castable under casting='no')")):
        match_feeds([f64, ints], NAMES, ["float32", "int64"], owner="m", cast="no")
    # "unsafe" converts like numpy: floats truncate toward zero into ints.
    got = match_feeds(np.array([1.7, -2.7]), ["x"], ["int8"], owner="m", cast="unsafe")
    _same(got, {"x": np.array([1, -2], dtype="int8")})


def test_check_sees_each_cast_array_in_input_order_before_contiguity():
    seen = []
    scalar = np.float64(3.0)
    got = match_feeds(
        {"b": scalar, "a": A},
        NAMES,
        ["float32", "float32"],
        owner="m",
        check=lambda name, arr: seen.append((name, arr.dtype.name, arr.shape)),
    )
    # The check sees the 0-d scalar (before ascontiguousarray gives it a length-1 axis).
    assert seen == [("a", "float32", (2, 3)), ("b", "float32", ())]
    _same(got, {"a": A, "b": np.array([3.0], dtype="float32")})

    def refuse(name, arr):
        if name == "b":
            raise UserError(f"no {name}")

    with pytest.raises(UserError, match=r"^no b$"):
        match_feeds([A, B], NAMES, owner="m", check=refuse)


def test_bad_arguments_are_refused():
    with pytest.raises(UserError) as err:
        match_feeds(A, ["x"], owner="m", cast="wild")
    assert str(err.value) == (
        "m: cast must be one of ['no', 'equiv', 'safe', 'same_kind', 'unsafe'], got 'wild'"
    )
    with pytest.raises(UserError) as err:
        match_feeds([A, B], NAMES, ["float32"], owner="m")
    assert str(err.value) == (
        "m: 1 dtypes for the 2 inputs ['a', 'b']; give one per input (None keeps an array's dtype)"
    )


def _standalone(module: str):
    """Load dlmodels/export/<module>.py as the fresh-process workers do (without
    `dlmodels.export`, whose __init__ imports TensorFlow)."""
    import importlib.util
    import sys
    from pathlib import Path

    import dlmodels

    path = Path(dlmodels.__file__).parent / "export" / f"{module}.py"
    spec = importlib.util.spec_from_file_location(f"_test_feeds_{module}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_openvino_model_feeds_through_the_shared_matcher(tmp_path):
    pytest.importorskip("openvino")
    from tests.runtime._graphs import two_input_graph

    ov = _standalone("openvino")
    model = ov.OpenVINOModel(two_input_graph(tmp_path / "adder.onnx"), threads=1)
    f64 = A.astype("float64") + 0.1
    ints = np.array([[1, 2, 3]], dtype="int64")
    # float64 becomes float32 (OpenVINO's own rule, kept); other dtypes pass as given.
    _same(model.feeds({"b": ints, "a": f64}), {"a": f64.astype("float32"), "b": ints})
    out = model.run([f64.astype("float32"), B])
    np.testing.assert_array_equal(out["sum"], f64.astype("float32") + B)
    with pytest.raises(UserError) as err:
        model.feeds({"a": A})
    assert str(err.value) == "adder.onnx: inputs missing ['b']; the model's inputs are ['a', 'b']"
    with pytest.raises(UserError, match=r"^adder\.onnx: the model has inputs \['a', 'b'\]; pass"):
        model.feeds(A)


def test_litert_model_feeds_cast_to_the_signature_dtypes():
    from pathlib import Path
    from types import SimpleNamespace

    litert = _standalone("litert")
    stand_in = SimpleNamespace(
        path=Path("m.tflite"),
        input_names=["image", "ids"],
        input_dtypes={"image": np.dtype("float32"), "ids": np.dtype("int32")},
    )
    f64 = A.astype("float64") + 0.1
    # LiteRT's rule, kept: convert to the signature's dtype as numpy does (floats truncate).
    got = litert.LiteRTModel.feeds(stand_in, [f64, np.array([1.9, -1.9])])
    _same(got, {"image": f64.astype("float32"), "ids": np.array([1, -1], dtype="int32")})
    with pytest.raises(UserError) as err:
        litert.LiteRTModel.feeds(stand_in, [A])
    assert str(err.value).startswith("m.tflite: got 1 input arrays; the model has 2 inputs")

"""dlmodels.runtime.OnnxModel: named I/O, the three input forms, checked feeds, manifests."""

from __future__ import annotations

import numpy as np
import pytest

from dlmodels.runtime import ManifestError, OnnxModel, default_threads, load_manifest
from tests.runtime._graphs import index_graph, manifest_dict, two_input_graph, write_json


@pytest.fixture(scope="module")
def adder_file(tmp_path_factory):
    return two_input_graph(tmp_path_factory.mktemp("graphs") / "adder.onnx")


@pytest.fixture(scope="module")
def adder(adder_file):
    return OnnxModel(adder_file, threads=1)


@pytest.fixture(scope="module")
def ids_model(tmp_path_factory):
    return OnnxModel(index_graph(tmp_path_factory.mktemp("graphs") / "ids.onnx"), threads=1)


A = np.arange(6, dtype="float32").reshape(2, 3)
B = np.full((2, 3), 2.0, dtype="float32")


def test_reads_names_shapes_and_dtypes_from_the_graph(adder):
    assert adder.input_names == ["a", "b"] and adder.output_names == ["sum", "prod"]
    assert adder.inputs[0].shape == ("batch", 3) and adder.inputs[0].dtype == "float32"
    assert adder.threads == 1 and adder.providers == ["CPUExecutionProvider"]
    assert "a: float32['batch', 3]" in repr(adder)


@pytest.mark.parametrize("form", ["list", "tuple", "dict"])
def test_run_accepts_list_tuple_and_dict(adder, form):
    feeds = {"list": [A, B], "tuple": (A, B), "dict": {"b": B, "a": A}}[form]
    out = adder.run(feeds)
    assert list(out) == ["sum", "prod"]
    np.testing.assert_array_equal(out["sum"], A + B)
    np.testing.assert_array_equal(out["prod"], A * B)


def test_single_array_for_single_input_models(ids_model):
    out = ids_model.run(np.array([1, 2, 3]))
    np.testing.assert_array_equal(out["doubled"], [2, 4, 6])
    np.testing.assert_array_equal(ids_model(np.array([4])), [8])


def test_selected_outputs_and_call(adder):
    assert list(adder.run([A, B], output_names=["prod"])) == ["prod"]
    got = adder([A, B])
    assert isinstance(got, list) and len(got) == 2
    with pytest.raises(ValueError, match=r"no outputs \['nope'\]; the model's outputs are"):
        adder.run([A, B], output_names=["nope"])


def test_missing_and_unexpected_inputs_are_named(adder):
    with pytest.raises(
        ValueError, match=r"inputs missing \['b'\]; the model's inputs are \['a', 'b'\]"
    ):
        adder.run({"a": A})
    with pytest.raises(ValueError, match=r"unexpected \['c'\]"):
        adder.run({"a": A, "b": B, "c": B})
    with pytest.raises(ValueError, match=r"got 1 input arrays; the model has 2 inputs"):
        adder.run([A])
    with pytest.raises(ValueError, match=r"the model has inputs \['a', 'b'\]; pass a list"):
        adder.run(A)


def test_wrong_rank_and_size_are_explained(adder):
    with pytest.raises(
        ValueError, match=r"input 'a' expects rank 2 with shape \[batch, 3\].*got rank 1"
    ):
        adder.run([A[0], B])
    with pytest.raises(ValueError, match=r"input 'b' expects rank 2.*got shape \[2, 4\]"):
        adder.run([A, np.zeros((2, 4), "float32")])


def test_dtypes_cast_within_kind_and_refuse_otherwise(adder, ids_model, adder_file):
    # float64 (e.g. parsed JSON) feeds a float32 input; the result is computed in float32.
    out = adder.run([A.astype("float64"), B.tolist()])
    assert out["sum"].dtype == np.float32
    np.testing.assert_array_equal(out["sum"], A + B)
    with pytest.raises(TypeError, match=r"input 'ids' expects dtype int64, got float32"):
        ids_model.run(np.array([1.5], dtype="float32"))
    with pytest.raises(TypeError, match=r"input 'a' expects dtype float32, got str32"):
        adder.run([np.array([["x", "y", "z"]]), B[:1]])
    strict = OnnxModel(adder_file, threads=1, cast="no")
    with pytest.raises(TypeError, match=r"expects dtype float32, got float64.*casting='no'"):
        strict.run([A.astype("float64"), B])


def test_constructor_arguments_are_validated(adder_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        OnnxModel(tmp_path / "missing.onnx")
    with pytest.raises(
        ValueError, match=r"providers \['CUDAExecutionProvider'\] are not available"
    ):
        OnnxModel(adder_file, providers=["CUDAExecutionProvider"])
    with pytest.raises(ValueError, match="threads must be an int >= 0"):
        OnnxModel(adder_file, threads=-1)
    with pytest.raises(ValueError, match="optimization must be one of"):
        OnnxModel(adder_file, optimization="max")
    with pytest.raises(ValueError, match="cast must be one of"):
        OnnxModel(adder_file, cast="unsafe_please")
    assert OnnxModel(adder_file).threads == default_threads() >= 1


def test_warmup_runs_zeros_of_the_input_specs(adder):
    feeds = adder.example_inputs(batch=4)
    assert {k: v.shape for k, v in feeds.items()} == {"a": (4, 3), "b": (4, 3)}
    out = adder.warmup(runs=2)
    assert out["sum"].shape == (1, 3)


def test_from_manifest(tmp_path, adder_file):
    (tmp_path / "model.onnx").write_bytes(adder_file.read_bytes())
    path = write_json(tmp_path / "manifest.json", manifest_dict())
    model = OnnxModel.from_manifest(path, threads=1)
    assert model.manifest == load_manifest(path) and model.artifact.format == "onnx"
    np.testing.assert_array_equal(model.run([A, B])["prod"], A * B)
    assert OnnxModel.from_manifest(load_manifest(tmp_path)).input_names == ["a", "b"]
    with pytest.raises(ManifestError, match=r"no artifact with format 'int8'"):
        OnnxModel.from_manifest(path, "int8")


def test_from_manifest_refuses_a_file_swapped_after_export(tmp_path):
    index_graph(tmp_path / "model.onnx")  # not the graph the manifest describes
    write_json(tmp_path / "manifest.json", manifest_dict())
    with pytest.raises(ValueError, match=r"records inputs \['a', 'b'\], but .* has \['ids'\]"):
        OnnxModel.from_manifest(tmp_path)


def test_from_manifest_refuses_non_onnx_artifacts(tmp_path, adder_file):
    (tmp_path / "model.onnx").write_bytes(adder_file.read_bytes())
    (tmp_path / "model.keras").write_bytes(b"zip")
    data = manifest_dict()
    data["artifacts"].append({"format": "keras", "path": "model.keras"})
    write_json(tmp_path / "manifest.json", data)
    with pytest.raises(
        ValueError, match=r"'keras' \(model.keras\) is not an ONNX file.*\['onnx'\]"
    ):
        OnnxModel.from_manifest(tmp_path, "keras")

"""dlmodels.runtime.manifest: the schema read back, validated, with clear errors."""

from __future__ import annotations

import copy

import pytest

from dlmodels.runtime import (
    MANIFEST_VERSION,
    SUPPORTED_MANIFEST_VERSIONS,
    ManifestError,
    find_manifests,
    load_manifest,
)
from tests.runtime._graphs import manifest_dict, spec, two_input_graph, write_json


@pytest.fixture
def repo(tmp_path):
    """A model directory: model.onnx next to a manifest.json that lists it."""
    root = tmp_path / "adder"
    root.mkdir()
    two_input_graph(root / "model.onnx")
    write_json(root / "manifest.json", manifest_dict())
    return root


def test_load_resolves_paths_and_reads_specs(repo):
    m = load_manifest(repo / "manifest.json")
    assert m.manifest_version == MANIFEST_VERSION in SUPPORTED_MANIFEST_VERSIONS
    assert m.name == "adder" and m.formats == ["onnx"]
    assert m.root == repo.absolute()
    a = m.artifact("onnx")
    assert a.path == (repo / "model.onnx").resolve() and a.relpath == "model.onnx"
    assert a.is_onnx and a.size_bytes == 123 and a.max_abs_error == 0.0
    assert a.input_names == ["a", "b"] and a.output_names == ["sum", "prod"]
    assert a.inputs[0].shape == ("batch", 3) and a.inputs[0].dtype == "float32"
    assert a.inputs[0].compatible_shape((5, 3)) and not a.inputs[0].compatible_shape((5, 4))
    assert a.inputs[0].example_shape(2) == (2, 3)
    assert m.onnx_artifacts() == [a]
    # A directory stands for its manifest.json.
    assert load_manifest(repo) == m


def test_artifact_paths_are_relative_to_the_manifest_not_the_cwd(repo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_manifest("adder/manifest.json").artifact().path.is_file()


def test_additive_keys_are_kept_not_refused(repo):
    data = manifest_dict(deployment={"owner": "team"})
    art = data["artifacts"][0]
    art.update(task="segmentation", num_classes=3, signature="serving_default")
    art["quantization"] = {"mode": "static", "per_channel": True}
    art["parity"]["argmax_agreement"] = 0.99
    art["extra"] = {"agreement": 0.98}
    art["outputs"][0]["output_kind"] = "logits"
    write_json(repo / "manifest.json", data)
    m = load_manifest(repo)
    assert m.extra == {"deployment": {"owner": "team"}}
    a = m.artifact()
    assert a.task == "segmentation" and a.num_classes == 3
    assert a.quantization == {"mode": "static", "per_channel": True}
    assert a.extra["agreement"] == 0.98 and a.extra["signature"] == "serving_default"
    assert a.parity["argmax_agreement"] == 0.99
    assert a.outputs[0].output_kind == "logits" and a.outputs[1].output_kind is None
    assert a.outputs[0].to_dict()["output_kind"] == "logits"


def test_unknown_format_lookup_names_what_is_there(repo):
    with pytest.raises(ManifestError, match=r"no artifact with format 'int8'; it lists \['onnx'\]"):
        load_manifest(repo).artifact("int8")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("manifest_version"), r"manifest_version: expected an int.*it is missing"),
        (lambda d: d.pop("artifacts"), r"artifacts: expected a list of artifact objects; it is"),
        (lambda d: d.update(artifacts={}), r"artifacts: expected a list.*got \{\}"),
        (lambda d: d["artifacts"][0].pop("format"), r"artifacts\[0\]\.format: expected a format"),
        (
            lambda d: d["artifacts"][0].pop("path"),
            r"artifacts\[0\] \(onnx\)\.path: expected a path",
        ),
        (
            lambda d: d["artifacts"][0]["inputs"][1].pop("dtype"),
            r"artifacts\[0\] \(onnx\)\.inputs\[1\]\.dtype: expected a dtype name",
        ),
        (
            lambda d: d["artifacts"][0]["outputs"][0].update(shape=[1, -3]),
            r"outputs\[0\]\.shape: expected a list of sizes.*got \[1, -3\]",
        ),
        (
            lambda d: d["artifacts"][0].update(size_bytes="big"),
            r"size_bytes: expected a byte count.*got 'big'",
        ),
        (lambda d: d.update(source_model=[1]), r"source_model: expected an object; got \[1\]"),
        (lambda d: d.update(created=5), r"created: expected an ISO 8601 timestamp"),
    ],
)
def test_invalid_manifest_names_file_key_and_expectation(repo, mutate, message):
    data = copy.deepcopy(manifest_dict())
    mutate(data)
    path = write_json(repo / "manifest.json", data)
    with pytest.raises(ManifestError, match=message) as info:
        load_manifest(path)
    assert str(path.absolute()) in str(info.value)


@pytest.mark.parametrize(("version", "hint"), [(2, "newer dlmodels"), (0, "re-export")])
def test_unknown_version_is_refused(repo, version, hint):
    write_json(repo / "manifest.json", manifest_dict(manifest_version=version))
    with pytest.raises(
        ManifestError, match=rf"manifest_version {version} is not supported.*{hint}"
    ):
        load_manifest(repo)


def test_version_must_be_an_int(repo):
    write_json(repo / "manifest.json", manifest_dict(manifest_version="1"))
    with pytest.raises(ManifestError, match=r"manifest_version: expected an int.*got '1'"):
        load_manifest(repo)


def test_missing_artifact_file_is_refused_at_load(repo):
    (repo / "model.onnx").unlink()
    with pytest.raises(
        ManifestError,
        match=r"artifacts\[0\] \(onnx\)\.path: the artifact "
        r"'model.onnx' does not exist",
    ):
        load_manifest(repo)
    # Inspecting a manifest without its files is still possible.
    assert load_manifest(repo, check_files=False).artifact().relpath == "model.onnx"


def test_not_json_and_no_file(repo, tmp_path):
    (repo / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match=r"manifest.json: not valid JSON"):
        load_manifest(repo)
    with pytest.raises(ManifestError, match=r"no manifest file there"):
        load_manifest(tmp_path / "nowhere")


def test_find_manifests_in_a_repository(tmp_path):
    for rel in ("a/manifest.json", "b/1/manifest.json", "c/1/2/3/manifest.json", "manifest.json"):
        write_json(tmp_path / rel, {})
    found = [p.relative_to(tmp_path).as_posix() for p in find_manifests(tmp_path)]
    assert found == ["a/manifest.json", "b/1/manifest.json", "manifest.json"]
    with pytest.raises(ManifestError, match="not a directory"):
        find_manifests(tmp_path / "manifest.json")


def test_tensor_spec_shapes_accept_ints_none_and_names(repo):
    data = manifest_dict()
    data["artifacts"][0]["inputs"] = [spec("a", [None, 3]), spec("b", ["batch", 3])]
    write_json(repo / "manifest.json", data)
    a = load_manifest(repo).artifact()
    assert a.inputs[0].shape == (None, 3) and a.inputs[0].rank == 2


@pytest.mark.parametrize(
    ("rel", "message"),
    [
        ("/etc/passwd", "is an absolute path"),
        ("../outside.onnx", "outside the manifest's directory"),
        ("sub/../../outside.onnx", "outside the manifest's directory"),
        ("link/model.onnx", "outside the manifest's directory"),
    ],
)
@pytest.mark.parametrize("check_files", [True, False])
def test_artifact_paths_leaving_the_manifest_directory_are_refused(
    repo, tmp_path, rel, message, check_files
):
    """A manifest describes the files next to it: absolute paths, `..` and links that lead out
    are refused (a served repository must not reach files elsewhere), with or without files."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "model.onnx").write_bytes((repo / "model.onnx").read_bytes())
    (tmp_path / "outside.onnx").write_bytes(b"x")
    (repo / "link").symlink_to(elsewhere, target_is_directory=True)
    data = manifest_dict()
    data["artifacts"][0]["path"] = rel
    write_json(repo / "manifest.json", data)
    with pytest.raises(ManifestError, match=rf"artifacts\[0\] \(onnx\)\.path: .*{message}"):
        load_manifest(repo, check_files=check_files)


def test_paths_inside_the_manifest_directory_are_accepted(repo):
    (repo / "v1").mkdir()
    (repo / "model.onnx").rename(repo / "v1" / "model.onnx")
    data = manifest_dict()
    data["artifacts"][0]["path"] = "v1/../v1/./model.onnx"
    write_json(repo / "manifest.json", data)
    assert load_manifest(repo).artifact().path == (repo / "v1" / "model.onnx").resolve()

"""Triton model repository and TF Serving base path laid out from a dlmodels repository."""

import hashlib
import json
import shutil

import numpy as np
import pytest

from dlmodels import export
from dlmodels.export import layouts
from dlmodels.runtime import OnnxModel, load_manifest
from tests.export._tiny import images


def _load_model_config_pb2():
    """Triton's ModelConfig protobuf module from the tritonclient wheel, loaded from its file so
    that `tritonclient.grpc/__init__` (which needs grpcio) is not imported; None without it."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        return None
    module_spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


_PB2 = _load_model_config_pb2()


@pytest.fixture
def model_config_pb2():
    if _PB2 is None:
        pytest.skip("tritonclient (Triton's model_config.proto) is not installed")
    return _PB2


@pytest.fixture(scope="module")
def repo(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("repo") / "tiny"
    export.write_repository(
        model,
        out,
        samples=images(3, seed=31),
        calibration=images(8, seed=32),
        formats=("saved_model", "onnx", "int8"),
    )
    return out


def _parse(path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), _PB2.ModelConfig())


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_triton_config_matches_the_manifest_field_by_field(repo, tmp_path, model, model_config_pb2):
    written = layouts.write_triton_repository(
        repo, tmp_path, name="seg", max_batch_size=16, instance_count=2
    )
    assert sorted(written) == ["seg", "seg_int8"]
    manifest = load_manifest(repo)
    for model_name, fmt in (("seg", "onnx"), ("seg_int8", "int8")):
        artifact = manifest.artifact(fmt)
        root = tmp_path / model_name
        assert sorted(p.name for p in root.iterdir()) == ["1", "config.pbtxt"]
        assert [p.name for p in (root / "1").iterdir()] == ["model.onnx"]
        assert _sha(root / "1" / "model.onnx") == _sha(artifact.path)
        cfg = _parse(root / "config.pbtxt")
        assert cfg.name == model_name
        assert cfg.platform == "onnxruntime_onnx"
        assert cfg.max_batch_size == 16
        assert cfg.HasField("dynamic_batching")
        assert [(g.count, g.kind) for g in cfg.instance_group] == [
            (2, model_config_pb2.ModelInstanceGroup.KIND_CPU)
        ]
        for got, want in ((cfg.input, artifact.inputs), (cfg.output, artifact.outputs)):
            assert (
                [t.name for t in got]
                == [t.name for t in want]
                == (["image"] if got is cfg.input else ["logits"])
            )
            assert [t.data_type for t in got] == [model_config_pb2.TYPE_FP32] * len(want)
            assert [list(t.dims) for t in got] == [list(t.shape[1:]) for t in want]
            assert [list(t.dims) for t in got] == [[16, 16, 3]]
    # The copied fp32 file is the model: onnxruntime on it equals Keras.
    x = images(2, seed=33)
    got = OnnxModel(tmp_path / "seg" / "1" / "model.onnx").run({"image": x})["logits"]
    np.testing.assert_allclose(got, model.predict(x, verbose=0), atol=1e-4)


def test_no_batching_keeps_the_batch_axis(repo, tmp_path, model_config_pb2):
    layouts.write_triton_repository(
        repo, tmp_path, name="seg", max_batch_size=0, dynamic_batching=False, formats=["onnx"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg"]
    cfg = _parse(tmp_path / "seg" / "config.pbtxt")
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == [-1, 16, 16, 3]


def test_dtypes_and_free_sizes_from_a_handwritten_manifest(repo, tmp_path, model_config_pb2):
    """Every type and shape entry comes from the manifest: fp16 IO, int64, free spatial dims."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(repo / "model.onnx", src / "m.fp16.onnx")
    manifest = {
        "manifest_version": 1,
        "artifacts": [
            {
                "format": "fp16",
                "path": "m.fp16.onnx",
                "inputs": [
                    {"name": "pixels", "shape": ["batch", None, "width", 3], "dtype": "float16"},
                    {"name": "ids", "shape": [None, 7], "dtype": "int64"},
                ],
                "outputs": [{"name": "mask", "shape": ["batch", 5], "dtype": "uint8"}],
            }
        ],
    }
    (src / "manifest.json").write_text(json.dumps(manifest))
    layouts.write_triton_repository(src, tmp_path / "triton", name="m", max_batch_size=4)
    cfg = _parse(tmp_path / "triton" / "m_fp16" / "config.pbtxt")
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg.input] == [
        ("pixels", model_config_pb2.TYPE_FP16, [-1, -1, 3]),
        ("ids", model_config_pb2.TYPE_INT64, [7]),
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg.output] == [
        ("mask", model_config_pb2.TYPE_UINT8, [5])
    ]


def test_existing_target_refused_then_replaced_atomically(repo, tmp_path, model_config_pb2):
    layouts.write_triton_repository(repo, tmp_path, name="seg", max_batch_size=8)
    (tmp_path / "seg" / "marker").write_text("old")
    (tmp_path / "other").mkdir()  # another model in the same repository
    with pytest.raises(FileExistsError, match="overwrite=True"):
        layouts.write_triton_repository(repo, tmp_path, name="seg", max_batch_size=4)
    assert _parse(tmp_path / "seg" / "config.pbtxt").max_batch_size == 8
    assert (tmp_path / "seg" / "marker").exists()
    layouts.write_triton_repository(repo, tmp_path, name="seg", max_batch_size=4, overwrite=True)
    assert _parse(tmp_path / "seg" / "config.pbtxt").max_batch_size == 4
    assert not (tmp_path / "seg" / "marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "seg", "seg_int8"]


def test_failure_half_way_writes_nothing(repo, tmp_path, monkeypatch):
    calls = []
    real = shutil.copyfile

    def failing(a, b, *args, **kwargs):
        calls.append(a)
        if len(calls) == 2:
            raise OSError("injected: disk full")
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(layouts.shutil, "copyfile", failing)
    with pytest.raises(OSError, match="injected"):
        layouts.write_triton_repository(repo, tmp_path, name="seg", max_batch_size=8)
    assert list(tmp_path.iterdir()) == []  # no seg, no seg_int8, no temp directory


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "a/b", "max_batch_size": 8}, "not a valid model name"),
        ({"name": "seg", "max_batch_size": -1}, "max_batch_size must be an int >= 0"),
        ({"name": "seg", "max_batch_size": 0}, "dynamic_batching needs max_batch_size >= 1"),
        ({"name": "seg", "max_batch_size": 8, "instance_count": 0}, "instance_count"),
        ({"name": "seg", "max_batch_size": 8, "formats": ["fp16"]}, r"format \['fp16'\]"),
    ],
)
def test_triton_bad_arguments(repo, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        layouts.write_triton_repository(repo, tmp_path / "t", **kwargs)
    assert not (tmp_path / "t").exists()


def test_tfserving_base_path_loads_and_predicts_like_keras(repo, tmp_path, model):
    import tensorflow as tf

    version_dir = layouts.write_tfserving_base_path(repo, tmp_path, name="seg")
    assert version_dir == tmp_path / "seg" / "1"
    assert (version_dir / "saved_model.pb").is_file()
    assert oct(version_dir.stat().st_mode & 0o777) == "0o755"
    manifest = load_manifest(repo).artifact("saved_model")
    fn = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    x = images(3, seed=34)
    out = fn(**{manifest.inputs[0].name: tf.constant(x)})
    assert sorted(out) == manifest.output_names == ["logits"]
    np.testing.assert_allclose(out["logits"].numpy(), model.predict(x, verbose=0), atol=1e-5)
    # Versions live side by side; an existing version is refused.
    layouts.write_tfserving_base_path(repo, tmp_path, name="seg", version=2)
    assert sorted(p.name for p in (tmp_path / "seg").iterdir()) == ["1", "2"]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        layouts.write_tfserving_base_path(repo, tmp_path, name="seg", version=2)
    with pytest.raises(ValueError, match="version must be an int >= 1"):
        layouts.write_tfserving_base_path(repo, tmp_path, name="seg", version=0)


def test_tfserving_needs_a_saved_model(repo, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(repo / "model.onnx", src / "model.onnx")
    arts = [a for a in json.loads((repo / "manifest.json").read_text())["artifacts"]]
    manifest = {"manifest_version": 1, "artifacts": [a for a in arts if a["format"] == "onnx"]}
    (src / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"no artifact with format 'saved_model'.*onnx"):
        layouts.write_tfserving_base_path(src, tmp_path / "tfs", name="seg")
    assert not (tmp_path / "tfs").exists()

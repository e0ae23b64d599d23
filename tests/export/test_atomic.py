"""Atomic writes: refuse, fail cleanly, replace — for every writer."""

import importlib
import os

import pytest

import dlmodels.export.onnx as onnx_mod
import dlmodels.export.saved_model as saved_model_mod
from dlmodels import export
from tests.export._tiny import images

# `dlmodels.export.quantize` is also the name of the re-exported function, which shadows the
# submodule as a package attribute; import_module goes through sys.modules.
quantize_mod = importlib.import_module("dlmodels.export.quantize")


class Boom(RuntimeError):
    pass


def _listing(directory):
    return sorted(os.listdir(directory))


def _tree_bytes(path):
    if path.is_file():
        return path.read_bytes()
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def _write_original(path, directory=False):
    if directory:
        path.mkdir(parents=True)
        (path / "saved_model.pb").write_bytes(b"original")
        (path / "variables").mkdir()
    else:
        path.write_bytes(b"original bytes")
    return _tree_bytes(path)


WRITERS = {
    "onnx": ("m.onnx", False, lambda model, p, **kw: export.to_onnx(model, p, **kw)),
    "keras": ("m.keras", False, lambda model, p, **kw: export.to_keras(model, p, **kw)),
    "saved_model": ("sm", True, lambda model, p, **kw: export.to_saved_model(model, p, **kw)),
}


@pytest.mark.parametrize("kind", list(WRITERS))
def test_existing_target_refused_before_any_work(kind, model, tmp_path, monkeypatch):
    name, is_dir, write = WRITERS[kind]
    target = tmp_path / name
    original = _write_original(target, is_dir)

    def must_not_run(*a, **k):
        raise AssertionError("export work started although the target exists")

    monkeypatch.setattr(onnx_mod, "_convert", must_not_run)
    monkeypatch.setattr(saved_model_mod, "serving_function", must_not_run)
    with pytest.raises(FileExistsError, match=r"overwrite=True") as err:
        write(model, target)
    assert str(target) in str(err.value)
    assert _tree_bytes(target) == original
    assert _listing(tmp_path) == [name]


def _inject_failure(kind, model, monkeypatch):
    """Make the writer produce partial output and then fail."""
    if kind == "onnx":

        def partial_save(proto, path):
            with open(path, "wb") as f:
                f.write(proto.SerializeToString()[:100])
            raise Boom("disk full")

        monkeypatch.setattr(onnx_mod.onnx, "save", partial_save)
    elif kind == "keras":

        def partial_save(path, *a, **k):
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 partial zip")
            raise Boom("interrupted")

        monkeypatch.setattr(model, "save", partial_save)
    else:
        real_save = saved_model_mod.tf.saved_model.save

        def partial_save(obj, export_dir, signatures=None):
            real_save(obj, export_dir, signatures=signatures)  # a complete-looking directory...
            raise Boom("interrupted")  # ...that must still never reach the target

        monkeypatch.setattr(saved_model_mod.tf.saved_model, "save", partial_save)


@pytest.mark.parametrize("kind", list(WRITERS))
@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_write_leaves_no_trace(kind, existing, model, tmp_path, monkeypatch):
    name, is_dir, write = WRITERS[kind]
    target = tmp_path / name
    original = _write_original(target, is_dir) if existing else None
    _inject_failure(kind, model, monkeypatch)
    with pytest.raises(Boom):
        write(model, target, overwrite=True)
    if existing:
        assert _tree_bytes(target) == original
        assert _listing(tmp_path) == [name]
    else:
        assert _listing(tmp_path) == []


def test_conversion_error_leaves_no_trace(model, tmp_path, monkeypatch):
    def failing_convert(fn, opset):
        raise Boom("tf2onnx: unsupported op")

    monkeypatch.setattr(onnx_mod, "_convert", failing_convert)
    target = tmp_path / "m.onnx"
    original = _write_original(target)
    with pytest.raises(Boom):
        export.to_onnx(model, target, overwrite=True)
    assert target.read_bytes() == original and _listing(tmp_path) == ["m.onnx"]


@pytest.mark.parametrize("kind", list(WRITERS))
def test_overwrite_replaces(kind, model, tmp_path):
    name, is_dir, write = WRITERS[kind]
    target = tmp_path / name
    original = _write_original(target, is_dir)
    assert write(model, target, overwrite=True) == target
    assert _tree_bytes(target) != original
    assert _listing(tmp_path) == [name]
    if kind == "saved_model":
        import tensorflow as tf

        assert "serving_default" in tf.saved_model.load(str(target)).signatures
    elif kind == "onnx":
        assert export.onnx_io(target)["inputs"][0]["name"] == "image"
    else:
        import keras

        assert keras.saving.load_model(target).name == model.name


def test_quantize_is_atomic_too(onnx_file, tmp_path, monkeypatch):
    target = tmp_path / "q.onnx"
    original = _write_original(target)
    with pytest.raises(FileExistsError):
        export.quantize(onnx_file, target, calibration=images(4))
    assert target.read_bytes() == original

    def failing_quantize(*a, **k):
        raise Boom("calibration crashed")

    monkeypatch.setattr(quantize_mod, "quantize_static", failing_quantize)
    with pytest.raises(Boom):
        export.quantize(onnx_file, target, calibration=images(4), overwrite=True)
    assert target.read_bytes() == original and _listing(tmp_path) == ["q.onnx"]


def test_parent_directories_created(model, tmp_path):
    path = export.to_keras(model, tmp_path / "a" / "b" / "m.keras")
    assert path.is_file()

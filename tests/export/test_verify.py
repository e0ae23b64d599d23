"""verify() must catch a wrong file, not just run."""

import dataclasses
import importlib

import numpy as np
import pytest

from dlmodels import export
from tests.export._tiny import images, tiny_segmenter


@pytest.fixture(scope="module")
def other_onnx(tmp_path_factory):
    """Same architecture, different initialization: the classic 'exported the wrong checkpoint'."""
    other = tiny_segmenter(seed=42)
    return export.to_onnx(other, tmp_path_factory.mktemp("other") / "other.onnx")


def test_report_fields(model, onnx_file):
    report = export.verify(model, onnx_file, images(2))
    fields = {f.name for f in dataclasses.fields(report)}
    assert {
        "path", "max_abs_error", "mean_abs_error", "atol", "passed", "n_samples",
        "metric_keras", "metric_onnx", "agreement",
    } <= fields  # fmt: skip
    assert report.path == str(onnx_file)
    assert 0 <= report.mean_abs_error <= report.max_abs_error <= 1e-4
    assert report.metric_keras is None and report.metric_onnx is None


def test_detects_a_different_model(model, other_onnx):
    x = images(4, seed=11)
    report = export.verify(model, other_onnx, x)
    assert not report.passed
    assert report.max_abs_error > 0.1, report
    assert report.agreement < 0.9
    with pytest.raises(export.VerificationError, match=r"FAIL .*max \|err\| \d"):
        export.verify(model, other_onnx, x, raise_on_fail=True)
    assert issubclass(export.VerificationError, AssertionError)


def test_metric_on_both_sides(model, onnx_file, other_onnx):
    x = images(6, seed=12)
    labels = np.argmax(model.predict(x, verbose=0), -1)  # Keras predictions as ground truth

    def pixel_accuracy(y, logits):
        return float(np.mean(np.argmax(logits, -1) == y))

    same = export.verify(model, onnx_file, x, labels=labels, metric=pixel_accuracy)
    assert same.metric_keras == 1.0 and same.metric_onnx == 1.0
    other = export.verify(model, other_onnx, x, labels=labels, metric=pixel_accuracy)
    assert other.metric_keras == 1.0 and other.metric_onnx < 0.9


def test_output_name_mismatch_is_an_error(multi_model, onnx_file):
    with pytest.raises(export.VerificationError, match="output_names"):
        export.verify(multi_model, onnx_file, images(1))


def test_nan_never_passes_even_with_infinite_atol(model, onnx_file, tmp_path):
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_file))
    kernel = next(w for w in proto.graph.initializer if len(w.dims) == 4)
    broken = numpy_helper.to_array(kernel).copy()
    broken.flat[0] = np.nan
    kernel.CopyFrom(numpy_helper.from_array(broken, kernel.name))
    path = tmp_path / "nan.onnx"
    onnx.save(proto, str(path))
    report = export.verify(model, path, images(2), atol=np.inf)
    assert not report.passed
    assert report.max_abs_error == float("inf")


def test_worker_env_puts_this_dlmodels_first_on_pythonpath():
    import os
    from pathlib import Path

    import dlmodels

    verify_module = importlib.import_module("dlmodels.export.verify")  # not the function

    root = verify_module.package_root()
    assert (root / "dlmodels" / "__init__.py").resolve() == Path(dlmodels.__file__).resolve()
    env = verify_module.worker_env({"HOME": "/h"})
    assert env == {"HOME": "/h", "PYTHONPATH": str(root)}
    env = verify_module.worker_env({"PYTHONPATH": os.pathsep.join(["/a", str(root), "/b"])})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(root), "/a", "/b"]


def test_worker_runs_without_dlmodels_installed(onnx_file, monkeypatch):
    """The worker process runs with -S (no site: neither the editable install's finder nor any
    .pth) and PYTHONPATH holding only numpy and onnxruntime: it finds dlmodels only through the
    PYTHONPATH entry verify adds, as when dlmodels runs from a checkout, not pip-installed."""
    import os
    import sys
    from pathlib import Path

    import onnxruntime

    verify_module = importlib.import_module("dlmodels.export.verify")  # not the function

    deps = {str(Path(m.__file__).resolve().parents[1]) for m in (np, onnxruntime)}
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sorted(deps)))
    monkeypatch.setattr(verify_module, "_WORKER_PYTHON", (sys.executable, "-S"))
    x = images(2, seed=9)
    (fresh,) = export.onnx_predict(onnx_file, x, fresh_process=True)
    (local,) = export.onnx_predict(onnx_file, x)
    np.testing.assert_allclose(fresh, local, atol=1e-6)


def test_in_process_predict_checks_feeds_like_the_runtime(onnx_file):
    """In-process onnx_predict runs dlmodels.runtime.OnnxModel: the same feed checks and casts."""
    x = images(2, seed=10)
    (as_f32,) = export.onnx_predict(onnx_file, x)
    (as_f64,) = export.onnx_predict(onnx_file, {"image": x.astype("float64")})
    np.testing.assert_array_equal(as_f32, as_f64)
    with pytest.raises(ValueError, match=r"unexpected \['img'\]"):
        export.onnx_predict(onnx_file, {"image": x, "img": x})
    with pytest.raises(ValueError, match=r"expects rank 4"):
        export.onnx_predict(onnx_file, x[0])

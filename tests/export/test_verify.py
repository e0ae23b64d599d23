"""verify() must catch a wrong file, not just run."""

import dataclasses

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

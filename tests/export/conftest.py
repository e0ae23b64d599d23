"""Tiny models and exported files shared by the export tests (built once per session: each
tf2onnx conversion costs ~0.5 s and the suite must stay fast on 2 shared cores)."""

from __future__ import annotations

import pytest

from tests.export._tiny import images, tiny_segmenter


@pytest.fixture(scope="session")
def model():
    return tiny_segmenter(0)


@pytest.fixture(scope="session")
def multi_model():
    return tiny_segmenter(1, second_head=True, name="tiny_two_heads")


@pytest.fixture(scope="session")
def onnx_file(model, tmp_path_factory):
    from dlmodels import export

    return export.to_onnx(model, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="session")
def int8_file(onnx_file, tmp_path_factory):
    from dlmodels import export

    return export.quantize(
        onnx_file, tmp_path_factory.mktemp("int8") / "tiny.int8.onnx", calibration=images(32, 1)
    )

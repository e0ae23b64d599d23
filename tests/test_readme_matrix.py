"""The README's deployment matrix says what the code does: one row per format the exporter
writes, the files, defaults, runtimes and layouts it supports, and the bars it judges by.

Each check reads the fact from the code (constants, signature defaults, the verification
method strings), so changing a tolerance, a default format or a layout without the README
fails here.
"""

import inspect
import re
from pathlib import Path

from dlmodels.export import layouts, openvino, repository
from dlmodels.export.fp16 import FP16_ATOL
from dlmodels.export.verify import INT8_MAX_METRIC_DROP
from dlmodels.runtime.manifest import ONNX_FORMATS

README = Path(__file__).resolve().parents[1] / "README.md"
COLUMNS = [
    "artifact",
    "file, written by",
    "Keras / TF",
    "TF Serving",
    "onnxruntime",
    "OpenVINO",
    "our server",
    "Triton layout",
    "verified against Keras (default bar)",
    "fresh process",
]
DEFAULTS = {
    k: v.default for k, v in inspect.signature(repository.write_repository).parameters.items()
}


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _matrix() -> dict[str, dict[str, str]]:
    """Rows of the table under `## Deployment matrix`, keyed by their artifact cell."""
    text = README.read_text()
    section = text.split("## Deployment matrix\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    assert _cells(lines[0]) == COLUMNS, _cells(lines[0])
    rows = {}
    for line in lines[2:]:
        cells = _cells(line)
        assert len(cells) == len(COLUMNS), line
        rows[cells[0]] = dict(zip(COLUMNS, cells, strict=True))
    return rows


ROWS = _matrix()

# While the README's single LiteRT row says "in progress", the LiteRT formats being added to
# the exporter need no row of their own; once that row is replaced by keyed rows (e.g.
# "LiteRT fp32 (`litert`)"), every check below covers them.
PENDING = (
    {f for f in repository.FORMATS if f.startswith("litert")}
    if "in progress" in ROWS.get("LiteRT", {}).get("file, written by", "")
    else set()
)


def _row_of(fmt: str) -> dict[str, str]:
    """The row whose artifact cell names the format key in backticks, e.g. (`int8`, default)."""
    found = [r for name, r in ROWS.items() if re.search(rf"\(`{re.escape(fmt)}`[,)]", name)]
    assert len(found) == 1, f"{len(found)} rows of the deployment matrix name `{fmt}`"
    return found[0]


def _bound(text: str, phrase: str) -> float:
    """The number after `phrase` in a README cell ("max abs error <= 1e-4" -> 1e-4)."""
    match = re.search(re.escape(phrase) + r" ([0-9.e+-]+)", text)
    assert match, (phrase, text)
    return float(match.group(1))


def _openvino_row(precision: str) -> dict[str, str]:
    return ROWS[f"OpenVINO {precision}"]


def test_one_row_per_format_the_exporter_or_the_manifest_knows():
    keyed = [name for name in ROWS if re.search(r"\(`\w+`", name)]
    keys = {re.search(r"\(`(\w+)`", name).group(1) for name in keyed}
    assert keys == (set(repository.FORMATS) | set(ONNX_FORMATS)) - PENDING, keys
    assert {f"OpenVINO {p}" for p in openvino.PRECISIONS} <= set(ROWS)
    assert any(name.startswith("LiteRT") for name in ROWS)
    # Formats only the manifest knows (dynamic int8) say that write_repository does not write them.
    for fmt in set(ONNX_FORMATS) - set(repository.FORMATS):
        assert "not written by `write_repository`" in _row_of(fmt)["file, written by"]


def test_default_formats_and_files():
    for fmt in set(repository.FORMATS) - PENDING:
        row = _row_of(fmt)
        assert ("default" in row["artifact"]) == (fmt in repository.DEFAULT_FORMATS), row
        assert f"`{repository.ARTIFACT_PATHS[fmt]}`" in row["file, written by"], fmt
        assert "`write_repository" in row["file, written by"], fmt


def test_onnx_opset_is_the_exporters_default():
    from dlmodels.export.onnx import DEFAULT_OPSET

    assert DEFAULTS["opset"] == DEFAULT_OPSET
    assert f"(opset {DEFAULT_OPSET})" in _row_of("onnx")["file, written by"]


def test_bars_are_the_code_defaults():
    assert DEFAULTS["fp16_atol"] == FP16_ATOL
    bar = "verified against Keras (default bar)"
    for fmt in ("keras", "saved_model", "onnx"):
        assert _bound(_row_of(fmt)[bar], "max abs error <=") == DEFAULTS["atol"], fmt
    assert _bound(_row_of("fp16")[bar], "max abs error <=") == FP16_ATOL
    int8 = _row_of("int8")[bar]
    assert _bound(int8, "argmax agreement >=") == DEFAULTS["int8_min_agreement"]
    assert _bound(int8, "task-metric drop <=") == DEFAULTS["int8_max_metric_drop"]
    assert "max abs error" not in int8  # judged with atol=inf
    for precision in ("f32", "bf16"):
        got = _bound(_openvino_row(precision)[bar], "max abs error <=")
        assert got == openvino.TOLERANCES[precision], precision
    assert openvino.TOLERANCES["int8"] == float("inf")  # judged by agreement and metric drop
    # LiteRT rows: the bars write_repository passes to verify_litert.
    assert _bound(_row_of("litert")[bar], "max abs error <=") == DEFAULTS["atol"]
    assert _bound(_row_of("litert_fp16")[bar], "max abs error <=") == DEFAULTS["fp16_atol"]
    lite_int8 = _row_of("litert_int8")[bar]
    assert _bound(lite_int8, "argmax agreement >=") == DEFAULTS["int8_min_agreement"]
    assert _bound(lite_int8, "task-metric drop <=") == DEFAULTS["int8_max_metric_drop"]
    ov_int8 = _openvino_row("int8")[bar]
    assert _bound(ov_int8, "argmax agreement >=") == openvino.INT8_MIN_AGREEMENT
    assert _bound(ov_int8, "task-metric drop <=") == INT8_MAX_METRIC_DROP
    assert "max abs error" not in ov_int8


def test_fresh_process_column_follows_the_verification_method():
    for fmt in set(repository.FORMATS) - PENDING:
        fresh = "fresh process" in repository._METHODS[fmt]
        assert _row_of(fmt)["fresh process"].startswith("yes" if fresh else "no"), fmt
    # verify_openvino always runs the file in a worker process.
    source = inspect.getsource(openvino.verify_openvino)
    assert "fresh_process=True" in source
    for precision in openvino.PRECISIONS:
        assert _openvino_row(precision)["fresh process"].startswith("yes")


def test_runtime_and_layout_columns():
    onnx_rows = {fmt: _row_of(fmt) for fmt in ONNX_FORMATS}
    for fmt, row in onnx_rows.items():
        assert row["onnxruntime"].startswith("yes"), fmt
        suffix = layouts.TRITON_SUFFIX[fmt]
        assert f"`NAME{suffix}`" in row["Triton layout"], (fmt, row["Triton layout"])
        assert row["our server"] != "-", fmt
        assert row["TF Serving"] == row["Keras / TF"] == "-", fmt
    assert set(layouts.TRITON_SUFFIX) == set(ONNX_FORMATS)
    for fmt in ("keras", "saved_model"):
        row = _row_of(fmt)
        assert row["Keras / TF"].startswith("yes")
        assert row["onnxruntime"] == row["our server"] == row["Triton layout"] == "-"
    tf_serving = [name for name, row in ROWS.items() if row["TF Serving"] not in ("-", "")]
    assert tf_serving == ["SavedModel (`saved_model`, default)"]
    assert "`write_tfserving_base_path`" in _row_of("saved_model")["TF Serving"]
    for precision in openvino.PRECISIONS:
        assert f"precision `{precision}`" in _openvino_row(precision)["OpenVINO"]


def test_architecture_picture_names_real_modules_and_functions():
    """The Mermaid picture under `## Architecture` names modules and functions that exist."""
    import importlib
    import importlib.util

    text = README.read_text()
    section = text.split("## Architecture\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```mermaid\n(.*?)^```", section, flags=re.S | re.M)
    assert len(blocks) == 1 and blocks[0].startswith("flowchart")
    picture = blocks[0]
    modules = set(re.findall(r"\bdlmodels\.\w+", picture))
    assert {"dlmodels.data", "dlmodels.export", "dlmodels.runtime", "dlmodels.training"} <= modules
    for name in modules:
        assert importlib.util.find_spec(name) is not None, name
    assert importlib.util.find_spec("serving") is not None and "serving/" in picture
    names = set(
        re.findall(r"\b(?:to_\w+|write_\w+|load_manifest|OnnxModel|resolve_strategy)\b", picture)
    )
    assert len(names) >= 9, names
    packages = [importlib.import_module(m) for m in ("dlmodels.export", "dlmodels.runtime")]
    packages.append(importlib.import_module("dlmodels.training"))
    for name in names:
        assert any(hasattr(p, name) for p in packages), name
    formats = ("SavedModel", "ONNX", "int8", "fp16", "OpenVINO", "LiteRT")
    formats += ("KServe v2", "TF Serving")
    for fmt in formats:
        assert fmt in picture, fmt
    assert "```\ndlmodels.layers  ->" not in text  # the ASCII picture it replaced

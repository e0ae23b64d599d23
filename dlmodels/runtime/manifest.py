"""The manifest.json schema: what each exported artifact is, read back and validated.

`dlmodels.export.write_manifest` writes the file when a model is exported; this module reads
it wherever the artifacts are used (a serving process, a benchmark, a deployment check) and
imports only the standard library (and `dlmodels.errors`, which imports nothing), so reading a
manifest never pulls in TensorFlow or Keras. The writer takes its schema constants
(`MANIFEST_VERSION`, `ONNX_FORMATS`, ...) from here, so reader and writer cannot drift apart.

A manifest is a JSON object:

    manifest_version   int, one of SUPPORTED_MANIFEST_VERSIONS (required)
    created            ISO 8601 UTC timestamp
    source_model       {name, class, params, config} of the Keras model
    tools              {tensorflow, keras, tf2onnx, onnx, onnxruntime, numpy, dlmodels, python}
    artifacts          list (required, may be empty) of
        format         "keras" | "saved_model" | "onnx" | "int8" | "fp16" | "dynamic" | ...
        path           file or directory, relative to the manifest's directory and inside it
                       (absolute paths and paths that lead out of it are refused)
        size_bytes     bytes on disk
        inputs/outputs [{name, shape: [int | null | "symbolic_name"], dtype}, ...]
        parity         {max_abs_error_vs_keras}
        metric         {name, keras, artifact}
        extra          anything the exporter wanted to keep

Keys this reader does not know (a newer writer's additions such as `task`, `num_classes`,
`quantization` or a tensor's `output_kind`) are kept in the `extra` dicts, never refused: the
schema grows additively within a manifest version. A breaking change bumps `manifest_version`,
and an unknown version is refused with a message saying which versions this dlmodels reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dlmodels.errors import UserError

MANIFEST_VERSION = 1
"""The version `dlmodels.export.write_manifest` writes."""

SUPPORTED_MANIFEST_VERSIONS = (1,)
"""The versions `load_manifest` reads."""

MANIFEST_FILENAME = "manifest.json"
"""The conventional file name, next to the artifacts it describes."""

ONNX_FORMATS = ("onnx", "int8", "fp16", "dynamic")
"""Artifact formats that are ONNX files (runnable with `dlmodels.runtime.OnnxModel`)."""

Dim = int | str | None


class ManifestError(UserError):
    """A manifest.json that cannot be read, is not valid, or lacks what was asked of it."""


def _fail(source: Path | str, key: str, expected: str, got: Any = dataclasses.MISSING) -> None:
    got_text = "it is missing" if got is dataclasses.MISSING else f"got {got!r}"
    raise ManifestError(f"{source}: {key}: expected {expected}; {got_text}")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input or output of an artifact.

    Attributes:
        name: the tensor's name in the artifact (ONNX graph input/output, signature key).
        shape: one entry per axis: an int for a fixed size, a string for a named symbolic size
            (e.g. "batch"), None for an unknown size.
        dtype: numpy dtype name ("float32", "int64", ...).
        extra: keys a newer writer added (e.g. an output's `output_kind`: "logits" | "softmax" |
            "sigmoid" | "unknown", see `output_kind`).
    """

    name: str
    shape: tuple[Dim, ...]
    dtype: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def output_kind(self) -> str | None:
        """For outputs: "logits", "softmax", "sigmoid" or "unknown" as the exporter recorded it
        (None when not recorded), so a client knows whether it receives probabilities."""
        return self.extra.get("output_kind")

    def compatible_shape(self, shape: tuple[int, ...]) -> bool:
        """Whether a concrete shape fits: same rank, equal sizes where this spec fixes them."""
        if len(shape) != len(self.shape):
            return False
        return all(not isinstance(d, int) or d == s for d, s in zip(self.shape, shape, strict=True))

    def example_shape(self, dynamic: int = 1) -> tuple[int, ...]:
        """A concrete shape for this spec, `dynamic` for every symbolic or unknown axis."""
        return tuple(d if isinstance(d, int) else dynamic for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, **self.extra}


@dataclasses.dataclass(frozen=True)
class Artifact:
    """One exported artifact listed in a manifest.

    Attributes:
        format: "keras", "saved_model", "onnx", "int8", "fp16", "dynamic", ...
        path: absolute path, resolved against the manifest's directory.
        relpath: the path as written in the manifest.
        size_bytes: bytes on disk when exported (None when not recorded).
        inputs / outputs: TensorSpecs in the artifact's order (empty when not recorded).
        parity: {"max_abs_error_vs_keras": ...} as measured at export.
        metric: {"name", "keras", "artifact"}: the task metric before/after export.
        extra: the manifest's `extra` dict plus any artifact key this reader does not know
            (e.g. `signature`, `quantization`).
    """

    format: str
    path: Path
    relpath: str
    size_bytes: int | None = None
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    parity: dict[str, Any] = dataclasses.field(default_factory=dict)
    metric: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def is_onnx(self) -> bool:
        return self.format in ONNX_FORMATS or self.path.suffix == ".onnx"

    @property
    def max_abs_error(self) -> float | None:
        return self.parity.get("max_abs_error_vs_keras")

    @property
    def task(self) -> str | None:
        """ "segmentation", "classification", ... as the exporter recorded it (None: unknown)."""
        return self.extra.get("task")

    @property
    def num_classes(self) -> int | None:
        return self.extra.get("num_classes")

    @property
    def quantization(self) -> dict[str, Any] | None:
        """The quantization settings of a quantized file (None for float artifacts)."""
        return self.extra.get("quantization")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A validated manifest.json.

    Attributes:
        path: the manifest file (absolute).
        manifest_version: the schema version it was written with.
        artifacts: the artifacts in file order.
        created: the UTC timestamp of the export (None when not recorded).
        source_model: {"name", "class", "params", "config"} of the Keras model.
        tools: tool name -> version that produced the artifacts.
        extra: top-level keys this reader does not know (e.g. `task`, `num_classes`).
    """

    path: Path
    manifest_version: int
    artifacts: tuple[Artifact, ...]
    created: str | None = None
    source_model: dict[str, Any] = dataclasses.field(default_factory=dict)
    tools: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def root(self) -> Path:
        """The directory artifact paths are relative to."""
        return self.path.parent

    @property
    def name(self) -> str:
        """The source model's name, else the manifest directory's name."""
        return self.source_model.get("name") or self.root.name

    @property
    def formats(self) -> list[str]:
        return [a.format for a in self.artifacts]

    def artifact(self, format: str = "onnx") -> Artifact:
        """The first artifact of a format.

        Raises:
            ManifestError: naming the formats the manifest does list.
        """
        for a in self.artifacts:
            if a.format == format:
                return a
        raise ManifestError(
            f"{self.path}: no artifact with format {format!r}; it lists {self.formats or 'none'}"
        )

    def onnx_artifacts(self) -> list[Artifact]:
        """The artifacts `OnnxModel` can run (fp32, int8, fp16, ... ONNX files)."""
        return [a for a in self.artifacts if a.is_onnx]

    def __iter__(self) -> Iterator[Artifact]:
        return iter(self.artifacts)


_ARTIFACT_KEYS = {
    "format",
    "path",
    "size_bytes",
    "inputs",
    "outputs",
    "parity",
    "metric",
    "extra",
}
_TOP_KEYS = {"manifest_version", "created", "source_model", "tools", "artifacts"}
_TENSOR_KEYS = {"name", "shape", "dtype"}


def _dict(source, key: str, value, *, optional: bool = True) -> dict[str, Any]:
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        _fail(source, key, "an object", value)
    return value


def _tensor(source, key: str, value) -> TensorSpec:
    if not isinstance(value, dict):
        _fail(source, key, "an object {name, shape, dtype}", value)
    for k in ("name", "shape", "dtype"):
        if k not in value:
            _fail(source, f"{key}.{k}", _TENSOR_EXPECTED[k])
    name, shape, dtype = value["name"], value["shape"], value["dtype"]
    if not isinstance(name, str) or not name:
        _fail(source, f"{key}.name", _TENSOR_EXPECTED["name"], name)
    if not isinstance(shape, list) or not all(
        d is None
        or isinstance(d, str)
        or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
        for d in shape
    ):
        _fail(source, f"{key}.shape", _TENSOR_EXPECTED["shape"], shape)
    if not isinstance(dtype, str) or not dtype:
        _fail(source, f"{key}.dtype", _TENSOR_EXPECTED["dtype"], dtype)
    extra = {k: v for k, v in value.items() if k not in _TENSOR_KEYS}
    return TensorSpec(name=name, shape=tuple(shape), dtype=dtype, extra=extra)


_TENSOR_EXPECTED = {
    "name": "a non-empty string",
    "shape": "a list of sizes (int >= 0, null, or a symbolic name)",
    "dtype": 'a dtype name such as "float32"',
}


def _tensors(source, key: str, value) -> tuple[TensorSpec, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        _fail(source, key, "a list of {name, shape, dtype}", value)
    return tuple(_tensor(source, f"{key}[{i}]", t) for i, t in enumerate(value))


def _artifact(source: Path, root: Path, i: int, value, check_files: bool) -> Artifact:
    key = f"artifacts[{i}]"
    if not isinstance(value, dict):
        _fail(source, key, "an object {format, path, inputs, outputs, ...}", value)
    fmt = value.get("format", dataclasses.MISSING)
    if not isinstance(fmt, str) or not fmt:
        _fail(source, f"{key}.format", 'a format name such as "onnx"', fmt)
    key = f"artifacts[{i}] ({fmt})"
    rel = value.get("path", dataclasses.MISSING)
    if not isinstance(rel, str) or not rel:
        _fail(source, f"{key}.path", "a path relative to the manifest's directory", rel)
    path = _inside(source, root, f"{key}.path", rel)
    if check_files and not path.exists():
        raise ManifestError(
            f"{source}: {key}.path: the artifact {rel!r} does not exist (looked for {path}); "
            "artifact paths are relative to the manifest's directory: move the manifest "
            "together with its artifacts, or re-export"
        )
    size = value.get("size_bytes")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        _fail(source, f"{key}.size_bytes", "a byte count (int >= 0)", size)
    extra = dict(_dict(source, f"{key}.extra", value.get("extra")))
    extra.update({k: v for k, v in value.items() if k not in _ARTIFACT_KEYS})
    return Artifact(
        format=fmt,
        path=path,
        relpath=rel,
        size_bytes=size,
        inputs=_tensors(source, f"{key}.inputs", value.get("inputs")),
        outputs=_tensors(source, f"{key}.outputs", value.get("outputs")),
        parity=_dict(source, f"{key}.parity", value.get("parity")),
        metric=_dict(source, f"{key}.metric", value.get("metric")),
        extra=extra,
    )


def _inside(source: Path, root: Path, key: str, rel: str) -> Path:
    """`root / rel` resolved, refusing paths that lead out of the manifest's directory: a
    manifest describes the files next to it, and a served or copied repository must not reach
    (or be made to reach) files elsewhere on the machine."""
    if Path(rel).is_absolute() or Path(os.path.splitdrive(rel)[1]).is_absolute():
        raise ManifestError(
            f"{source}: {key}: {rel!r} is an absolute path; artifact paths must be relative to "
            "the manifest's directory and stay inside it (re-export, or edit the path)"
        )
    base = root.resolve()
    path = (base / rel).resolve()
    if not path.is_relative_to(base):
        raise ManifestError(
            f"{source}: {key}: {rel!r} resolves to {path}, outside the manifest's directory "
            f"{base}; artifact paths must stay inside it (no '..', no links leading out)"
        )
    return path


def parse_manifest(data: Any, path: str | os.PathLike, *, check_files: bool = True) -> Manifest:
    """Validate an already-parsed manifest object; `path` locates it (artifact paths are
    relative to its directory) and names it in errors. See `load_manifest`."""
    source = Path(path).absolute()
    root = source.parent
    if not isinstance(data, dict):
        _fail(source, "(top level)", "a JSON object", type(data).__name__)
    if "manifest_version" not in data:
        _fail(source, "manifest_version", f"an int, one of {list(SUPPORTED_MANIFEST_VERSIONS)}")
    version = data["manifest_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        _fail(
            source,
            "manifest_version",
            f"an int, one of {list(SUPPORTED_MANIFEST_VERSIONS)}",
            version,
        )
    if version not in SUPPORTED_MANIFEST_VERSIONS:
        newer = version > max(SUPPORTED_MANIFEST_VERSIONS)
        hint = (
            "it was written by a newer dlmodels: upgrade dlmodels where it is read"
            if newer
            else "re-export the model with this dlmodels"
        )
        raise ManifestError(
            f"{source}: manifest_version {version} is not supported; this dlmodels reads "
            f"{list(SUPPORTED_MANIFEST_VERSIONS)} ({hint})"
        )
    if "artifacts" not in data:
        _fail(source, "artifacts", "a list of artifact objects")
    arts = data["artifacts"]
    if not isinstance(arts, list):
        _fail(source, "artifacts", "a list of artifact objects", arts)
    created = data.get("created")
    if created is not None and not isinstance(created, str):
        _fail(source, "created", "an ISO 8601 timestamp string", created)
    return Manifest(
        path=source,
        manifest_version=version,
        artifacts=tuple(_artifact(source, root, i, a, check_files) for i, a in enumerate(arts)),
        created=created,
        source_model=_dict(source, "source_model", data.get("source_model")),
        tools=_dict(source, "tools", data.get("tools")),
        extra={k: v for k, v in data.items() if k not in _TOP_KEYS},
    )


def load_manifest(path: str | os.PathLike, *, check_files: bool = True) -> Manifest:
    """Read and validate a manifest.json.

    Every error is a `ManifestError` naming the file, the key (e.g.
    `artifacts[1] (int8).inputs[0].shape`), what was expected and what was found. Keys this
    reader does not know are kept in the `extra` dicts, so a newer writer's additions never
    break an older reader within one manifest version.

    Args:
        path: the manifest file, or a directory holding `manifest.json`.
        check_files: refuse a manifest whose artifact files are missing (default True: a
            deployment should fail at load, not at the first request).

    Returns:
        A Manifest with artifact paths resolved against the manifest's directory.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILENAME
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest file there; export writes {MANIFEST_FILENAME}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path.absolute()}: not valid JSON: {err}") from None
    return parse_manifest(data, path, check_files=check_files)


def find_manifests(root: str | os.PathLike, *, max_depth: int = 3) -> list[Path]:
    """Every manifest.json in a model repository, sorted.

    Looks at `max_depth` directory levels counting `root` itself: `root` and the directories up
    to `max_depth - 1` levels below it. The default 3 covers `root/manifest.json`,
    `root/NAME/manifest.json` and `root/NAME/VERSION/manifest.json`; max_depth=1 looks in
    `root` only.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root}: not a directory (expected a model repository)")
    found = []
    for depth in range(max_depth):
        found.extend(root.glob("/".join(["*"] * depth + [MANIFEST_FILENAME])))
    return sorted(p for p in found if p.is_file())

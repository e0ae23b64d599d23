"""Serving layouts from a dlmodels repository: a Triton model repository and a TF Serving base path.

Both read a directory written by `write_repository` (its manifest.json says which artifacts
exist, their input/output names, shapes and dtypes) and lay the artifacts out the way the
servers expect, without re-exporting anything:

    write_triton_repository   DST/NAME/config.pbtxt + DST/NAME/1/model.onnx for the fp32 ONNX
                              file, and DST/NAME_int8, DST/NAME_fp16, ... for the other ONNX
                              artifacts (platform "onnxruntime_onnx"; Triton's model repository
                              layout, https://github.com/triton-inference-server/server
                              docs/user_guide/model_repository.md and model_configuration.md)
    write_tfserving_base_path DST/NAME/VERSION/ = the SavedModel (TF Serving's base path of
                              numbered version directories)

Each target model directory is built in a temp directory inside DST and renamed into place,
so a server watching DST never sees a half-copied model; an existing target is refused unless
`overwrite=True`. The writers only copy files and write text (no TensorFlow calls).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from dlmodels.errors import UserError
from dlmodels.runtime.manifest import Artifact, Manifest, ManifestError, load_manifest

TRITON_DTYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "uint16": "TYPE_UINT16",
    "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
    "bfloat16": "TYPE_BF16",
    "object": "TYPE_STRING",
    "string": "TYPE_STRING",
}
"""numpy dtype name (as the manifest records it) -> Triton `DataType`."""

TRITON_SUFFIX = {"onnx": "", "int8": "_int8", "fp16": "_fp16", "dynamic": "_dynamic"}
"""Manifest ONNX format -> suffix of its Triton model name (fp32 ONNX gets the bare name)."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_name(name) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise UserError(
            f"name={name!r} is not a valid model name: use letters, digits, '_', '.', '-' "
            "(starting with a letter or digit), e.g. name='unet'; it becomes a directory."
        )
    return name


def _int_arg(arg: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{arg} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _manifest(src) -> Manifest:
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(
            f"no dlmodels repository at {src}; write one with dlmodels.export.write_repository"
        )
    return load_manifest(src)


def _dims(spec_shape, max_batch_size: int, where: str) -> list[int]:
    shape = list(spec_shape)
    if max_batch_size > 0:
        if not shape:
            raise UserError(f"{where} is a scalar; with max_batch_size > 0 it needs a batch axis")
        if isinstance(shape[0], int):
            raise UserError(
                f"{where} has a fixed batch size {shape[0]} (shape {shape}); Triton batching "
                "needs a free batch axis: re-export with a dynamic batch or use max_batch_size=0"
            )
        shape = shape[1:]
    return [d if isinstance(d, int) else -1 for d in shape]


def _tensor_block(kind: str, specs, max_batch_size: int, artifact: Artifact) -> list[str]:
    lines = [f"{kind} ["]
    for i, spec in enumerate(specs):
        where = f"{artifact.relpath}: {kind} {spec.name!r}"
        dtype = TRITON_DTYPES.get(spec.dtype)
        if dtype is None:
            raise UserError(
                f"{where} has dtype {spec.dtype!r}, which Triton has no type for; supported: "
                f"{sorted(TRITON_DTYPES)}"
            )
        dims = ", ".join(str(d) for d in _dims(spec.shape, max_batch_size, where))
        lines += [
            "  {",
            f'    name: "{spec.name}"',
            f"    data_type: {dtype}",
            f"    dims: [ {dims} ]",
            "  }" + ("," if i < len(specs) - 1 else ""),
        ]
    lines.append("]")
    return lines


def triton_config(
    artifact: Artifact,
    *,
    name: str,
    max_batch_size: int,
    dynamic_batching: bool = True,
    instance_count: int = 1,
) -> str:
    """The config.pbtxt text (protobuf text format of Triton's ModelConfig) for one ONNX
    artifact: platform, max_batch_size, inputs and outputs (name, data_type, dims without the
    batch axis when max_batch_size > 0, -1 for free sizes), a CPU instance group and, when
    asked, `dynamic_batching {}`."""
    if not artifact.inputs or not artifact.outputs:
        raise ManifestError(
            f"{artifact.relpath}: the manifest records no inputs/outputs for this artifact; "
            "re-export with write_repository"
        )
    lines = [
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
    ]
    lines += _tensor_block("input", artifact.inputs, max_batch_size, artifact)
    lines += _tensor_block("output", artifact.outputs, max_batch_size, artifact)
    lines += ["instance_group [", "  {", f"    count: {instance_count}", "    kind: KIND_CPU"]
    lines += ["  }", "]"]
    if dynamic_batching:
        lines += ["dynamic_batching {", "}"]
    return "\n".join(lines) + "\n"


def _install(staged: dict[Path, Path], overwrite: bool) -> None:
    """Rename each staged directory onto its target (an existing one is swapped out and
    removed only once the new one is in place)."""
    from dlmodels.export._atomic import _swap_into_place, check_target

    for target, tmp in staged.items():
        check_target(target, overwrite=overwrite)  # may have appeared while we copied
        _swap_into_place(tmp, target)


def write_triton_repository(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    name: str,
    max_batch_size: int,
    dynamic_batching: bool = True,
    instance_count: int = 1,
    formats: Sequence[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Lay the ONNX artifacts of a dlmodels repository out as a Triton model repository.

    For each ONNX artifact (fp32 "onnx" -> NAME, "int8" -> NAME_int8, "fp16" -> NAME_fp16,
    "dynamic" -> NAME_dynamic) writes `DST/<model>/config.pbtxt` and `DST/<model>/1/model.onnx`
    (a copy). Other models already in DST are left alone.

    Args:
        src: the repository directory (holding manifest.json) or the manifest file.
        dst: the Triton model repository (created if missing).
        name: the model name for the fp32 file; the others get the suffixes above.
        max_batch_size: Triton's max_batch_size (>= 1 batches along the graph's free batch
            axis, which is then left out of `dims`; 0: no batching, full shapes).
        dynamic_batching: add `dynamic_batching {}` (needs max_batch_size >= 1).
        instance_count: model instances on the CPU (`instance_group [{count, kind: KIND_CPU}]`).
        formats: which ONNX formats to lay out (default: every ONNX artifact in the manifest).
        overwrite: replace existing model directories; otherwise FileExistsError before any
            file is copied.

    Returns:
        Triton model name -> its directory.
    """
    name = _check_name(name)
    max_batch_size = _int_arg("max_batch_size", max_batch_size, 0)
    instance_count = _int_arg("instance_count", instance_count, 1)
    if dynamic_batching and max_batch_size == 0:
        raise UserError(
            "dynamic_batching needs max_batch_size >= 1 (Triton batches requests along the "
            "batch axis); pass max_batch_size=8, say, or dynamic_batching=False"
        )
    manifest = _manifest(src)
    onnx_artifacts = {a.format: a for a in manifest.artifacts if a.format in TRITON_SUFFIX}
    wanted = list(onnx_artifacts) if formats is None else list(formats)
    missing = [f for f in wanted if f not in onnx_artifacts]
    if missing or not wanted:
        raise ManifestError(
            f"{manifest.path}: no ONNX artifact of format {missing or 'any'}; it lists "
            f"{manifest.formats} (Triton layouts take {list(TRITON_SUFFIX)})"
        )
    dst = Path(dst)
    plan = {f"{name}{TRITON_SUFFIX[f]}": onnx_artifacts[f] for f in wanted}
    configs = {
        model: triton_config(
            artifact,
            name=model,
            max_batch_size=max_batch_size,
            dynamic_batching=dynamic_batching,
            instance_count=instance_count,
        )
        for model, artifact in plan.items()
    }
    from dlmodels.export._atomic import check_target

    for model in plan:
        check_target(dst / model, overwrite=overwrite)
    dst.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".triton-tmp-", dir=dst) as tmp:
        staged = {}
        for model, artifact in plan.items():
            root = Path(tmp) / model
            (root / "1").mkdir(parents=True)
            shutil.copyfile(artifact.path, root / "1" / "model.onnx")
            (root / "config.pbtxt").write_text(configs[model], encoding="utf-8")
            staged[dst / model] = root
        _install(staged, overwrite)
    return {model: dst / model for model in plan}


def write_tfserving_base_path(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    name: str,
    version: int = 1,
    overwrite: bool = False,
) -> Path:
    """Copy the SavedModel of a dlmodels repository to `DST/NAME/VERSION/` (TF Serving's
    `--model_base_path=DST/NAME`, `--model_name=NAME`). Other versions under DST/NAME stay.

    Args:
        src: the repository directory (holding manifest.json) or the manifest file; it must
            list a "saved_model" artifact.
        dst: the directory holding TF Serving base paths (created if missing).
        name: the model name (a directory under DST).
        version: the version directory (an int >= 1).
        overwrite: replace an existing version directory; otherwise FileExistsError.

    Returns:
        The version directory written.
    """
    from dlmodels.export._atomic import atomic_path, check_target

    name = _check_name(name)
    version = _int_arg("version", version, 1)
    manifest = _manifest(src)
    artifact = manifest.artifact("saved_model")
    if not (artifact.path / "saved_model.pb").is_file():
        raise ManifestError(
            f"{manifest.path}: the saved_model artifact {artifact.relpath!r} has no "
            "saved_model.pb; re-export it"
        )
    target = Path(dst) / name / str(version)
    check_target(target, overwrite=overwrite)
    with atomic_path(target, overwrite=overwrite, directory=True) as tmp:
        shutil.copytree(artifact.path, tmp, dirs_exist_ok=True)
        # mkdtemp makes the directory owner-only; the server may run as another user.
        os.chmod(tmp, 0o755)
    return target

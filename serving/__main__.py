"""`python -m serving --model-repository DIR --check`: load and warm up every model.

Exit status: 0 when every ONNX artifact of every manifest loaded and ran, 1 when one failed,
2 for a usage error (no repository, no manifest in it, or no `--check`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dlmodels.runtime import ManifestError, OnnxModel, find_manifests, load_manifest

SERVER_PENDING = (
    "the HTTP server comes with the model-server issue; for now use --check to load every "
    "model in the repository and run one warm-up inference"
)


def check_repository(root: Path, *, threads: int | None = None, out=sys.stdout) -> int:
    """Load every manifest under `root`, open each ONNX artifact and run one inference on
    zeros shaped like its inputs. Prints one line per artifact; returns the exit status."""
    manifests = find_manifests(root)
    if not manifests:
        print(
            f"{root}: no manifest.json found (looked in it and two levels below); export "
            "models with `dlmodels export` first",
            file=sys.stderr,
        )
        return 2
    failures = checked = 0
    for path in manifests:
        try:
            manifest = load_manifest(path)
        except ManifestError as err:
            print(f"FAIL {err}", file=out)
            failures += 1
            continue
        artifacts = manifest.onnx_artifacts()
        if not artifacts:
            print(
                f"SKIP {manifest.name}: {path} lists no ONNX artifact ({manifest.formats})",
                file=out,
            )
            continue
        for artifact in artifacts:
            label = f"{manifest.name}/{artifact.format}"
            try:
                start = time.perf_counter()
                model = OnnxModel.from_manifest(manifest, artifact.format, threads=threads)
                loaded = time.perf_counter()
                outputs = model.warmup()
                ran = time.perf_counter()
            except Exception as err:  # report every model, then fail as a whole
                print(f"FAIL {label} ({artifact.path}): {type(err).__name__}: {err}", file=out)
                failures += 1
                continue
            checked += 1
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in outputs.items())
            print(
                f"OK   {label}: load {1e3 * (loaded - start):.0f} ms, first inference "
                f"{1e3 * (ran - loaded):.1f} ms -> {shapes}",
                file=out,
            )
    print(f"{checked} artifacts ready, {failures} failed", file=out)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving", description="dlmodels model server (TensorFlow-free)."
    )
    parser.add_argument(
        "--model-repository",
        required=True,
        type=Path,
        help="directory of models, each with the manifest.json written by dlmodels export",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="load every model, run one warm-up inference each, and exit",
    )
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads per model")
    parser.add_argument("--host", default="127.0.0.1", help="(server not yet available)")
    parser.add_argument("--port", type=int, default=8000, help="(server not yet available)")
    args = parser.parse_args(argv)
    if not args.model_repository.is_dir():
        parser.error(f"--model-repository {args.model_repository}: not a directory")
    if not args.check:
        print(SERVER_PENDING, file=sys.stderr)
        return 2
    return check_repository(args.model_repository, threads=args.threads)


if __name__ == "__main__":
    sys.exit(main())

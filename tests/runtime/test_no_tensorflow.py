"""The runtime side runs without TensorFlow: fresh processes whose imports of `tensorflow`,
`keras` and `tf2onnx` raise ImportError load a manifest and run an exported model.

The export happens here, in the test process (which has TensorFlow); everything after it runs
in `python -c` subprocesses with a meta-path blocker installed before any dlmodels import, so a
TensorFlow import anywhere on the runtime path (dlmodels/__init__, dlmodels.runtime, serving)
fails these tests instead of passing silently on a machine that happens to have TensorFlow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("tensorflow", "keras", "tf2onnx")

BLOCKER = textwrap.dedent(
    f"""
    import sys

    class _BlockTensorFlow:
        blocked = {BLOCKED!r}

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.blocked:
                raise ImportError(f"{{name}} is blocked: this process must run without it")
            return None

    sys.meta_path.insert(0, _BlockTensorFlow())
    try:
        import keras  # the blocker itself must work, or the test proves nothing
    except ImportError:
        pass
    else:
        raise SystemExit("the import blocker did not block keras")
    """
)

AFTER = textwrap.dedent(
    f"""
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
    assert not loaded, f"blocked modules got into sys.modules: {{loaded}}"
    """
)


def run_python(code: str, *args: str, block: bool = True, forbid: bool = True, cwd: Path = ROOT):
    """Run `code` in a fresh interpreter: with the TensorFlow blocker unless block=False, and
    failing if a blocked module ended up in sys.modules unless forbid=False."""
    script = (
        (BLOCKER if block else "import sys\n") + textwrap.dedent(code) + (AFTER if forbid else "")
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


def test_import_dlmodels_loads_neither_tensorflow_nor_keras():
    # No blocker: a plain process on a machine that has TensorFlow, checked via sys.modules.
    proc = run_python(
        """
        import dlmodels
        heavy = [m for m in ("tensorflow", "keras", "tf2onnx", "onnx") if m in sys.modules]
        assert not heavy, f"import dlmodels imported {heavy}"
        assert dlmodels.__version__
        """,
        block=False,
    )
    assert_ok(proc)


def test_runtime_and_serving_import_with_tensorflow_blocked():
    proc = run_python(
        """
        import dlmodels
        import dlmodels.runtime
        import serving
        import serving.__main__
        from dlmodels.runtime import OnnxModel, load_manifest
        """
    )
    assert_ok(proc)


def test_subpackages_still_load_lazily():
    proc = run_python(
        """
        import dlmodels
        assert "dlmodels.models" not in sys.modules
        assert "unet" in dlmodels.models.list()
        from dlmodels.layers import ConvNormAct
        assert "runtime" in dir(dlmodels)
        try:
            dlmodels.nonexistent
        except AttributeError as err:
            assert "nonexistent" in str(err)
        else:
            raise AssertionError("no AttributeError")
        """,
        block=False,
        forbid=False,  # the models need Keras; only the lazy loading is under test
    )
    assert_ok(proc)


def _tiny_model():
    keras.utils.set_random_seed(7)
    inp = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inp)
    mask = keras.layers.Conv2D(2, 1, name="mask")(x)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    scores = keras.layers.Dense(3, name="scores")(pooled)
    return keras.Model(inp, [mask, scores], name="tiny_runtime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny two-output Keras model exported to ONNX with a manifest, and its Keras outputs."""
    from dlmodels import export

    root = tmp_path_factory.mktemp("repo") / "tiny_runtime"
    model = _tiny_model()
    onnx_path = export.to_onnx(model, root / "model.onnx")
    manifest = export.write_manifest(
        root / "manifest.json",
        [export.ArtifactEntry(format="onnx", path=onnx_path, max_abs_error=0.0)],
        model=model,
    )
    x = np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 3)).astype("float32")
    expected = model(x, training=False)
    arrays = {
        "x": x,
        **{n: np.asarray(v) for n, v in zip(model.output_names, expected, strict=True)},
    }
    np.savez(root.parent / "expected.npz", **arrays)
    return manifest, root.parent / "expected.npz", list(model.output_names)


def test_manifest_and_model_run_without_tensorflow(exported):
    manifest, expected_npz, output_names = exported
    proc = run_python(
        """
        import json
        import numpy as np
        from dlmodels.runtime import OnnxModel, load_manifest

        manifest = load_manifest(sys.argv[1])
        model = OnnxModel.from_manifest(manifest, "onnx")
        with np.load(sys.argv[2]) as data:
            expected = {k: data[k] for k in data.files}
        out = model.run({"image": expected.pop("x")})
        errors = {k: float(np.max(np.abs(out[k] - v))) for k, v in expected.items()}
        print(json.dumps({
            "name": manifest.name,
            "inputs": model.input_names,
            "outputs": list(out),
            "recorded_outputs": manifest.artifact("onnx").output_names,
            "errors": errors,
        }))
        """,
        str(manifest),
        str(expected_npz),
    )
    assert_ok(proc)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["name"] == "tiny_runtime"
    assert result["inputs"] == ["image"]
    assert result["outputs"] == result["recorded_outputs"] == output_names
    assert set(result["errors"]) == set(output_names)
    assert max(result["errors"].values()) <= 1e-5, result["errors"]


def test_serving_check_without_tensorflow(exported):
    manifest, _, _ = exported
    repo = manifest.parent.parent
    proc = run_python(
        """
        from serving.__main__ import main
        code = main(["--model-repository", sys.argv[1], "--check", "--threads", "1"])
        assert code == 0, code
        """,
        str(repo),
    )
    assert_ok(proc)
    assert "OK   tiny_runtime/onnx" in proc.stdout, proc.stdout
    assert "mask [1, 8, 8, 2], scores [1, 3]" in proc.stdout
    assert "1 artifacts ready, 0 failed" in proc.stdout


def test_serving_check_reports_a_broken_manifest(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps({"manifest_version": 9}))
    proc = run_python(
        """
        from serving.__main__ import main
        raise SystemExit(main(["--model-repository", sys.argv[1], "--check"]))
        """,
        str(tmp_path),
    )
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout and "manifest_version 9 is not supported" in proc.stdout
    (tmp_path / "empty").mkdir()
    empty = run_python(
        "from serving.__main__ import main\nraise SystemExit(main(['--model-repository', "
        "sys.argv[1], '--check']))",
        str(tmp_path / "empty"),
    )
    assert empty.returncode == 2 and "no manifest.json found" in empty.stderr
    pending = run_python(
        "from serving.__main__ import main\nraise SystemExit(main(['--model-repository', "
        "sys.argv[1]]))",
        str(tmp_path),
    )
    assert pending.returncode == 2 and "no servable model" in pending.stderr


def test_cli_says_what_to_install_without_tensorflow():
    proc = run_python(
        """
        from dlmodels.__main__ import main
        raise SystemExit(main(["train", "--epochs", "1"]))
        """
    )
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip()
    assert line.count("\n") == 0, line
    assert line.startswith("dlmodels train needs the full install"), line
    assert "pip install 'dlmodels[tf]'" in line


@pytest.mark.parametrize("keys", ["positional", "named"])
def test_worker_runs_an_exported_file_without_tensorflow(exported, tmp_path, keys):
    """`python -m dlmodels.runtime.worker`: the fresh-process worker behind export.verify."""
    manifest, expected_npz, output_names = exported
    with np.load(expected_npz) as data:
        expected = {k: data[k] for k in data.files}
    x = expected.pop("x")
    np.savez(tmp_path / "in.npz", **({"input_0": x} if keys == "positional" else {"image": x}))
    proc = run_python(
        """
        from dlmodels.runtime.worker import main
        raise SystemExit(main(sys.argv[1:]))
        """,
        str(manifest.parent / "model.onnx"),
        str(tmp_path / "in.npz"),
        str(tmp_path / "out.npz"),
    )
    assert_ok(proc)
    with np.load(tmp_path / "out.npz") as out:
        assert [str(n) for n in out["output_names"]] == output_names
        assert not bool(out["tensorflow_loaded"])
        for i, name in enumerate(output_names):
            np.testing.assert_allclose(out[f"output_{i}"], expected[name], atol=1e-5)


def test_worker_explains_mismatched_inputs(exported, tmp_path):
    manifest, _, _ = exported
    np.savez(tmp_path / "in.npz", pixels=np.zeros((1, 8, 8, 3), "float32"))
    proc = run_python(
        """
        from dlmodels.runtime.worker import main
        raise SystemExit(main(sys.argv[1:]))
        """,
        str(manifest.parent / "model.onnx"),
        str(tmp_path / "in.npz"),
        str(tmp_path / "out.npz"),
    )
    assert proc.returncode == 3, proc.stderr
    assert "missing ['image']" in proc.stderr and "unexpected ['pixels']" in proc.stderr


def test_keras_files_with_dlmodels_layers_load_after_import_dlmodels(tmp_path):
    """A `.keras` file holding dlmodels layers loads in a fresh process after `import dlmodels`
    when Keras came first (the usual order), and always through `dlmodels.load_model`."""
    from dlmodels.layers import ConvNormAct

    inp = keras.Input((8, 8, 3), name="image")
    model = keras.Model(inp, ConvNormAct(4, 3, name="block")(inp))
    path = tmp_path / "m.keras"
    model.save(path)
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model.predict(x, verbose=0))
    check = """
        import numpy as np
        np.testing.assert_allclose(
            loaded.predict(np.load(sys.argv[2]), verbose=0), np.load(sys.argv[3]), atol=1e-6
        )
        """
    args = (str(path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy"))
    keras_first = "import keras\nimport dlmodels\nloaded = keras.saving.load_model(sys.argv[1])\n"
    helper = "import dlmodels\nloaded = dlmodels.load_model(sys.argv[1])\n"
    for code in (keras_first, helper):
        assert_ok(run_python(code + textwrap.dedent(check), *args, block=False, forbid=False))

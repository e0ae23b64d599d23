"""Every `dlmodels` verb through the real console script (a subprocess, as a user runs it): its
success path, and one user error that prints exactly one line `error: ...` and exits 2.

The expensive success paths are proved elsewhere through the same entry point: `train --data`,
`export --data` and `verify --data` in tests/test_own_data_cli.py; `demo` in
tests/test_cli.py (in process, full settings). Here the demo runs with tiny settings.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

EXE = Path(sys.executable).with_name("dlmodels")


def run(*args, cwd, timeout=600, columns=200):
    env = {**os.environ, "COLUMNS": str(columns), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [str(EXE), *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env,
        timeout=timeout,
    )  # fmt: skip


def assert_one_line_user_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stdout[-500:], result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny 4-class U-Net (.keras), matching data (.npz), its ONNX export and a cGAN."""
    import dlmodels.models as registry
    from dlmodels import export

    root = tmp_path_factory.mktemp("verbs")
    keras.utils.set_random_seed(0)
    unet = registry.get("unet", input_shape=(32, 32, 3), num_classes=4, depth=2, base_filters=4)
    unet.save(root / "unet.keras")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (16, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 4, (16, 32, 32)).astype("int32")
    np.savez(root / "data.npz", x=x, y=y)
    export.write_repository(unet, root / "repo" / "unet", samples=x, formats=("onnx",))
    cgan = registry.get("cgan", input_shape=(8, 8, 1), num_classes=3, latent_dim=4)
    cgan.save(root / "cgan.keras")
    return root


VERBS = {
    # verb: (success args, user-error args, fragments of the error line), {} = tmp dir
    "models": (["models"], ["models", "--nope"], ["--nope"]),
    "sample": (
        ["sample", "{root}/cgan.keras", "--labels", "0,2", "--n", "2", "--output", "{tmp}/g.png"],
        ["sample", "{root}/cgan.keras", "--labels", "7", "--output", "{tmp}/g2.png"],
        ["7"],
    ),
    "quantize": (
        [
            "quantize",
            "{root}/repo/unet/model.onnx",
            "{tmp}/q.onnx",
            "--data",
            "{root}/data.npz",
            "--calibration-method",
            "entropy",
        ],
        ["quantize", "{root}/repo/unet/model.onnx", "{tmp}/q.onnx"],
        ["--data"],
    ),
    "bench": (
        ["bench", "{root}/unet.keras", "--iters", "2", "--output", "{tmp}/b.json", "--json"],
        ["bench", "{tmp}/missing.keras"],
        ["missing.keras", "does not exist"],
    ),
    "serve": (
        ["serve", "--model-repository", "{root}/repo", "--check"],
        ["serve", "--model-repository", "{tmp}/none"],
        ["none"],
    ),
    "launch": (
        ["launch", "-n", "2", "--", sys.executable, "-c", "print('hello')"],
        ["launch", "-n", "2"],
        ["--"],
    ),
    "demo": (
        [
            "demo",
            "--output-dir",
            "{tmp}/demo",
            "--image-size",
            "32x32",
            "--epochs",
            "1",
            "--train-samples",
            "32",
        ],
        ["demo", "--image-size", "96x"],
        ["--image-size"],
    ),
}


def _fill(args, root, tmp):
    return [a.format(root=root, tmp=tmp) for a in args]


@pytest.mark.parametrize("verb", list(VERBS))
def test_verb_success_and_user_error(verb, files, tmp_path):
    ok_args, bad_args, fragments = VERBS[verb]
    ok = run(*_fill(ok_args, files, tmp_path), cwd=tmp_path)
    if verb == "demo":  # tiny settings miss the demo's quality bars: exit 1 with the table
        assert ok.returncode in (0, 1), ok.stderr[-2000:]
        results = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
        assert (tmp_path / "demo" / "manifest.json").exists() and results["rows"]
    else:
        assert ok.returncode == 0, (ok.stdout[-1000:], ok.stderr[-2000:])
    if verb == "models":
        assert "deeplabv3plus" in ok.stdout and "unet3plus" in ok.stdout
    if verb == "bench":
        assert json.loads(ok.stdout)
    if verb == "launch":
        assert ok.stdout.count("hello") == 2
    if verb == "quantize":  # the method asked for; the tiny U-Net's 2 ConvTranspose stay float
        assert "calibration_method=entropy" in ok.stdout
        int8, total = re.search(r"compute_ops_int8=(\d+)/(\d+)", ok.stdout).groups()
        assert (int(int8), int(total)) == (11, 13)
    bad = run(*_fill(bad_args, files, tmp_path), cwd=tmp_path, columns=40)  # no wrapping
    assert_one_line_user_error(bad, *fragments)


# -- --help: every verb shows examples that its own parser accepts --------------------------

KNOWN_VERBS = {"models", "train", "sample", "export", "verify", "quantize", "demo", "bench"}
KNOWN_VERBS |= {"serve", "launch"}


def _verbs():
    import typer

    from dlmodels.cli import app

    return typer.main.get_command(app).commands  # every registered verb, new ones included


def _help(entry, verb, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "200")  # one example per line, no wrapping
    with pytest.raises(SystemExit) as done:
        entry([verb, "--help"])
    assert done.value.code in (0, None)
    return capsys.readouterr().out


def _examples(text: str, verb: str) -> list[list[str]]:
    import shlex

    assert "Examples:" in text, text
    tail = text.split("Examples:", 1)[1]
    lines = [line.strip() for line in tail.splitlines()]
    mine = [line for line in lines if f"{line} ".startswith(f"dlmodels {verb} ")]
    return [shlex.split(line)[2:] for line in mine]


def test_the_verb_list_is_complete():
    assert set(_verbs()) >= KNOWN_VERBS, sorted(_verbs())


def test_every_verb_help_shows_examples_its_parser_accepts(capsys, monkeypatch):
    """`dlmodels VERB --help` for every registered verb (a new verb without examples fails):
    an "Examples:" part with `dlmodels VERB ...` lines that the verb's own parser accepts."""
    from dlmodels.cli import main
    from serving.__main__ import build_parser

    commands = _verbs()
    for verb in sorted(commands):
        text = _help(main, verb, capsys, monkeypatch)
        examples = _examples(text, verb)
        assert examples, f"`dlmodels {verb} --help` shows no `dlmodels {verb} ...` example:\n{text}"
        if verb in ("verify", "bench", "export", "quantize"):
            assert "--json" in text, verb
        for args in examples:  # parse only: a wrong option or value in an example fails here
            if verb == "serve":
                build_parser().parse_args(args)
            elif verb != "launch":  # argparse.REMAINDER: anything after -- parses
                commands[verb].make_context(verb, list(args)).close()


def test_console_script_serve_help_shows_examples(capsys, monkeypatch):
    from dlmodels.__main__ import main

    assert _examples(_help(main, "serve", capsys, monkeypatch), "serve")

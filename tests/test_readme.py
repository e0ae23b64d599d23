"""The README's Python code blocks run as written on a fresh checkout (in a scratch directory).

Every ```python block is executed top to bottom in one fresh interpreter per block; a block
that is not meant to run on its own must be marked ```python no-run (none is today).
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert BLOCKS, "the README lost its quickstart"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path):
    script = tmp_path / f"block{index}.py"
    script.write_text(BLOCKS[index])
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=880,
        env={
            "PATH": str(Path(sys.executable).parent),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "HOME": str(tmp_path),
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]


COMMAND_LINES = [
    line
    for block in re.findall(r"^```bash\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    for line in block.splitlines()
    if line.startswith(("dlmodels ", "python -m serving "))
]


def test_readme_command_lines_parse():
    """Every `dlmodels ...` / `python -m serving ...` line of the README parses with the verb's
    own parser (nothing runs): a renamed option or a removed verb fails here."""
    import shlex

    import typer

    from dlmodels.cli import app
    from serving.__main__ import build_parser

    commands = typer.main.get_command(app).commands
    assert len(COMMAND_LINES) >= 10, COMMAND_LINES
    for line in COMMAND_LINES:
        args = shlex.split(line, comments=True)
        if args[:3] == ["python", "-m", "serving"]:
            build_parser().parse_args(args[3:])
            continue
        verb, rest = args[1], args[2:]
        assert verb in commands, line
        if verb == "serve":
            build_parser().parse_args(rest)
        elif verb == "launch":  # argparse.REMAINDER after --
            assert "--" in rest, line
        else:
            commands[verb].make_context(verb, rest).close()

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

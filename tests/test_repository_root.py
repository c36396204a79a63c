"""Python started in the repository root puts the root first on ``sys.path``; our top-level ``kernels/``
folder (shipped as ``bertfast.kernels``) must not then hide the PyPI package ``kernels`` that transformers
imports while loading any model module. The folder has no ``__init__.py``, so at most it is a namespace
portion, which an installed regular package of that name outranks wherever it is on the path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

IMPORTS = """
import importlib.util, pathlib, sys
import transformers.models.bert.modeling_bert
import bertfast, bertfast.kernels, bertfast.kernels.attention
spec = importlib.util.find_spec("kernels")
ours = pathlib.Path(sys.argv[1]).resolve() / "kernels"
origin = pathlib.Path(spec.origin).resolve() if spec and spec.origin else None
print("kernels:", origin)
assert origin is not None and origin.parent != ours, f"`import kernels` finds {origin}, our folder"
"""


def run_in_root(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_kernels_folder_is_no_regular_package():
    assert not (ROOT / "kernels" / "__init__.py").exists()


@pytest.mark.parametrize("start", ["-c", "-m"])
def test_a_process_started_in_the_root_imports_transformers_and_bertfast_kernels(start, tmp_path):
    pytest.importorskip("transformers")
    # The PyPI `kernels` is in the test group (and a dependency of transformers from 5.25); the child checks
    # that this one, not our folder, is what `import kernels` finds. `-c` and `-m` (how
    # `python -m bertfast` and `python -m torch.distributed.run -m bertfast` start) both put the working
    # directory first on sys.path; the `-m` module itself comes from PYTHONPATH.
    if start == "-c":
        result = run_in_root(["-c", IMPORTS, str(ROOT)])
    else:
        (tmp_path / "root_imports.py").write_text(IMPORTS)
        env = {**os.environ, "PYTHONPATH": str(tmp_path)}
        result = run_in_root(["-m", "root_imports", str(ROOT)], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kernels: " in result.stdout

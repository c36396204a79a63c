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
    # module, kernel, config, arch, align, regs, spills, smem, mma, status
    table = [line.split() for line in result.stdout.splitlines()]
    compiled = {(row[0], row[3], row[4]) for row in table if len(row) >= 10 and row[-1] == "ok"}
    for module in ("bias_gelu", "bias_dropout_add_layernorm", "bias_gelu_layernorm", "embeddings", "attention",
                   "cross_entropy"):
        for arch in ("sm_80", "sm_90"):
            # tuned specs compile both as odd shapes and as multiple-of-16 (vectorised) shapes reach them
            assert {(module, arch, "-"), (module, arch, "16")} <= compiled, (module, arch)
    # The attention matmuls use Hopper's wgmma on sm_90 and mma.sync on sm_80.
    attention = [row for row in table
                 if len(row) >= 10 and row[0] == "attention" and row[1] in ("attn_fwd", "attn_bwd")]
    assert attention
    for row in attention:
        assert row[8] == ("wgmma" if row[3] == "sm_90" else "mma"), row


def test_a_module_that_does_not_import_is_a_failure_row(tmp_path, monkeypatch):
    (tmp_path / "broken_kernel.py").write_text("raise ImportError('no such thing')\n")
    (tmp_path / "helpers.py").write_text("X = 1\n")
    monkeypatch.setattr(bertfast.kernels, "__path__", [str(tmp_path)])
    for name in ("broken_kernel", "helpers"):
        monkeypatch.delitem(sys.modules, f"bertfast.kernels.{name}", raising=False)
    jobs, failures = check._discover(None, ["sm_90"])
    assert jobs == []
    assert [(row.module, row.ok) for row in failures] == [("broken_kernel", False)]
    assert "no such thing" in failures[0].error


def test_spills_fail_only_tuned_configs():
    assert not check.Row("m", "k", "c", "sm_90", registers=255, spill_bytes=8, shared_bytes=0, tuned=True).ok
    assert check.Row("m", "k", "c", "sm_90", registers=255, spill_bytes=8, shared_bytes=0, tuned=False).ok
    assert check.Row("m", "k", "c", "sm_90", registers=64, spill_bytes=0, shared_bytes=0, tuned=True).ok
    assert not check.Row("m", "k", "c", "sm_90", tuned=False, error="CompilationError: x").ok


def test_more_shared_memory_than_the_architecture_gives_a_block_fails():
    # 120 KB fits an A100 (163 KB) and an H100 (227 KB) but not an RTX 30xx/40xx (99 KB): the launch would fail.
    row = {arch: check.Row("m", "k", "c", arch, registers=64, spill_bytes=0, shared_bytes=120 * 1024, tuned=False)
           for arch in ("sm_80", "sm_86", "sm_89", "sm_90")}
    assert [row[a].ok for a in ("sm_80", "sm_86", "sm_89", "sm_90")] == [True, False, False, True]
    assert check.shared_limit(90) == 232448 and check.shared_limit(91) == check.shared_limit(90)


def test_specs_compile_only_for_the_architectures_that_use_them():
    from bertfast.kernels import attention

    specs = attention.aot_specs()
    fwd_sm90_only = [s for s in specs if s.name.startswith("attn_fwd") and not s.used_on(80) and s.used_on(90)]
    assert fwd_sm90_only, "the Hopper table has configurations of its own"
    assert all(s.used_on(c) for s in specs for c in (80, 90) if s.capabilities is None)
    # every table entry is reachable: for each architecture, its own table's configurations are all compiled
    for capability in (80, 86, 90):
        table = attention.CONFIGS[attention.table_for(capability)]
        names = {s.name for s in specs if s.used_on(capability)}
        for (block_d, _), (fwd, _) in table.items():
            assert any(n.startswith(f"attn_fwd[D={block_d},bf16,") and f"M={fwd.block_m},N={fwd.block_n},"
                       f"w={fwd.num_warps},s={fwd.num_stages}" in n for n in names), (capability, block_d, fwd)
    jobs, _ = check._discover({"attention"}, ["sm_80", "sm_90"])
    by_arch = {arch: {index for _, index, a, _ in jobs if a == arch} for arch in ("sm_80", "sm_90")}
    assert by_arch["sm_80"] != by_arch["sm_90"]


def test_aligned_variant_marks_pointers_and_integers_as_multiples_of_16():
    from bertfast.kernels import bias_gelu

    spec = next(s for s in bias_gelu.aot_specs() if s.tuned)
    attrs = check._alignment_attrs(spec.fn, spec.signature)
    marked = {spec.fn.arg_names[i] for (i,) in attrs}
    assert marked == {n for n, t in spec.signature.items() if t.startswith("*") or t in ("i32", "i64")}
    assert all(v == [["tt.divisibility", 16]] for v in attrs.values())


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

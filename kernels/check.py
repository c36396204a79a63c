"""Ahead-of-time compile check of every Triton kernel configuration, without a GPU.

    python -m bertfast.kernels.check --arch sm_80 sm_90

Imports every module of ``bertfast.kernels``, collects its ``aot_specs()`` and compiles
each spec for each architecture whose launches use it, with ``triton.compile`` (Triton IR
-> PTX -> cubin; ptxas runs, nothing is launched). Tuned specs compile twice: as odd shapes
reach them and with every pointer and integer argument a multiple of 16 (``align`` column:
the vectorised variant that BERT shapes get at run time). Prints registers, spill bytes
(ptxas -v), shared memory and the tensor-core instruction per compilation. Exits non-zero
when a module fails to import, a spec fails to compile, a compilation needs more shared
memory than the architecture gives one block (the launch would fail), or a spec marked
``tuned`` spills.

The interpreter replaces @triton.jit functions, so ``TRITON_INTERPRET`` is removed from the
environment before any kernel module is imported (and from the worker processes).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import pkgutil
import re
import sys
import tempfile
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import bertfast.kernels

_SKIP_MODULES = {"aot", "check"}  # the protocol and this tool: no kernels of their own

# Most shared memory one block may use (the opt-in maximum), by compute capability; an unlisted
# architecture gets the limit of the closest listed one below it.
SHARED_LIMIT = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448,
                100: 232448, 120: 101376}


@dataclass
class Row:
    module: str
    kernel: str
    config: str
    arch: str
    aligned: bool = False  # compiled with every pointer and integer argument a multiple of 16
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    mma: str | None = None  # the tensor-core instruction in the PTX: "wgmma" (Hopper), "mma", or "-"
    tuned: bool = True
    error: str | None = None

    @property
    def over_shared_limit(self) -> bool:
        return self.shared_bytes is not None and self.shared_bytes > shared_limit(_capability(self.arch))

    @property
    def ok(self) -> bool:
        return self.error is None and not (self.tuned and self.spill_bytes) and not self.over_shared_limit


def _split_name(name: str) -> tuple[str, str]:
    kernel, _, config = name.partition("[")
    return kernel, config.rstrip("]")


def _arch(arch: str) -> str:
    if re.fullmatch(r"sm_\d+a?", arch) is None:
        raise argparse.ArgumentTypeError(f"architecture must look like sm_80 or sm_90, got {arch!r}")
    return arch


def _capability(arch: str) -> int:
    return int(re.fullmatch(r"sm_(\d+)a?", arch).group(1))


def shared_limit(capability: int) -> int:
    known = [c for c in SHARED_LIMIT if c <= capability]
    return SHARED_LIMIT[max(known)] if known else min(SHARED_LIMIT.values())


def _alignment_attrs(fn, signature: dict[str, str]) -> dict[tuple[int], list]:
    """Triton's specialisation of pointer and integer arguments that are multiples of 16 (as a launch sees them)."""
    return {
        (fn.arg_names.index(name),): [["tt.divisibility", 16]]
        for name, ty in signature.items()
        if ty.startswith("*") or ty in ("i32", "i64", "u32", "u64")
    }


def _ptxas_usage(log: str) -> tuple[int, int]:
    """(registers, spill store + load bytes) from the ptxas -v log that Triton prints."""
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise RuntimeError(f"no ptxas -v report in the compile log: {log[-300:]!r}")
    return int(registers.group(1)), int(spills.group(1)) + int(spills.group(2))


def _tensor_core_instruction(ptx: str) -> str:
    """Which matrix instruction the kernel's dots became: sm_90 should show Hopper's wgmma."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    return "mma" if "mma.sync" in ptx else "-"


def _worker_env() -> None:
    """Compile for real (no interpreter) and make Triton print ptxas -v's report."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def _compile(module_name: str, index: int, arch: str, aligned: bool) -> Row:
    """Compile spec ``index`` of ``module_name`` for ``arch`` (runs in a worker process)."""
    _worker_env()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    spec = importlib.import_module(module_name).aot_specs()[index]
    kernel, config = _split_name(spec.name)
    row = Row(module_name.rsplit(".", 1)[-1], kernel, config, arch, aligned, tuned=spec.tuned)
    try:
        if not isinstance(spec.fn, JITFunction):
            raise TypeError(f"{spec.fn!r} is not a @triton.jit function (module imported in interpreter mode?)")
        capability = _capability(arch)
        attrs = _alignment_attrs(spec.fn, spec.signature) if aligned else None
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(spec.fn, spec.signature, spec.constants, attrs),
                target=GPUTarget("cuda", capability, 32),
                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
            )
        row.registers, row.spill_bytes = _ptxas_usage(log.getvalue())
        row.shared_bytes = compiled.metadata.shared
        row.mma = _tensor_core_instruction(compiled.asm["ptx"])
    except Exception as e:  # any failure is a row of the report, not a crash of the check
        row.error = f"{type(e).__name__}: {e}".strip().splitlines()[0][:200]
    return row


def _discover(only: set[str] | None, archs: list[str]) -> tuple[list[tuple[str, int, str, bool]], list[Row]]:
    """((module, spec index, arch, aligned) for every compilation, failure rows for modules that do not import).

    Prints one line per kernel module, so the report names every module even when it has nothing
    to compile or ``only`` leaves it out.
    """
    jobs: list[tuple[str, int, str, bool]] = []
    failures: list[Row] = []
    for info in sorted(pkgutil.iter_modules(bertfast.kernels.__path__), key=lambda m: m.name):
        if info.name in _SKIP_MODULES or info.name.startswith("_"):
            continue
        module_name = f"bertfast.kernels.{info.name}"
        try:
            module = importlib.import_module(module_name)
            specs = module.aot_specs() if hasattr(module, "aot_specs") else None
        except Exception:
            error = traceback.format_exc(limit=0).strip().splitlines()[-1][:200]
            print(f"module {info.name}: FAILED to import or list its specs")
            failures.append(Row(info.name, "(import)", "", "-", error=error))
            continue
        if specs is None:
            print(f"module {info.name}: no aot_specs (helpers only)")
        elif only is not None and info.name not in only:
            print(f"module {info.name}: {len(specs)} specs, not selected")
        else:
            print(f"module {info.name}: {len(specs)} specs")
            jobs.extend(
                (module_name, i, arch, aligned)
                for i, spec in enumerate(specs)
                for arch in archs if spec.used_on(_capability(arch))
                for aligned in ((False, True) if spec.tuned else (False,))
            )
    return jobs, failures


def _print_table(rows: list[Row]) -> None:
    header = ("module", "kernel", "config", "arch", "align", "regs", "spills", "smem", "mma", "status")
    lines = []
    for r in rows:
        if r.error is not None:
            status = f"FAIL {r.error}"
        elif r.over_shared_limit:
            status = f"FAIL needs more than the {shared_limit(_capability(r.arch))} bytes of shared memory of {r.arch}"
        elif r.spill_bytes:
            status = "FAIL spills in a tuned config" if r.tuned else "ok (spills, untuned)"
        else:
            status = "ok" if r.tuned else "ok (untuned)"
        lines.append((
            r.module, r.kernel, r.config, r.arch, "16" if r.aligned else "-",
            "-" if r.registers is None else str(r.registers),
            "-" if r.spill_bytes is None else str(r.spill_bytes),
            "-" if r.shared_bytes is None else str(r.shared_bytes),
            r.mma or "-",
            status,
        ))
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header) - 1)]
    for line in [header, *lines]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True)) + "  " + line[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bertfast.kernels.check", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", type=_arch, default=["sm_80", "sm_90"], help="e.g. sm_80 sm_90")
    parser.add_argument("--modules", nargs="+", help="compile only these kernel modules (default: all)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    args = parser.parse_args(argv)
    _worker_env()

    tasks, rows = _discover(set(args.modules) if args.modules else None, args.arch)
    # A fresh cache makes every compilation run ptxas (a cache hit would print no report); spawned
    # workers import the kernel modules afresh, in processes that never saw TRITON_INTERPRET.
    with tempfile.TemporaryDirectory(prefix="bertfast-aot-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_compile, *task) for task in tasks]
            for (module, index, arch, _), future in zip(tasks, futures, strict=True):
                try:
                    rows.append(future.result())
                except Exception as e:  # a worker that died (e.g. a crash inside the compiler)
                    error = f"{type(e).__name__}: {e}"
                    rows.append(Row(module.rsplit(".", 1)[-1], f"spec {index}", "", arch, error=error))
    print()
    _print_table(rows)
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} compilations ok, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

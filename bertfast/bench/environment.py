"""What a run was measured on: device, threads, load, versions, commit, and the device's measured peaks."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

from bertfast.bench.timing import Clock, Plan

ENV_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "TRITON_INTERPRET",
            "BERTFAST_BACKEND", "CUDA_VISIBLE_DEVICES")  # settings that change what a run measures
PACKAGES = ("bertfast", "torch", "triton", "transformers", "onnxruntime", "openvino", "ctranslate2", "liger-kernel",
            "flash-attn", "numpy")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags (Linux), empty where they cannot be read."""
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return set()
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_commit() -> str | None:
    """The commit of the bertfast source tree this runs from (None for an installed wheel)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def describe(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions(),
        "commit": git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "environment_variables": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        flags = cpu_flags()
        env["cpu_features"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16",
                                             "amx_int8", "amx_tile"})
    return env


def measure_peaks(device: torch.device, quick: bool) -> dict[str, float]:
    """The GPU's measured peaks: copy bandwidth (GB/s) and dense matmul throughput (TFLOP/s) per dtype.

    These are what the reports' "% peak" columns divide by: what this device reaches on a plain
    copy and on a large square GEMM, not the datasheet's numbers.
    """
    clock = Clock(device)
    plan = Plan(warmup=1, reps=2 if quick else 5, rounds=1)
    src = torch.empty(2**28 // (16 if quick else 1), dtype=torch.float32, device=device)  # 1 GB
    dst = torch.empty_like(src)
    copy = clock.compare({"copy": lambda: dst.copy_(src)}, plan)["copy"]
    peaks = {"bandwidth_gbps": 2 * src.numel() * 4 / (copy.median_ms * 1e-3) / 1e9}
    n = 8192 // (4 if quick else 1)
    for name, dtype in {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.items():
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        gemm = clock.compare({"mm": lambda a=a, b=b: a @ b}, plan)["mm"]
        peaks[f"{name}_tflops"] = 2 * n**3 / (gemm.median_ms * 1e-3) / 1e12
    return peaks

"""MLM + NSP pretraining head, forward + backward: every position vs the masked rows vs the fused loss."""

from __future__ import annotations

import ctypes
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bertfast import ops
from bertfast.bench.families.layernorm_family import under_backend
from bertfast.bench.suite import Context, Entry, Group

TITLE = "MLM head"
NOTES = """\
Head baselines, on the same sequence output, pooled output and labels (15% of positions masked; the
masked positions' indices are computed once, outside the timed step, as a data loader would), each a
forward + backward step: `all-positions` is transformers' BertPreTrainingHeads (transform + decoder
over every position, then cross-entropy with ignore_index, what transformers' BertForPreTraining
does); `masked-torch` plain PyTorch on the masked rows only; `masked-compile` that under
`torch.compile`; `bertfast` gathers the masked rows and runs bertfast's fused linear cross-entropy
(`bertfast.ops.linear_cross_entropy`: the Triton kernel on a GPU, the chunked version on a CPU);
`liger` is Liger-Kernel's fused linear cross-entropy in its place (GPU, where installed).

The `linear_cross_entropy` sections time the op alone (reference, reference under `torch.compile`,
bertfast), with TFLOP/s of its three matmuls. `peak_mb` is what a step allocates beyond its inputs
and parameters (on a CPU: peak resident memory, with large allocations returned to the OS at once so
that it follows the live tensors).
"""

IGNORE = -100
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


class PeakMemory:
    """Bytes a step allocates beyond what exists before it: CUDA allocator stats, or on a CPU the
    process's peak resident set (reset through /proc/self/clear_refs)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.libc = None
        if device.type == "cpu" and Path("/proc/self/clear_refs").exists():
            try:
                self.libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self.libc = None

    @staticmethod
    def _proc_status(key: str) -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024

    def measure(self, step: Callable[[], None]) -> float | None:
        """Peak MB above the starting point while ``step`` runs (None where it cannot be read)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        if self.libc is None:
            return None
        # Allocations above 1 MB are mmap-ed while measuring, so that freeing a tensor lowers the
        # resident set at once, and malloc's cached free pages are handed back first.
        self.libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
        self.libc.malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set to the current one
        except OSError:
            self.libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
            return None
        base = self._proc_status("VmRSS")
        step()
        peak = self._proc_status("VmHWM") - base
        self.libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        return peak / 2**20


def _liger_loss() -> Callable | None:
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    module = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)

    def loss(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled("cuda"):  # its matmuls take one dtype, as bertfast's op casts itself
            dtype = torch.get_autocast_dtype("cuda")
            x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
        return module(weight, x, labels, bias)

    return loss


def _training_step(loss_step: Callable[[], torch.Tensor], leaves: list[torch.Tensor], device: torch.device,
                   autocast: torch.dtype | None) -> Callable[[], float]:
    def step() -> float:
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = loss_step()
        loss.backward()
        for t in leaves:
            t.grad = None
        return loss.detach()
    return step


def _entries(steps: dict[str, Callable[[], torch.Tensor]], leaves: list, device: torch.device,
             autocast: torch.dtype | None) -> dict[str, Entry | str]:
    memory = PeakMemory(device)
    entries: dict[str, Entry | str] = {}
    for name, loss_step in steps.items():
        step = _training_step(loss_step, leaves, device, autocast)
        try:
            loss = float(step())
        except Exception as e:  # torch.compile without a working toolchain, Liger on odd shapes
            entries[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
            continue
        entries[name] = Entry({"fwd+bwd": step}, {"loss": loss},
                              probe=lambda step=step: {"peak_mb": memory.measure(step)})
    return entries


def _head_group(batch: int, seq: int, hidden: int, vocab: int, dtype: str, ctx: Context) -> Group:
    n_masked = round(0.15 * batch * seq)
    names = ("all-positions", "masked-torch", *(("masked-compile",) if ctx.compile else ()), "bertfast",
             *(("liger",) if ctx.on_gpu else ()))
    autocast = None if dtype == "fp32" else {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]

    def build() -> dict[str, Entry | str]:
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertPreTrainingHeads

        device = ctx.device
        torch.manual_seed(0)
        heads = BertPreTrainingHeads(BertConfig(hidden_size=hidden, vocab_size=vocab)).to(device).train()
        g = torch.Generator().manual_seed(0)
        sequence = torch.randn(batch, seq, hidden, generator=g).to(device).requires_grad_()
        pooled = torch.randn(batch, hidden, generator=g).to(device).requires_grad_()
        masked = torch.randperm(batch * seq, generator=g)[:n_masked].sort().values
        labels = torch.full((batch * seq,), IGNORE)
        labels[masked] = torch.randint(0, vocab, (n_masked,), generator=g)
        labels, masked = labels.to(device), masked.to(device)
        masked_labels = labels[masked]
        nsp = torch.randint(0, 2, (batch,), generator=g).to(device)
        decoder = heads.predictions.decoder

        def nsp_loss() -> torch.Tensor:
            return F.cross_entropy(heads.seq_relationship(pooled), nsp)

        def rows() -> torch.Tensor:
            return sequence.reshape(-1, hidden).index_select(0, masked)

        def all_positions() -> torch.Tensor:
            scores, nsp_scores = heads(sequence, pooled)
            return F.cross_entropy(scores.view(-1, vocab), labels) + F.cross_entropy(nsp_scores, nsp)

        def masked_torch() -> torch.Tensor:
            return F.cross_entropy(heads.predictions(rows()), masked_labels) + nsp_loss()

        def with_loss(loss_fn: Callable) -> Callable[[], torch.Tensor]:
            def step() -> torch.Tensor:
                x = heads.predictions.transform(rows())
                loss = loss_fn(x, decoder.weight, decoder.bias, masked_labels)
                return (loss[0] if isinstance(loss, tuple) else loss) + nsp_loss()
            return step

        steps = {"all-positions": all_positions, "masked-torch": masked_torch}
        if ctx.compile:
            steps["masked-compile"] = torch.compile(masked_torch)
        steps["bertfast"] = with_loss(ops.linear_cross_entropy)
        liger = _liger_loss() if ctx.on_gpu else None
        if liger is not None:
            steps["liger"] = with_loss(liger)
        entries = _entries(steps, [sequence, pooled, *heads.parameters()], device, autocast)
        if ctx.on_gpu and liger is None:
            entries["liger"] = "liger-kernel is not installed"
        return entries

    return Group("head", f"{batch}x{seq}, hidden {hidden}, vocab {vocab}, {n_masked} masked, {dtype}",
                 batch * seq, "positions", names, build, ("fwd+bwd",), dtype=dtype, subject="bertfast",
                 info={"series": f"hidden {hidden} {dtype}"})


def _op_group(n_rows: int, hidden: int, vocab: int, dtype: str, ctx: Context) -> Group:
    names = ("reference", *(("reference-compile",) if ctx.compile else ()), "bertfast")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]

    def build() -> dict[str, Entry | str]:
        g = torch.Generator().manual_seed(0)
        device = ctx.device
        x = torch.randn(n_rows, hidden, generator=g).to(device, torch_dtype).requires_grad_()
        weight = (0.02 * torch.randn(vocab, hidden, generator=g)).to(device, torch_dtype).requires_grad_()
        bias = torch.zeros(vocab, device=device, dtype=torch_dtype, requires_grad=True)
        labels = torch.randint(0, vocab, (n_rows,), generator=g).to(device)
        # Every row is the model's entry, bertfast.ops.linear_cross_entropy; the reference rows force its
        # torch backend.
        entry = ops.linear_cross_entropy
        fns = {"reference": under_backend("torch", entry), "bertfast": entry}
        if ctx.compile:
            fns["reference-compile"] = under_backend("torch", torch.compile(entry))
        steps = {name: (lambda f=f: f(x, weight, bias, labels)[0]) for name, f in fns.items()}
        return _entries(steps, [x, weight, bias], device, None)

    return Group("linear_cross_entropy", f"{n_rows} rows, hidden {hidden}, vocab {vocab}, {dtype}", n_rows, "rows",
                 names, build, ("fwd+bwd",), {"fwd+bwd": 3 * 2 * n_rows * hidden * vocab}, "TFLOP/s", dtype,
                 "bertfast", info={"series": f"hidden {hidden} {dtype}"})


def groups(ctx: Context) -> list[Group]:
    if ctx.quick:
        return [_head_group(2, 16, 32, 256, "fp32", ctx), _op_group(16, 32, 256, "fp32", ctx)]
    hidden, vocab = 768, 30522
    if ctx.on_gpu:
        heads = [_head_group(b, s, hidden, vocab, "bf16", ctx) for b, s in ((32, 128), (8, 512))]
        return heads + [_op_group(n, hidden, vocab, "bf16", ctx) for n in (614, 4915)]
    heads = [_head_group(b, s, hidden, vocab, "fp32", ctx) for b, s in ((8, 128), (2, 512))]
    return heads + [_op_group(614, hidden, vocab, "fp32", ctx)]

"""The LayerNorm-GELU family: forward, backward and both, bertfast against the eager and compiled reference."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bertfast import ops
from bertfast.bench.suite import Context, Entry, Group

TITLE = "LayerNorm-GELU family"
NOTES = """\
Ops as BERT runs them in training (dropout p = 0.1 where the op has one): `embeddings`
(dropout(LayerNorm(word[ids] + position[pos] + type[tt]))), `bias_gelu` (gelu(x + bias) on the
(tokens, 4 * hidden) intermediate), `bias_dropout_add_layernorm` (LayerNorm(dropout(x + bias) +
residual)), `bias_gelu_layernorm` (LayerNorm(gelu(x + bias))).

Baselines: `bertfast[<backend>]` is the op as bertfast dispatches it (Triton on a GPU; on a CPU the
native C++ kernel where there is one, else the reference, as the label says); `bertfast[triton]` on a
CPU is the same entry with the Triton backend forced, run by the interpreter (a correctness path, not a
speed); `reference` is the same entry with the `torch` backend forced (`bertfast.ops.use_backend`: the
plain-PyTorch reference, eager); `reference-compile` is it under `torch.compile`. Every row calls the
entry the model calls, `bertfast.ops.<op>`.
GB/s count the bytes an ideal fused kernel must move, in (tokens, width) tensors: embeddings 2 forward
(gathered word rows, output) and 2 backward plus the dense word-table gradient; bias_gelu 2 / 3;
bias_dropout_add_layernorm 3 / 5; bias_gelu_layernorm 2 / 3. "% peak" is of the device's measured
copy bandwidth.
"""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPS = ("embeddings", "bias_gelu", "bias_dropout_add_layernorm", "bias_gelu_layernorm")
VOCAB, MAX_POSITIONS, TYPES, DROPOUT, EPS = 30522, 512, 2, 0.1, 1e-12
TRAFFIC = {  # (forward, backward) tensors of (tokens, width) an ideal kernel moves
    "embeddings": (2, 2),
    "bias_gelu": (2, 3),
    "bias_dropout_add_layernorm": (3, 5),
    "bias_gelu_layernorm": (2, 3),
}
MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass
class Case:
    """One op at one shape: the tensors to differentiate and how to call an implementation on them."""

    family: str
    tokens: int
    hidden: int
    dtype: torch.dtype
    inputs: list[torch.Tensor]
    call: Callable[[Callable], torch.Tensor]
    vocab: int = VOCAB

    @property
    def width(self) -> int:
        return 4 * self.hidden if self.family == "bias_gelu" else self.hidden

    def bytes_moved(self, mode: str) -> float:
        return traffic_bytes(self.family, self.tokens, self.hidden, self.dtype, self.vocab)[mode]


def traffic_bytes(op: str, tokens: int, hidden: int, dtype: torch.dtype, vocab: int = VOCAB) -> dict[str, float]:
    """Bytes an ideal fused kernel moves per mode (see NOTES)."""
    element = torch.finfo(dtype).bits // 8
    width = 4 * hidden if op == "bias_gelu" else hidden
    fwd, bwd = TRAFFIC[op]
    table = vocab * hidden if op == "embeddings" else 0  # the dense word-table gradient
    return {"fwd": fwd * tokens * width * element, "bwd": (bwd * tokens * width + table) * element,
            "fwd+bwd": ((fwd + bwd) * tokens * width + table) * element}


def make_case(family: str, tokens: int, hidden: int, dtype: torch.dtype, device: torch.device,
              vocab: int = VOCAB) -> Case:
    def param(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()

    if family == "embeddings":
        ids = torch.randint(0, vocab, (tokens,), device=device)
        positions = torch.arange(tokens, device=device) % 128  # sequences of 128 tokens
        types = (positions >= 64).long()
        inputs = [param(vocab, hidden), param(MAX_POSITIONS, hidden), param(TYPES, hidden),
                  param(hidden, scale=0.1), param(hidden, scale=0.1)]
        return Case(family, tokens, hidden, dtype, inputs, lambda fn: fn(
            ids, positions, types, *inputs, EPS, DROPOUT, True, padding_idx=0), vocab)
    if family == "bias_gelu":
        inputs = [param(tokens, 4 * hidden), param(4 * hidden)]
        return Case(family, tokens, hidden, dtype, inputs, lambda fn: fn(*inputs))
    if family == "bias_dropout_add_layernorm":
        inputs = [param(tokens, hidden), param(hidden), param(tokens, hidden), param(hidden), param(hidden)]
        return Case(family, tokens, hidden, dtype, inputs, lambda fn: fn(*inputs, EPS, DROPOUT, True))
    inputs = [param(tokens, hidden), param(hidden), param(hidden), param(hidden)]
    return Case(family, tokens, hidden, dtype, inputs, lambda fn: fn(*inputs, EPS))


def mode_fns(case: Case, impl: Callable) -> dict[str, Callable[[], object]]:
    y = case.call(impl)
    dy = torch.randn_like(y)
    return {
        "fwd": lambda: case.call(impl),
        "bwd": lambda: torch.autograd.grad(y, case.inputs, dy, retain_graph=True),
        "fwd+bwd": lambda: torch.autograd.grad(case.call(impl), case.inputs, dy),
    }


def dispatched_name(op: str, like: torch.Tensor) -> str:
    """bertfast[<backend>] as the op layer would pick it for tensors like ``like``."""
    pick = getattr(ops, "implementation", None)
    return f"bertfast[{pick(op, like)[0]}]" if pick else "bertfast"


def under_backend(backend: str, fn: Callable) -> Callable:
    def call(*args, **kwargs):
        with ops.use_backend(backend):
            return fn(*args, **kwargs)
    return call


def _group(op: str, tokens: int, hidden: int, dtype_name: str, ctx: Context) -> Group:
    vocab = 256 if ctx.quick else VOCAB
    like = torch.empty(0, device=ctx.device)
    subject = dispatched_name(op, like)
    names = [subject]
    if ctx.interpreted_triton and subject != "bertfast[triton]":
        names.append("bertfast[triton]")
    names.append("reference")
    if ctx.compile:
        names.append("reference-compile")

    def build() -> dict[str, Entry | str]:
        torch.manual_seed(0)
        case = make_case(op, tokens, hidden, DTYPES[dtype_name], ctx.device, vocab)
        entry = getattr(ops, op)
        impls: dict[str, Callable] = {subject: entry, "reference": under_backend("torch", entry)}
        if "bertfast[triton]" in names:
            impls["bertfast[triton]"] = under_backend("triton", entry)
        if ctx.compile:
            impls["reference-compile"] = under_backend("torch", torch.compile(entry))
        return {name: Entry(mode_fns(case, fn), {"interpreted": True} if name == "bertfast[triton]" and not ctx.on_gpu
                            else {}) for name, fn in impls.items()}

    work = traffic_bytes(op, tokens, hidden, DTYPES[dtype_name], vocab)
    return Group(op, f"{tokens}x{hidden} {dtype_name}", tokens, "tokens", tuple(names), build, MODES, work,
                 "GB/s", dtype_name, subject, info={"series": f"hidden {hidden} {dtype_name}"})


def shapes(ctx: Context) -> tuple[list[tuple[int, int]], list[str]]:
    if ctx.quick:
        return [(8, 32)], ["fp32"]
    if ctx.on_gpu:
        return [(t, h) for h in (768, 1024) for t in (4096, 16384, 65536)], ["bf16", "fp32"]
    return [(256, 768), (1024, 768)], ["fp32"]


def groups(ctx: Context) -> list[Group]:
    token_hidden, dtypes = shapes(ctx)
    return [_group(op, tokens, hidden, dtype, ctx) for op in OPS for dtype in dtypes for tokens, hidden in token_hidden]

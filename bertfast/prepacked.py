"""Inference on prepacked weights: each dense layer's weight packed once into oneDNN's layout.

A served model calls the same weights again and again; oneDNN's matmul is fastest on a weight laid out in its
own blocked format, which costs a reorder per call when the weight comes as a plain tensor. Here the reorder
happens once: on a layer's first inference call, its weights are packed and cached on the module (float32 and
bf16 with ``mkldnn::_reorder_linear_weight``, int8 with ``onednn::qlinear_prepack``), and every later call runs
the native ops on the packed copies:

* ``bertfast::linear``: one dense layer, its bias and GELU fused (:func:`linear`);
* ``bertfast::encoder_layer``: a whole BERT encoder layer (qkv, attention, output, add+LayerNorm, the feed-forward
  block) in one native call, so that no Python runs between its ops (:func:`encoder_layer`).

The cache follows the rule of the q/k/v concatenation's cache (``bertfast.modules``): it is keyed by each source
tensor's storage, version counter and dtype, so replacing a weight or changing it in place repacks it, and every
training-mode forward drops it. Calls that record autograd, run under ``torch.compile`` (whose graph holds its own
weights; Inductor's freezing packs them) or on another device take the module path instead.

:class:`Int8Linear` is the int8 dense layer (``bertfast.for_cpu_inference(model, "int8")``): int8 weights with a
scale per output channel, activations quantized per token in the native op.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from bertfast.padding import Packing

CACHE_KEY = "_bertfast_prepacked"  # where a module keeps its packed weights, in its __dict__


class _PackedWeights(dict):
    """A module's packed weights by name. oneDNN's opaque tensors have no storage to deep-copy or pickle, and a
    copied or saved module must not carry them anyway: a copy starts empty and repacks on its first call."""

    def __deepcopy__(self, memo: dict) -> _PackedWeights:
        return _PackedWeights()

    def __reduce__(self):
        return _PackedWeights, ()


@functools.cache
def native_available() -> bool:
    """Whether bertfast's native library (and with it ``bertfast::linear``) is loaded."""
    try:
        import bertfast.ops.native  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "bertfast._C":
            raise
        return False
    return torch.backends.mkldnn.is_available()


@functools.cache
def int8_weight_levels() -> int:
    """The int8 weights' levels: 127 where oneDNN's int8 product on this CPU is exact for full-range weights, 64
    where it is not.

    VNNI and AMX add u8 x s8 products straight into int32. Without them (AVX2), vpmaddubsw adds pairs of
    products into 16 bits first, saturating: 255 * 127 * 2 does not fit, 255 * 64 * 2 does. Which instructions
    oneDNN uses depends on the CPU and on its environment (``ONEDNN_MAX_CPU_ISA``), so this asks oneDNN: one
    product at the worst case, compared with the exact sum.
    """
    k = 64
    weight = torch.ops.onednn.qlinear_prepack(torch.full((1, k), 127, dtype=torch.int8), None)
    x = torch.full((1, k), 255, dtype=torch.uint8)  # +127 after the zero point 128
    product = torch.ops.onednn.qlinear_pointwise(x, 1.0, 128, weight, torch.ones(1), torch.zeros(1, dtype=torch.long),
                                                 None, 1.0, 0, torch.float32, "none", [], "")
    return 127 if product.item() == 127 * 127 * k else 64


def quantize_weight(weight: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """(out, in) float weight -> (int8 weight in [-levels, levels], float32 scale per output channel)."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / levels
    return torch.round(weight / scale[:, None]).to(torch.int8), scale


class Int8Linear(nn.Module):
    """A Linear layer computed in int8: per-output-channel int8 weights, activations quantized per token.

    Each row (token) of the input gets its own scale, so one token's outlier features do not flatten the
    others' resolution, as a per-tensor scale does: on MiniLM-L6 that is the difference between a
    sentence-embedding cosine of 0.96 (``torch.ao`` dynamic quantization) and 0.99. The products accumulate
    exactly in int32 (the weight's levels are chosen for the CPU: :func:`int8_weight_levels`); the output is fp32
    (or the input's dtype).
    """

    def __init__(self, linear: nn.Linear, levels: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.levels = int8_weight_levels() if levels is None else levels
        weight, scale = quantize_weight(linear.weight, self.levels)
        self.register_buffer("weight_int8", weight)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        if packable(rows):
            y = linear(self, rows)
        else:
            y = int8_linear_reference(rows, self.weight_int8, self.weight_scale, self.bias)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"levels={self.levels}")


def int8_linear_reference(x: Tensor, weight_int8: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """What ``bertfast::linear`` computes for an int8 weight, in plain PyTorch: x quantized per row (round half
    to even, [-127, 127]), the integer product exact (float64 holds it), then both scales and the bias."""
    x = x.float()
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    q = torch.round(x * (1.0 / scale))
    y = (q.double() @ weight_int8.double().t()).float() * weight_scale * scale
    return y if bias is None else y + bias


@functools.cache
def bf16_packable() -> bool:
    """Whether oneDNN packs bf16 weights on this CPU (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT; asked, since
    ``ONEDNN_MAX_CPU_ISA`` may hold it below what the CPU has)."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), None)
    except RuntimeError:
        return False
    return True


def packable(x: Tensor, *modules: nn.Module) -> bool:
    """Whether a call on activations ``x`` through ``modules`` runs the prepacked native path: CPU float32, or
    bf16 where oneDNN packs it, nothing recorded for autograd, not traced by ``torch.compile``."""
    if torch.compiler.is_compiling():  # first: dynamo must not trace the cached library checks
        return False
    if not native_available() or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if x.dtype == torch.bfloat16 and not bf16_packable():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for m in modules for p in m.parameters())):
        return False
    return True


PackedWeight = tuple[Tensor, Tensor | None, Tensor | None]  # (packed weight, int8 weight scale or None, bias)


def _source_tensors(linears: Sequence[nn.Module]) -> list[Tensor]:
    tensors = []
    for lin in linears:
        if isinstance(lin, Int8Linear):
            tensors += [lin.weight_int8, lin.weight_scale]
        else:
            tensors.append(lin.weight)
        if lin.bias is not None:
            tensors.append(lin.bias)
    return tensors


def _pack(linears: Sequence[nn.Module], dtype: torch.dtype) -> PackedWeight:
    """The packed concatenation of ``linears`` (one layer, or q, k and v side by side) for activations of ``dtype``."""
    biases = [lin.bias for lin in linears]
    bias = None if any(b is None for b in biases) else torch.cat(biases).to(dtype)
    if isinstance(linears[0], Int8Linear):
        weight = torch.cat([lin.weight_int8 for lin in linears])
        scale = torch.cat([lin.weight_scale for lin in linears]).float().contiguous()
        return torch.ops.onednn.qlinear_prepack(weight, None), scale, None if bias is None else bias.float()
    weight = torch.cat([lin.weight.detach() for lin in linears]).to(dtype).contiguous()
    return torch.ops.mkldnn._reorder_linear_weight(weight, None), None, bias


def cached(owner: nn.Module, name: str, tensors: Sequence[Tensor], build: Callable[[], object]) -> object:
    """``build()``, cached on ``owner`` under ``name`` until one of ``tensors`` is replaced or modified in place."""
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    store = owner.__dict__.setdefault(CACHE_KEY, _PackedWeights())
    entry = store.get(name)
    if entry is None or entry[0] != key:
        with torch.no_grad():
            entry = (key, build())
        store[name] = entry
    return entry[1]


def drop_cache(owner: nn.Module) -> None:
    """Forget ``owner``'s packed weights (a training forward calls this: an optimizer step may follow)."""
    owner.__dict__.pop(CACHE_KEY, None)


def packed_weight(owner: nn.Module, name: str, linears: Sequence[nn.Module], dtype: torch.dtype) -> PackedWeight:
    """The packed weight of ``linears`` (concatenated along the outputs) for activations of ``dtype``, cached."""
    return cached(owner, f"{name}:{dtype}", _source_tensors(linears), lambda: _pack(linears, dtype))


def linear(module: nn.Module, x: Tensor, activation: str = "none") -> Tensor:
    """activation(module(x)) on the module's packed weight: ``module`` an ``nn.Linear`` or :class:`Int8Linear`,
    ``x`` (rows, in) with :func:`packable` true; ``activation`` "none", "gelu" or "gelu_tanh"."""
    if not native_available():
        raise RuntimeError("prepacked inference needs bertfast's native library (bertfast/_C.so), which is not built")
    weight, scale, bias = packed_weight(module, "weight", (module,), x.dtype)
    return torch.ops.bertfast.linear(x, weight, scale, bias, activation)


def dense(module: nn.Module, x: Tensor, training: bool) -> Tensor:
    """``module(x)``, on its packed weight where :func:`linear` serves the call (an inference call of a plain
    ``nn.Linear`` or an :class:`Int8Linear` on (rows, in) activations that :func:`packable` accepts). A training
    call drops the packed weight: an optimizer step may follow."""
    if training:
        drop_cache(module)
    elif type(module) in (nn.Linear, Int8Linear) and x.dim() == 2 and packable(x, module):
        return linear(module, x)
    return module(x)


# The GELU forms of bertfast.modules.gelu_form, as bertfast::linear names them.
ACTIVATIONS = {"none": "gelu", "tanh": "gelu_tanh"}


def encoder_layer(
    owner: nn.Module, hidden: Tensor, packing: Packing, linears: Sequence[Sequence[nn.Module]],
    norms: tuple[nn.LayerNorm, nn.LayerNorm], gelu: str, heads: int, head_dim: int, scale: float | None = None,
    **attention: Tensor | None,
) -> Tensor:
    """One encoder layer in one native call. ``linears``: the q, k and v projections, then the attention output,
    the up and the down projection (one module each), all with biases; ``norms`` the two LayerNorms; ``gelu``
    the up projection's GELU form ("none" for erf, "tanh"); ``scale`` the scores' (default 1 / sqrt(head_dim));
    ``attention``: what the layer's attention adds to its scores, as ``bertfast::encoder_layer`` names it
    (``attention_bias``; ``pos_key``, ``pos_query``, ``pos_index``); ``owner`` holds the packed weights."""
    dtype = hidden.dtype
    # One cache entry (and one key) for the layer's four packed weights: a served model checks it every call.
    weights, scales, biases = cached(owner, f"layer:{dtype}", _source_tensors([lin for g in linears for lin in g]),
                                     lambda: tuple(zip(*(_pack(group, dtype) for group in linears), strict=True)))
    vectors = [biases[0], biases[1], norms[0].weight, norms[0].bias, biases[2], biases[3], norms[1].weight,
               norms[1].bias]
    return torch.ops.bertfast.encoder_layer(
        hidden, packing.cu_seqlens, packing.max_seqlen, list(weights), list(scales), vectors, heads,
        head_dim ** -0.5 if scale is None else scale, [norms[0].eps, norms[1].eps], ACTIVATIONS[gelu], **attention)

"""End to end: a pretraining step and the encoder's forward, bertfast vs transformers on the same weights."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable

import torch

from bertfast.bench.suite import Context, Entry, Group

TITLE = "Model: pretraining step and encoder forward"
NOTES = """\
A training step is forward + backward of BertForPreTraining with MLM (15% of the real tokens) and
NSP labels; the encoder forward is BertModel in eval mode under `torch.no_grad`, the drop-in case of
a transformers user who swaps the model. Both models hold the same weights (bertfast's, saved and
loaded by transformers); lengths are uniform in 50-100% of the sequence length, as in real batches,
and tokens/s count real (non-padding) tokens. Baselines: `bertfast`, `transformers (sdpa)`, and, with
compilation on, `bertfast + torch.compile` and `transformers + torch.compile` (each compile's time, the
first call, is reported apart as `compile_s` and is not in the timings). Under bf16 both run in autocast.
"""

AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_batch(batch: int, seq: int, vocab: int, device: torch.device, ragged: bool = True
               ) -> tuple[dict[str, torch.Tensor], int]:
    """A pretraining batch (ids, mask, types, MLM and NSP labels) and its number of real tokens."""
    g = torch.Generator().manual_seed(0)
    low = seq // 2 if ragged else seq
    lengths = torch.randint(low, seq + 1, (batch,), generator=g)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    types = ((torch.arange(seq)[None, :] >= lengths[:, None] // 2) & mask.bool()).long()
    chosen = (torch.rand(batch, seq, generator=g) < 0.15) & mask.bool()
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    nsp = torch.randint(0, 2, (batch,), generator=g)
    tensors = dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels, next_sentence_label=nsp)
    return {k: v.to(device) for k, v in tensors.items()}, int(mask.sum())


def model_pair(config_overrides: dict, preset: str, device: torch.device):
    """(bertfast BertForPreTraining, transformers BertForPreTraining) with the same weights, in train mode."""
    import transformers

    import bertfast

    torch.manual_seed(0)
    config = bertfast.BertConfig.from_preset(preset, **config_overrides)
    ours = bertfast.BertForPreTraining(config)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        theirs = transformers.BertForPreTraining.from_pretrained(tmp, attn_implementation="sdpa")
    return ours.to(device).train(), theirs.to(device).train()


def _step(model, inputs: dict, device: torch.device, dtype: torch.dtype | None, train: bool) -> Callable[[], None]:
    def run() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            if train:
                model(**inputs).loss.backward()
            else:
                with torch.no_grad():
                    model(**inputs)
        if train:
            model.zero_grad(set_to_none=True)
    return run


def _group(kind: str, preset: str, overrides: dict, batch: int, seq: int, dtype: str, ctx: Context) -> Group:
    train = kind == "training step"
    compiled = ("bertfast + torch.compile", "transformers + torch.compile") if ctx.compile else ()
    names = ("bertfast", "transformers (sdpa)", *compiled)
    vocab = overrides.get("vocab_size", 30522)
    inputs, real_tokens = make_batch(batch, seq, vocab, torch.device("cpu"))

    def build() -> dict[str, Entry | str]:
        ours, theirs = model_pair(overrides, preset, ctx.device)
        batch_inputs = {k: v.to(ctx.device) for k, v in inputs.items()}
        if not train:
            ours, theirs = ours.bert.eval(), theirs.bert.eval()
            batch_inputs = {k: batch_inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        models = {"bertfast": ours, "transformers (sdpa)": theirs}
        if ctx.compile:
            torch._dynamo.reset()  # each model compiles afresh, far from dynamo's recompile limit
            models["bertfast + torch.compile"] = torch.compile(ours)
            models["transformers + torch.compile"] = torch.compile(theirs)
        entries = {}
        for name, model in models.items():
            step = _step(model, batch_inputs, ctx.device, AMP[dtype], train)
            info = {}
            if name.endswith("torch.compile"):
                start = time.perf_counter()
                step()  # the compile
                info["compile_s"] = round(time.perf_counter() - start, 1)
            entries[name] = Entry({kind: step}, info=info)
        return entries

    shape = f"{preset}, {batch} x <={seq} ({real_tokens} real tokens), {dtype}"
    return Group(kind, shape, batch * seq, "padded tokens", names, build, (kind,), {kind: real_tokens}, "tokens/s",
                 dtype, "bertfast", info={"series": f"{preset} seq {seq} {dtype}"})


def groups(ctx: Context) -> list[Group]:
    if ctx.quick:
        tiny = dict(vocab_size=256, hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2)
        return [_group(kind, "tiny", tiny, 2, 16, "fp32", ctx) for kind in ("training step", "encoder forward")]
    if ctx.on_gpu:
        return [_group(kind, "base", {}, b, s, "bf16", ctx) for kind in ("training step", "encoder forward")
                for b, s in ((32, 128), (8, 512))]
    return [_group("training step", "mini", {}, 8, 128, "fp32", ctx)] + [
        _group("encoder forward", "mini", {}, b, 128, "fp32", ctx) for b in (8, 32)]

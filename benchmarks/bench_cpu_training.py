"""CPU training steps (forward + backward, dropout as configured), interleaved rounds, median per arm.

1. Masked LM on a skewed batch, one 512-token row and fifteen 32-token rows, against the same rows run as
   two unpadded batches (the 512-token row alone, then the fifteen 32-token rows): packing should cost
   the real tokens only, so the ratio should be near 1.
2. Pretraining (MLM + NSP) on a ragged batch of 16 x <=128 (lengths uniform in 64-128), against
   transformers' BertForPreTraining (SDPA) with the same weights.

In both, "padded attention (previous)" is bertfast with the previous CPU training attention: the
reference's padded (batch, heads, longest, longest) layout with the native dropout on the probabilities.

3. Sliding-window attention (ModernBERT's local layers: 12 x 64 heads, window +-64), forward + backward of
   ops.attention on one 1024- and one 2048-token row: a window costs what it holds, so doubling the row
   should double the time (quadratic would be 4x); the reference (a dense band mask) beside it.
4. The drop-in: DistilBERT-base and MPNet-base (random weights, real sizes), masked LM on 16 x <=128 ragged
   rows, transformers' model against the same model through bertfast.accelerate.

Run: python benchmarks/bench_cpu_training.py [--threads 2] [--rounds 5]"""

from __future__ import annotations

import argparse
import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
import transformers

import bertfast
from bertfast import BertConfig, BertForMaskedLM, ops
from bertfast.bench.families.model import make_batch, model_pair
from bertfast.bench.timing import Clock, Plan
from bertfast.common import dropout as policy
from bertfast.ops import dispatch, native, reference

LENGTHS = [512] + [32] * 15


def rows(lengths: list[int], vocab: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, vocab, (len(lengths), max(lengths)), generator=generator)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    labels = torch.where((torch.rand(ids.shape, generator=generator) < 0.15) & mask.bool(), ids, -100)
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def split(batch: dict[str, torch.Tensor], index: list[int]) -> dict[str, torch.Tensor]:
    """Rows ``index`` of the batch, cut to their own longest row."""
    part = {k: v[index] for k, v in batch.items()}
    width = int(part["attention_mask"].sum(1).max())
    return {k: v[:, :width] for k, v in part.items()}


def padded_attention(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, training=False, softmax_scale=None,
                     bias_table=None, num_buckets=32, max_distance=128, window=None, columns=None):
    """The previous native training path: the reference's padded attention, native dropout on P."""
    if not (training and dropout_p > 0.0):
        return reference.attention(qkv, cu_seqlens, max_seqlen, dropout_p, training, softmax_scale, bias_table,
                                   num_buckets, max_distance, window, columns)
    seed = policy.draw_seed(qkv.device)
    return reference.attention_with_dropout(
        qkv, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
        lambda probs, ids: native._dropout_op(probs, seed, dropout_p, ids), bias_table, num_buckets, max_distance,
        window, columns)


@contextlib.contextmanager
def attention_backend(fn: Callable) -> Iterator[None]:
    entry = dispatch._TABLE["attention"]["native"]
    dispatch.register("attention", "native", fn, entry.supports)
    try:
        yield
    finally:
        dispatch.register("attention", "native", entry.fn, entry.supports)


def step_of(model: torch.nn.Module, *batches: dict[str, torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        for b in batches:
            model(**b).loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def previous(step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with attention_backend(padded_attention):
            step()
    return run


def compare(title: str, arms: dict[str, Callable[[], None]], base: str, rounds: int) -> None:
    """Each arm's median over interleaved rounds (the suite's clock), and its ratio to ``base``."""
    stats = Clock(torch.device("cpu")).compare(arms, Plan(warmup=1, reps=1, rounds=rounds))
    print(title)
    for name, arm in stats.items():
        print(f"  {name:45s} {arm.median_ms:8.1f} ms  {arm.median_ms / stats[base].median_ms:5.2f}x {base}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig.from_preset("small")).train()
    batch = rows(LENGTHS, model.config.vocab_size, torch.Generator().manual_seed(0))
    parts = [split(batch, [0]), split(batch, list(range(1, len(LENGTHS))))]
    skewed = step_of(model, batch)
    compare(f"BERT-small MLM, rows {LENGTHS[0]} + {len(LENGTHS) - 1} x {LENGTHS[1]}, {args.threads} threads",
            {"skewed batch, packed": skewed, "two unpadded batches": step_of(model, *parts),
             "skewed batch, padded attention (previous)": previous(skewed)}, "two unpadded batches", args.rounds)

    ours, theirs = model_pair({}, "small", torch.device("cpu"))
    inputs, real = make_batch(16, 128, ours.config.vocab_size, torch.device("cpu"))
    ours_step = step_of(ours, inputs)
    compare(f"BERT-small pretraining, 16 x <=128 ragged ({real} real tokens), {args.threads} threads",
            {"bertfast": ours_step, "transformers (sdpa)": step_of(theirs, inputs),
             "bertfast, padded attention (previous)": previous(ours_step)}, "bertfast", args.rounds)

    windowed = {}
    for length in (1024, 2048):
        qkv = torch.randn(length, 3, 12, 64, requires_grad=True)
        cu = torch.tensor([0, length], dtype=torch.int32)
        for backend in ("native", "torch"):
            def run(qkv=qkv, cu=cu, length=length, backend=backend) -> None:
                with ops.use_backend(backend):
                    out = ops.attention(qkv, cu, length, 0.0, True, window=64)
                torch.autograd.grad(out, qkv, torch.ones_like(out))
            windowed[f"{backend}, {length}-token row"] = run
    compare(f"attention with a +-64 window, forward + backward, {args.threads} threads", windowed,
            "native, 1024-token row", args.rounds)

    for family, config in (("DistilBERT-base", transformers.DistilBertConfig()),
                           ("MPNet-base", transformers.MPNetConfig())):
        torch.manual_seed(0)
        plain = transformers.AutoModelForMaskedLM.from_config(config).train()
        fast = bertfast.accelerate(copy.deepcopy(plain))
        inputs, real = make_batch(16, 128, config.vocab_size, torch.device("cpu"))
        mlm = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
        compare(f"{family} masked LM, 16 x <=128 ragged ({real} real tokens), {args.threads} threads",
                {"bertfast.accelerate": step_of(fast, mlm), "transformers (sdpa)": step_of(plain, mlm)},
                "bertfast.accelerate", args.rounds)


if __name__ == "__main__":
    main()

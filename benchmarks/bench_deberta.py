"""DeBERTa-v3 (random weights, real sizes) on a ragged batch, transformers against the drop-in, in inference
(no_grad) and in a training step (sequence classification forward + backward), same weights, interleaved rounds,
median per arm; and the disentangled attention op alone (forward + backward): bertfast's kernels against the
reference and torch.compile of the reference. Run: python benchmarks/bench_deberta.py [--threads 2] [--rounds 3]
[--sizes base large] [--batch 16] [--fill 0.6]"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from bench_modernbert import infer, train  # the same two arms: an inference call and a training step
from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

import bertfast
from bertfast import ops
from bertfast.bench.families.inference import ragged_lengths
from bertfast.bench.timing import Clock, Plan
from bertfast.common.relative_position import deberta_position_index

# DeBERTa-v3's configuration (microsoft/deberta-v3-base and -large): shared key projections, both position
# terms, 256 log buckets over 512 relative positions, no absolute positions, no token types.
V3 = dict(vocab_size=128100, max_position_embeddings=512, relative_attention=True, position_buckets=256,
          max_relative_positions=-1, pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
          position_biased_input=False, type_vocab_size=0, hidden_act="gelu", num_labels=3)
SIZES = {
    "base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "large": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
}


def batch(vocab: int, rows: int, fill: float) -> dict[str, torch.Tensor]:
    lengths = ragged_lengths(rows, 128, fill)
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(128)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(5, vocab, (rows, 128), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (rows,), generator=g)}


def attention_arms(lengths: list[int], heads: int, head_dim: int) -> dict[str, Callable[[], None]]:
    """The disentangled attention op, forward + backward, per backend (and torch.compile of the reference)."""
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    qkv = torch.randn(sum(lengths), 3, heads, head_dim, requires_grad=True)
    pos_key, pos_query = (torch.randn(512, heads, head_dim, requires_grad=True) for _ in range(2))
    index = deberta_position_index(128, 256, 512, 256)
    dy = torch.randn(sum(lengths), heads, head_dim)

    def call(backend: str) -> Callable[[], None]:
        def run() -> None:
            with ops.use_backend(backend):
                out = ops.attention(qkv, cu, 128, 0.1, True, head_dim ** -0.5 / 3 ** 0.5, pos_key=pos_key,
                                    pos_query=pos_query, pos_index=index)
            torch.autograd.grad(out, (qkv, pos_key, pos_query), dy)
        return run

    reference = torch.compile(ops.reference.attention, dynamic=False)

    def compiled() -> None:
        out = reference(qkv, cu, 128, 0.0, False, head_dim ** -0.5 / 3 ** 0.5, pos_key=pos_key, pos_query=pos_query,
                        pos_index=index)
        torch.autograd.grad(out, (qkv, pos_key, pos_query), dy)

    return {"reference": call("torch"), "torch.compile(reference, no dropout)": compiled, "bertfast": call("native")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--fill", type=float, default=0.6, help="real tokens / padded positions")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = Clock(torch.device("cpu"))
    lengths = list(ragged_lengths(args.batch, 128, args.fill))
    stats = clock.compare(attention_arms(lengths, 12, 64), Plan(warmup=1, reps=1, rounds=args.rounds))
    print(f"disentangled attention, forward + backward, {args.batch} rows of <= 128 ({sum(lengths)} tokens), "
          f"12 heads x 64, {args.threads} threads, median of {args.rounds} rounds")
    ours = stats["bertfast"].median_ms
    for name, arm in stats.items():
        print(f"  {name:40s} {arm.median_ms:8.1f} ms  bertfast {arm.median_ms / ours:5.2f}x faster")
    for size in args.sizes:
        config = DebertaV2Config(**V3, **SIZES[size])
        torch.manual_seed(0)
        reference = DebertaV2ForSequenceClassification(config).train()
        fast = bertfast.accelerate(DebertaV2ForSequenceClassification(config).train())
        fast.load_state_dict(reference.state_dict())
        inputs = batch(config.vocab_size, args.batch, args.fill)
        with torch.no_grad():
            err = (fast.eval()(**inputs).logits - reference.eval()(**inputs).logits).abs().max().item()
        arms = {"transformers inference": infer(reference, inputs), "bertfast inference": infer(fast, inputs),
                "transformers training step": train(reference, inputs), "bertfast training step": train(fast, inputs)}
        times = {name: arm.median_ms for name, arm in clock.compare(arms, Plan(1, 1, args.rounds)).items()}
        real = int(inputs["attention_mask"].sum())
        print(f"DeBERTa-v3 {size} ({config.num_hidden_layers} layers, hidden {config.hidden_size}), {args.batch} rows "
              f"of <= 128, {real} real tokens ({real / inputs['attention_mask'].numel():.0%}), {args.threads} "
              f"threads, median of {args.rounds} rounds; max logit difference {err:.1e}")
        for kind in ("inference", "training step"):
            ours, theirs = times[f"bertfast {kind}"], times[f"transformers {kind}"]
            print(f"  {kind:14s} transformers {theirs:8.0f} ms  bertfast {ours:8.0f} ms  {theirs / ours:5.2f}x")


if __name__ == "__main__":
    main()

"""ModernBERT (random weights, real sizes) on ragged rows longer than the local window: transformers' SDPA path
against the drop-in, in inference (no_grad) and in a training step (masked LM forward + backward), same
weights, interleaved rounds, median per arm. Run: python benchmarks/bench_modernbert.py [--threads 2]
[--rounds 3] [--sizes small base]"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from transformers import ModernBertConfig, ModernBertForMaskedLM

import bertfast
from bertfast.bench.timing import Clock, Plan

# small: 12 layers, hidden 384 (the size of the small ModernBERT-based embedding models); base: ModernBERT-base.
SIZES = {
    "small": dict(hidden_size=384, intermediate_size=576, num_hidden_layers=12, num_attention_heads=6),
    "base": dict(hidden_size=768, intermediate_size=1152, num_hidden_layers=22, num_attention_heads=12),
}
ROWS = [2048, 1024, 512, 256, 64]  # real tokens per row; the window is +-64


def batch(vocab: int, pad: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab - 100, (len(ROWS), max(ROWS)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(ROWS):
        mask[i, :n] = 1
    ids[mask == 0] = pad
    labels = torch.where((torch.rand(ids.shape, generator=g) < 0.15) & mask.bool(), ids, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def infer(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model.eval()(**inputs)
    return run


def train(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        model.train()(**inputs).loss.backward()
        model.zero_grad(set_to_none=True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for size in args.sizes:
        config = ModernBertConfig(vocab_size=50368, local_attention=128, global_attn_every_n_layers=3,
                                  max_position_embeddings=8192, pad_token_id=50283, attn_implementation="sdpa",
                                  **SIZES[size])
        torch.manual_seed(0)
        reference = ModernBertForMaskedLM(config).train()
        fast = bertfast.accelerate(ModernBertForMaskedLM(config).train())
        fast.load_state_dict(reference.state_dict())
        inputs = batch(config.vocab_size, config.pad_token_id)
        mask = inputs["attention_mask"].bool()

        with torch.no_grad():
            err = (fast.eval()(**inputs).logits - reference.eval()(**inputs).logits)[mask].abs().max().item()
        arms = {"transformers inference": infer(reference, inputs), "bertfast inference": infer(fast, inputs),
                "transformers training step": train(reference, inputs), "bertfast training step": train(fast, inputs)}
        stats = Clock(torch.device("cpu")).compare(arms, Plan(warmup=1, reps=1, rounds=args.rounds))
        times = {name: arm.median_ms / 1000 for name, arm in stats.items()}
        print(f"ModernBERT {size} ({config.num_hidden_layers} layers, hidden {config.hidden_size}), rows {ROWS}, "
              f"{args.threads} threads, median of {args.rounds} rounds; max logit difference {err:.1e}")
        for kind in ("inference", "training step"):
            ours, theirs = times[f"bertfast {kind}"], times[f"transformers {kind}"]
            print(f"  {kind:14s} transformers {theirs * 1e3:8.0f} ms  bertfast {ours * 1e3:8.0f} ms  "
                  f"{theirs / ours:5.2f}x")


if __name__ == "__main__":
    main()

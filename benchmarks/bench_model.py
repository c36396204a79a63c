"""End-to-end training step: bertfast vs transformers on the same weights and the same ragged batch.

    python benchmarks/bench_model.py                      # CPU: preset mini, a few steps
    python benchmarks/bench_model.py --preset base --batch 32 --seq 128 --dtype bf16   # GPU
    python benchmarks/bench_model.py --compile            # also transformers under torch.compile
    python benchmarks/bench_model.py --inference          # the encoder's forward in eval mode, no grad

A step is forward + backward of BertForPreTraining with MLM (15% of real tokens) and NSP labels;
with --inference it is one forward of the encoder (BertModel, eval mode, no gradients), the
drop-in case of a transformers user who swaps the model.
Lengths are uniform in 50-100% of --seq, as in real batches. Reports median step time, real
tokens per second, the speed-up over each baseline, and peak memory on a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import bertfast
from bertfast import BertConfig


def make_batch(batch: int, seq: int, vocab: int, device: torch.device, ragged: bool):
    g = torch.Generator().manual_seed(0)
    low = seq // 2 if ragged else seq
    lengths = torch.randint(low, seq + 1, (batch,), generator=g)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    types = ((torch.arange(seq)[None, :] >= lengths[:, None] // 2) & mask.bool()).long()
    chosen = (torch.rand(batch, seq, generator=g) < 0.15) & mask.bool()
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    nsp = torch.randint(0, 2, (batch,), generator=g)
    tensors = dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels,
                   next_sentence_label=nsp)
    return {k: v.to(device) for k, v in tensors.items()}, int(mask.sum())


def time_steps(model, inputs, steps: int, warmup: int, device: torch.device, dtype: torch.dtype,
               inference: bool = False) -> list[float]:
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if inference:
                with torch.no_grad():
                    model(**inputs)
            else:
                model(**inputs).loss.backward()
                model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="model size (default: mini on CPU, base on GPU)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--full", action="store_true", help="no padding: every row is --seq tokens")
    parser.add_argument("--compile", action="store_true", help="also time transformers under torch.compile")
    parser.add_argument("--inference", action="store_true", help="time the encoder's forward in eval mode")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    preset = args.preset or ("base" if on_gpu else "mini")
    batch = args.batch or (32 if on_gpu else 8)
    steps = args.steps or (20 if on_gpu else 5)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if on_gpu else "fp32")]
    torch.manual_seed(0)
    config = BertConfig.from_preset(preset)
    ours = bertfast.BertForPreTraining(config).to(device).train()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        theirs = transformers.BertForPreTraining.from_pretrained(tmp, attn_implementation="sdpa")
    theirs = theirs.to(device).train()
    inputs, real_tokens = make_batch(batch, args.seq, config.vocab_size, device, ragged=not args.full)
    if args.inference:
        ours, theirs = ours.bert.eval(), theirs.bert.eval()
        inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids")}

    candidates = {"bertfast": ours, "transformers (sdpa)": theirs}
    if args.compile:
        candidates["transformers + torch.compile"] = torch.compile(theirs)
    results = {}
    for name, model in candidates.items():
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        times = time_steps(model, inputs, steps, warmup=2, device=device, dtype=dtype, inference=args.inference)
        median = statistics.median(times)
        results[name] = {
            "step_ms": 1000 * median,
            "tokens_per_s": real_tokens / median,
            "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None,
        }

    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    mode = "encoder forward (inference)" if args.inference else "training step"
    print(f"{device_name}, {mode}, preset {preset}, batch {batch} x seq {args.seq} "
          f"({real_tokens} real tokens), {str(dtype).removeprefix('torch.')}, median of {steps} steps")
    print(f"{'':32s} {'step ms':>10s} {'tokens/s':>12s} {'peak MB':>10s} {'bertfast speed-up':>18s}")
    base = results["bertfast"]["step_ms"]
    for name, r in results.items():
        mem = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "-"
        print(f"{name:32s} {r['step_ms']:10.1f} {r['tokens_per_s']:12.0f} {mem:>10s} {r['step_ms'] / base:17.2f}x")
    if args.out:
        args.out.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "device": device_name, "torch": torch.__version__,
            "transformers": transformers.__version__,
            "mode": mode, "preset": preset, "batch": batch, "seq": args.seq, "dtype": str(dtype),
            "results": results,
        }, indent=2))


if __name__ == "__main__":
    main()

"""Pretraining throughput: tokens/s of full training steps, bertfast against named baselines.

    python benchmarks/bench_pretrain.py --quick                 # CPU: tiny preset, a few steps
    python benchmarks/bench_pretrain.py --preset base --batch-size 64 --steps 30    # GPU
    python benchmarks/bench_pretrain.py --compile --out benchmarks/results/pretrain_cpu.md   # or .json

Every row trains on the same batches of the built-in corpus (real NSP pairs, dynamic MLM masks,
padded to the longest row) with AdamW, clipping at 1.0 and the same precision:

* ``bertfast pretrain step``: ``Pretrainer.train_step``, exactly what ``bertfast pretrain`` runs per
  step (data loading, masking, forward, backward, clipping, optimizer, schedule, metrics),
* ``bertfast model``: the same model in a bare loop over pre-built batches,
* ``bertfast, torch backend``: every op forced to the plain-PyTorch reference (eager),
* ``bertfast, torch backend + torch.compile`` (``--compile``),
* ``transformers (sdpa)``: transformers' BertForPreTraining with the same weights,
* ``data pipeline only``: building the batches, no model.

Tokens are real (non-padding) tokens. On a GPU the table adds model TFLOP/s, estimated as
6 x (parameters outside the embeddings) x tokens, and its fraction of the device's dense peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bertfast.ops import use_backend
from bertfast.training import PretrainConfig, Pretrainer, build_optimizer
from bertfast.training.distributed import DistEnv

PEAK_TFLOPS = {"H100": 990.0, "H200": 990.0, "A100": 312.0}  # dense bf16
AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def timed(step: Callable[[int], int], steps: int, warmup: int, device: torch.device) -> tuple[float, int]:
    """(median seconds per step, real tokens per step) of ``step(i)``, which returns its token count."""
    times, tokens = [], []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        n = step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            tokens.append(n)
    return statistics.median(times), int(statistics.mean(tokens))


def model_step(model, batches, dtype, device) -> Callable[[int], int]:
    optimizer = build_optimizer("adamw", model, 1e-4, 0.01)

    def step(i: int) -> int:
        batch = {k: v.to(device) for k, v in batches[i % len(batches)].items()}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum())

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="model size (default: tiny on CPU, base on GPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 64 on GPU")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per row (default: 10 CPU, 30 GPU)")
    parser.add_argument("--quick", action="store_true", help="fewer steps, for a smoke run")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile row (slow to compile)")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers row")
    parser.add_argument("--out", type=Path,
                        help="write results as JSON here, and as markdown beside it (.md)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    preset = args.preset or ("base" if on_gpu else "tiny")
    batch_size = args.batch_size or (64 if on_gpu else 32)
    precision = args.precision or ("bf16" if on_gpu else "fp32")
    steps = 3 if args.quick else args.steps or (30 if on_gpu else 10)
    warmup = 1 if args.quick else 3
    dtype = AMP[precision]

    with tempfile.TemporaryDirectory() as tmp:
        config = PretrainConfig(output_dir=tmp, preset=preset, batch_size=batch_size, seq_len=args.seq_len,
                                precision=precision, progress=False, max_steps=10**6, eval_every=0,
                                save_every=0, device=device.type)
        torch.manual_seed(0)
        trainer = Pretrainer(config, DistEnv(), device)
        epoch = trainer.data.epoch(1)
        batches = [epoch[i] for i in range(min(len(epoch), warmup + steps))]
        initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        rows: dict[str, tuple[float, int]] = {}

        stream = trainer.batch_stream()

        def trainer_step(i: int) -> int:
            before = trainer.live_tokens
            trainer.train_step(stream)
            return int(trainer.live_tokens - before)

        rows["bertfast pretrain step"] = timed(trainer_step, steps, warmup, device)
        stream.close()

        def fresh_model():
            from bertfast import BertForPreTraining

            model = BertForPreTraining(trainer.model.config)
            model.load_state_dict(initial)
            return model.to(device).train()

        rows["bertfast model"] = timed(model_step(fresh_model(), batches, dtype, device),
                                       steps, warmup, device)
        with use_backend("torch"):
            rows["bertfast, torch backend"] = timed(model_step(fresh_model(), batches, dtype, device),
                                                    steps, warmup, device)
            if args.compile:
                compiled = torch.compile(fresh_model())
                rows["bertfast, torch backend + torch.compile"] = timed(
                    model_step(compiled, batches, dtype, device), steps, warmup + 2, device)
        if not args.no_transformers:
            import transformers

            fresh_model().save_pretrained(tmp + "/weights")
            theirs = transformers.BertForPreTraining.from_pretrained(tmp + "/weights",
                                                                     attn_implementation="sdpa")
            rows["transformers (sdpa)"] = timed(model_step(theirs.to(device).train(), batches, dtype, device),
                                                steps, warmup, device)

        def data_step(i: int) -> int:
            return int(epoch[i % len(epoch)]["attention_mask"].sum())

        rows["data pipeline only"] = timed(data_step, steps, warmup, device)
        dense_params = sum(p.numel() for n, p in trainer.model.named_parameters() if "embeddings" not in n)

    device_name = (torch.cuda.get_device_name() if on_gpu else
                   f"CPU ({torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f})")
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
    title = (f"{device_name}, preset {preset}, batch {batch_size} x seq <= {args.seq_len}, {precision}, "
             f"median of {steps} steps")
    reference = rows["bertfast pretrain step"][0]
    header = ["", "ms/step", "tokens/s", "vs bertfast pretrain step"]
    header += ["model TFLOP/s", "of peak"] if on_gpu else []
    table = []
    results = {}
    for name, (seconds, tokens) in rows.items():
        row = [name, f"{1000 * seconds:.1f}", f"{tokens / seconds:,.0f}", f"{reference / seconds:.2f}x"]
        result = {"ms_per_step": 1000 * seconds, "tokens_per_step": tokens, "tokens_per_s": tokens / seconds}
        if on_gpu:
            tflops = 6 * dense_params * tokens / seconds / 1e12 if name != "data pipeline only" else 0.0
            row += [f"{tflops:.1f}", f"{tflops / peak:.1%}" if peak else "-"]
            result["model_tflops"] = tflops
        table.append(row)
        results[name] = result
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    print(title)
    for row in [header, *table]:
        cells = [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
        print("  ".join([row[0].ljust(widths[0]), *cells]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"title": title, "device": device_name, "torch": torch.__version__,
                                        "results": results}, indent=2) + "\n")
        markdown = [f"# Pretraining throughput ({title})", "", "| " + " | ".join(header) + " |",
                    "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in table]
        args.out.with_suffix(".md").write_text("\n".join(markdown) + "\n")


if __name__ == "__main__":
    main()

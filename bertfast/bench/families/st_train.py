"""sentence-transformers training: SentenceTransformerTrainer steps, plain vs bertfast.accelerate."""

from __future__ import annotations

import copy
import random
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from bertfast.bench.families.inference import minilm_dir
from bertfast.bench.families.mlm_head import PeakMemory
from bertfast.bench.suite import Context, Entry, Group
from bertfast.bench.timing import Plan

TITLE = "sentence-transformers training"
NOTES = """\
Contrastive training of an embedding model with sentence-transformers' own trainer: every step takes
the next batch from `SentenceTransformerTrainer`'s train dataloader (its collator tokenizes the
pairs), runs the trainer's `compute_loss` (the loss module, calling the model) and backward, clips at
1.0 and steps the trainer's AdamW and schedule. The pairs are consecutive sentences of CPython's
reference manual (the built-in pretraining corpus: prose, grammar rules and code lines), tokenized to
at most 128 tokens and padded per column to the batch's longest, so batches are mostly padding
(`padding` in each row's info). All baselines start from the same weights and see the same batches:
`sentence-transformers` is the plain model with `MultipleNegativesRankingLoss` (in-batch negatives);
`bertfast.accelerate` the same model after `bertfast.accelerate(model)` (packed encoder, fused
pooling), same loss; `+ CachedMNRL` swaps in sentence-transformers' `CachedMultipleNegativesRankingLoss`
(GradCache: mini-batches of 32, the memory-flat path; the same loss value, one more forward).
Steps/s is 1000 / ms; tokens/s counts real tokens of both columns. `peak_mb`: memory a step allocates
beyond what exists before it (on a CPU the peak resident set, as in the MLM-head family).
`MPNet-base` has all-mpnet-base-v2's sizes and tokenizer layout with random weights (no checkpoint is
shipped); its accelerated path is bertfast's MPNet family encoder (relative-position bias in the
attention op) with the same fused pooling. `--st-model` selects the models.
"""

MAX_SEQ_LENGTH = 128
MINI_BATCH = 32


def ragged_pairs(count: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(anchors, positives): consecutive sentences of the built-in corpus, shuffled."""
    from bertfast.data.corpus import builtin_documents

    pairs = [(a, b) for document in builtin_documents() for a, b in zip(document[:-1], document[1:], strict=True)]
    random.Random(seed).shuffle(pairs)
    pairs = (pairs * (count // len(pairs) + 1))[:count]
    return [a for a, _ in pairs], [b for _, b in pairs]


def _tiny_model_dir(workdir: str) -> str:
    """A 2-layer BERT with MiniLM's tokenizer (the quick mode's model)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=MAX_SEQ_LENGTH)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(workdir)
    tokenizer.save_pretrained(workdir)
    return workdir


def _mpnet_base_dir(workdir: str) -> str:
    """all-mpnet-base-v2's sizes (12 layers, hidden 768, 12 heads, intermediate 3072, vocabulary 30527),
    random weights; its tokenizer layout: MiniLM's uncased WordPiece with <s> <pad> </s> <unk> before it
    and <mask> after, so padding is id 1 as in the real model."""
    import transformers

    words = (minilm_dir() / "vocab.txt").read_text().splitlines()
    path = Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(["<s>", "<pad>", "</s>", "<unk>", *words, "<mask>"]) + "\n")
    tokenizer = transformers.MPNetTokenizer(vocab=str(path / "vocab.txt"))
    config = transformers.MPNetConfig(vocab_size=len(words) + 5, hidden_size=768, num_hidden_layers=12,
                                      num_attention_heads=12, intermediate_size=3072, max_position_embeddings=514)
    torch.manual_seed(0)
    transformers.MPNetModel(config).save_pretrained(workdir)
    tokenizer.save_pretrained(workdir)
    return workdir


def _model_path(model_name: str, workdir: str) -> str:
    if model_name == "MiniLM-L6":
        return str(minilm_dir())
    if model_name == "MPNet-base":
        return _mpnet_base_dir(workdir + "/mpnet-base")
    return _tiny_model_dir(workdir + "/tiny")


def _stream(loader) -> Iterator[dict]:
    while True:
        yield from loader


def trainer_step(model, loss, dataset, batch_size: int, device: torch.device, workdir: str
                 ) -> tuple[Callable[[], torch.Tensor], list[dict]]:
    """One step of SentenceTransformerTrainer's loop, as a callable; and the first batches it will see."""
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    args = SentenceTransformerTrainingArguments(
        workdir, per_device_train_batch_size=batch_size, max_steps=10**6, learning_rate=2e-5, warmup_steps=0,
        report_to=[], use_cpu=device.type == "cpu", bf16=device.type == "cuda", save_strategy="no",
        disable_tqdm=True, logging_strategy="no", dataloader_drop_last=True, seed=0)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
    stream = _stream(trainer.get_train_dataloader())

    def step() -> torch.Tensor:
        model.train()
        inputs = trainer._prepare_inputs(next(stream))
        with trainer.compute_loss_context_manager():
            value = trainer.compute_loss(model, inputs)
        trainer.accelerator.backward(value)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad(set_to_none=True)
        return value.detach()

    return step, [batch for batch, _ in zip(trainer.get_train_dataloader(), range(4), strict=False)]


def _padding(batches: list[dict]) -> tuple[float, float]:
    """(share of padding, mean real tokens per step) over the batches' columns."""
    masks = [v for batch in batches for k, v in batch.items() if k.endswith("attention_mask")]
    real = sum(int(m.sum()) for m in masks)
    return 1 - real / sum(m.numel() for m in masks), real / len(batches)


def _group(model_name: str, batch: int, n_pairs: int, names: tuple[str, ...], ctx: Context,
           plan: Plan | None = None) -> Group:
    work: dict[str, float] = {}
    info: dict = {"series": f"{model_name} batch {batch}"}

    def build() -> dict[str, Entry | str]:
        from datasets import Dataset
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import (
            CachedMultipleNegativesRankingLoss,
            MultipleNegativesRankingLoss,
        )

        import bertfast

        workdir = tempfile.TemporaryDirectory()
        base = SentenceTransformer(_model_path(model_name, workdir.name), device=str(ctx.device))
        base.max_seq_length = MAX_SEQ_LENGTH
        anchors, positives = ragged_pairs(n_pairs)
        dataset = Dataset.from_dict({"anchor": anchors, "positive": positives})
        memory = PeakMemory(ctx.device)
        entries: dict[str, Entry | str] = {}
        for name in names:
            model = copy.deepcopy(base)
            if name.startswith("bertfast"):
                bertfast.accelerate(model)
            if name.endswith("CachedMNRL"):
                loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=MINI_BATCH)
            else:
                loss = MultipleNegativesRankingLoss(model)
            step, first = trainer_step(model, loss, dataset, batch, ctx.device, f"{workdir.name}/{len(entries)}")
            padding, tokens = _padding(first)
            work["step"] = tokens
            info["padding"] = round(padding, 3)
            step.workdir = workdir  # the trainers' output directory lives as long as their steps
            entries[name] = Entry({"step": step}, probe=lambda step=step: {"peak_mb": memory.measure(step)})
        return entries

    return Group("trainer step (MNRL)", f"{model_name}, batch {batch} pairs, <= {MAX_SEQ_LENGTH} tokens", batch,
                 "pairs per batch", names, build, ("step",), work, "tokens/s", "bf16" if ctx.on_gpu else "fp32",
                 "bertfast.accelerate", plan=plan, info=info)


PLAIN, FAST, FAST_CACHED = "sentence-transformers", "bertfast.accelerate", "bertfast.accelerate + CachedMNRL"
PLAIN_CACHED = "sentence-transformers + CachedMNRL"


def groups(ctx: Context) -> list[Group]:
    if minilm_dir() is None:
        return []
    if ctx.quick:
        return [_group("tiny", 8, 64, (PLAIN, FAST, FAST_CACHED), ctx)]
    cases = _GPU_CASES if ctx.on_gpu else _CPU_CASES
    return [_group(model, batch, n_pairs, names, ctx, plan(ctx) if plan else None)
            for model, batch, n_pairs, names, plan in cases if not ctx.st_models or model in ctx.st_models]


_GPU_CASES = [("MiniLM-L6", 256, 8192, (PLAIN, FAST, FAST_CACHED, PLAIN_CACHED), None),
              ("MiniLM-L6", 1024, 16384, (PLAIN, FAST, FAST_CACHED, PLAIN_CACHED), None),
              ("MPNet-base", 128, 8192, (PLAIN, FAST, FAST_CACHED), None)]
# Batch 256 is for its peak memory (and a step's time, once). The plain model with MNRL is left out there:
# it holds every sequence's padded activations, more than 18 GB (the OOM killer stopped it on a 23 GB machine).
# MPNet-base: a step of 8 pairs takes seconds on a few cores, so few of them are timed.
_CPU_CASES = [("MiniLM-L6", 32, 4096, (PLAIN, FAST, FAST_CACHED), None),
              ("MiniLM-L6", 256, 4096, (FAST, FAST_CACHED, PLAIN_CACHED), lambda ctx: Plan(warmup=0, reps=1, rounds=1)),
              ("MPNet-base", 8, 512, (PLAIN, FAST), lambda ctx: Plan(warmup=1, reps=2, rounds=ctx.plan.rounds))]

"""Small shared builders for the training and reliability tests: written vocabularies, tiny models, corpora."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from bertfast.config import BertConfig
from bertfast.data import load_tokenizer
from bertfast.data.tokenizer import SPECIAL_TOKENS
from bertfast.models import BertForPreTraining

GOOD = "good great fine nice happy".split()
BAD = "bad awful poor sad ugly".split()
FILLER = "the a movie film was is this it very quite".split()


def write_pretrained(directory: Path, words: list[str] | None = None, **config: int) -> Path:
    """A tiny BERT checkpoint with a written (not trained) vocabulary, as `bertfast pretrain` leaves one."""
    directory.mkdir(parents=True, exist_ok=True)
    words = sorted(set(words or GOOD + BAD + FILLER))
    (directory / "vocab.txt").write_text("\n".join([*SPECIAL_TOKENS, *words]) + "\n")
    tokenizer = load_tokenizer(directory / "vocab.txt")
    torch.manual_seed(0)
    shape = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=64)
    shape.update(config)
    BertForPreTraining(BertConfig(**shape)).save_pretrained(directory)
    tokenizer.save(directory)
    return directory


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = str(rng.choice(["pos", "neg"]))
        words = list(rng.choice(FILLER, 4)) + [str(rng.choice(GOOD if label == "pos" else BAD))]
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_corpus(path: Path, n_docs: int = 30, seed: int = 0) -> str:
    """Documents about one of a few topics each, one sentence per line, a blank line between documents."""
    rng = np.random.default_rng(seed)
    topics = [[f"{t}{i}" for i in range(12)] for t in ("alpha", "beta", "gamma", "delta")]
    lines = []
    for _ in range(n_docs):
        words = topics[rng.integers(len(topics))] + ["the", "a", "of", "is", "and"]
        lines += [" ".join(rng.choice(words, rng.integers(5, 15))) + " ." for _ in range(rng.integers(3, 10))]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return str(path)


def write_corpus_tokenizer(directory: Path) -> str:
    """A written vocabulary covering ``write_corpus``'s words (so no test trains one)."""
    words = [f"{t}{i}" for t in ("alpha", "beta", "gamma", "delta") for i in range(12)]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join([*SPECIAL_TOKENS, *words, "the", "a", "of", "is", "and", "."])
                                         + "\n")
    return str(directory / "vocab.txt")

"""BERT's WordPiece tokenizer through HF ``tokenizers``: training a vocabulary, loading and saving one.

A trained vocabulary starts with BERT's special tokens ([PAD]=0, [UNK], [CLS], [SEP], [MASK]) and
uses BERT's normalizer (CJK characters split one per token) and pre-tokenizer. Saved directories
hold ``tokenizer.json``, ``vocab.txt`` and the config files that let
``transformers.BertTokenizerFast.from_pretrained(dir)`` load them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from bertfast.io import CheckpointError, atomic_write_text

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
CONTINUATION_PREFIX = "##"
TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.txt"
# Bracketed names ([PAD], [unused12], ...) are control tokens, never picked as random replacements.
_CONTROL_TOKEN = re.compile(r"^\[[^\]]+\]$")


def _bert_pipeline(tokenizer: Tokenizer, lowercase: bool) -> Tokenizer:
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX)
    return tokenizer


def _normalizer_lowercases(tokenizer: Tokenizer) -> bool:
    spec = json.loads(tokenizer.to_str()).get("normalizer") or {}
    parts = spec.get("normalizers", [spec])
    return any(p.get("type") == "Lowercase" or p.get("lowercase") for p in parts if isinstance(p, dict))


class TokenizerError(CheckpointError):
    """A tokenizer file that cannot be read or lacks what BERT needs."""


class WordPieceTokenizer:
    """A ``tokenizers.Tokenizer`` plus the ids and per-token facts that pretraining needs."""

    def __init__(self, tokenizer: Tokenizer, lowercase: bool) -> None:
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"the tokenizer's vocabulary lacks the special token(s) {', '.join(missing)}")
        self.tokenizer = tokenizer
        self.lowercase = lowercase
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            tokenizer.token_to_id(t) for t in SPECIAL_TOKENS
        )
        self.tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{CLS} $A {SEP}",
            pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
            special_tokens=[(CLS, self.cls_id), (SEP, self.sep_id)],
        )
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.tokens = [""] * self.vocab_size
        for token, index in vocab.items():
            self.tokens[index] = token

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def continuation_mask(self) -> np.ndarray:
        """``mask[id]`` is True for WordPiece continuation pieces (``##...``), the inside of a word."""
        return np.array([t.startswith(CONTINUATION_PREFIX) for t in self.tokens], dtype=bool)

    def replacement_ids(self) -> np.ndarray:
        """Ids a masked token may be replaced with at random: every non-control token."""
        return np.array([i for i, t in enumerate(self.tokens) if t and not _CONTROL_TOKEN.match(t)],
                        dtype=np.int64)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()[:16]

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json, vocab.txt and transformers' tokenizer config files."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / TOKENIZER_FILE, self.tokenizer.to_str())
        atomic_write_text(directory / VOCAB_FILE, "".join(t + "\n" for t in self.tokens))
        specials = {"pad_token": PAD, "unk_token": UNK, "cls_token": CLS, "sep_token": SEP,
                    "mask_token": MASK}
        config = {"tokenizer_class": "BertTokenizer", "do_lower_case": self.lowercase,
                  "tokenize_chinese_chars": True, "model_max_length": 512, **specials}
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        atomic_write_text(directory / "special_tokens_map.json", json.dumps(specials, indent=2) + "\n")


def train_tokenizer(sentences: Iterable[str], vocab_size: int, lowercase: bool = True,
                    min_frequency: int = 2) -> WordPieceTokenizer:
    """Learn a WordPiece vocabulary of at most ``vocab_size`` tokens (specials first, [PAD] = 0).

    HF tokenizers' trainer breaks ties between equally frequent merges in hash-map order
    (huggingface/tokenizers#1794), so two trainings on the same text may differ slightly; that is
    why a run caches its trained vocabulary and every checkpoint carries the tokenizer files.
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    tokenizer = _bert_pipeline(Tokenizer(models.WordPiece(unk_token=UNK)), lowercase)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        # Keep rare characters from crowding out subwords in small vocabularies.
        limit_alphabet=max(100, min(1000, vocab_size // 4)),
        continuing_subword_prefix=CONTINUATION_PREFIX,
        show_progress=False,
    )
    tokenizer.train_from_iterator(sentences, trainer=trainer)
    return WordPieceTokenizer(tokenizer, lowercase)


def load_tokenizer(path: str | os.PathLike, lowercase: bool | None = None) -> WordPieceTokenizer:
    """Load a directory holding tokenizer.json or vocab.txt, or either file itself.

    ``lowercase`` applies to a bare vocab.txt (default True, as uncased BERT); a tokenizer.json
    carries its own normalizer.
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / TOKENIZER_FILE, path / VOCAB_FILE]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{path} holds neither {TOKENIZER_FILE} nor {VOCAB_FILE}")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    try:
        if path.suffix == ".json":
            tokenizer = Tokenizer.from_file(str(path))
            return WordPieceTokenizer(tokenizer, _normalizer_lowercases(tokenizer))
        lowercase = True if lowercase is None else lowercase
        tokenizer = Tokenizer(models.WordPiece.from_file(str(path), unk_token=UNK))
        return WordPieceTokenizer(_bert_pipeline(tokenizer, lowercase), lowercase)
    except ValueError as e:
        raise TokenizerError(f"tokenizer file {path}: {e}") from e
    except Exception as e:  # the Rust library raises plain Exceptions ("expected value at line 1 column 1")
        kind = "tokenizer.json" if path.suffix == ".json" else "vocabulary"
        raise TokenizerError(f"tokenizer file {path} is not a valid {kind}: {e}") from e

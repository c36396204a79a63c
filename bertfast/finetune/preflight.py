"""Checks of ``bertfast finetune``'s inputs made before any data is encoded or any step is trained.

Each failure names the option or file and the cause, and the command exits with code 2.
"""

from __future__ import annotations

from pathlib import Path

from bertfast.data import WordPieceTokenizer
from bertfast.data.tokenizer import TOKENIZER_FILE, VOCAB_FILE
from bertfast.finetune.config import FinetuneConfig
from bertfast.finetune.data import DataError, TokenExample
from bertfast.io import CheckpointError, read_json_file

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_directory(config: FinetuneConfig) -> dict:
    """``--model`` is a BERT directory with a config, weights and a tokenizer; its config."""
    model = Path(config.model)
    if not model.exists():
        raise CheckpointError(f"--model {model}: no such directory")
    if not model.is_dir():
        raise CheckpointError(f"--model {model} is a file; pass the directory that holds config.json, the "
                              "weights and the tokenizer files")
    if not (model / "config.json").is_file():
        raise CheckpointError(f"--model {model} holds no config.json: not a transformers model directory")
    values = read_json_file(model / "config.json", CheckpointError)
    if not isinstance(values, dict):
        raise CheckpointError(f"{model / 'config.json'} must hold a JSON object")
    if not any((model / name).is_file() for name in _WEIGHTS):
        raise CheckpointError(f"--model {model} holds no weights ({' or '.join(_WEIGHTS[::2])})")
    if not any((model / name).is_file() for name in (TOKENIZER_FILE, VOCAB_FILE)):
        raise CheckpointError(f"--model {model} holds no tokenizer ({TOKENIZER_FILE} or {VOCAB_FILE})")
    return values


def fitted_seq_len(config: FinetuneConfig, model_config: dict, say) -> int:
    """``--seq-len``, or the model's max_position_embeddings where that is less (the limit the model can take)."""
    positions = model_config.get("max_position_embeddings", 512)
    if isinstance(positions, int) and config.seq_len > positions:
        say(f"note: --seq-len {config.seq_len} exceeds the model's max_position_embeddings ({positions}, in "
            f"{Path(config.model) / 'config.json'}): inputs are cut at {positions} tokens")
        return positions
    return config.seq_len


def check_tokenizer_fits(tokenizer: WordPieceTokenizer, model_config: dict, model: str) -> None:
    vocab_size = model_config.get("vocab_size")
    if isinstance(vocab_size, int) and tokenizer.vocab_size > vocab_size:
        raise CheckpointError(f"the tokenizer in {model} has {tokenizer.vocab_size} tokens, more than the model's "
                              f"vocab_size ({vocab_size}): they do not belong together")


def check_bio_tags(examples: list) -> None:
    """Token-classification tags must be O, B-TYPE or I-TYPE: span F1 is computed on BIO chunks."""
    for example in examples:
        if not isinstance(example, TokenExample):
            return
        for tag in example.tags:
            prefix, _, kind = tag.partition("-")
            if tag != "O" and (prefix not in ("B", "I") or not kind):
                raise DataError(f"{example.where}: tag {tag!r} is not O, B-TYPE or I-TYPE (BIO tagging)")

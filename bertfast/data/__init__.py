"""Pretraining data: corpus reading, WordPiece tokenizer, token cache, NSP instances and MLM masking."""

from bertfast.data.cache import TokenizedCorpus, build_token_cache
from bertfast.data.corpus import BUILTIN, CorpusError, CorpusStats, EmptyCorpusError, read_documents, resolve_paths
from bertfast.data.masking import IGNORE_INDEX, MaskingCollator
from bertfast.data.pipeline import CorpusReport, EpochBatches, PretrainingData, baseline_accuracy, make_collator
from bertfast.data.tokenizer import WordPieceTokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "BUILTIN",
    "IGNORE_INDEX",
    "CorpusError",
    "CorpusReport",
    "CorpusStats",
    "EmptyCorpusError",
    "EpochBatches",
    "MaskingCollator",
    "PretrainingData",
    "TokenizedCorpus",
    "WordPieceTokenizer",
    "baseline_accuracy",
    "build_token_cache",
    "load_tokenizer",
    "make_collator",
    "read_documents",
    "resolve_paths",
    "train_tokenizer",
]

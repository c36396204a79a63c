"""Tokenising a corpus once into memory-mapped numpy shards, reused by every later run.

A cache directory (named by a hash of the sources and the tokenizer) holds, per shard:

* ``shard-NNNNN.tokens.npy``: the token ids of all sentences, back to back (uint16 when the
  vocabulary fits, else int32),
* ``shard-NNNNN.sentences.npy``: int64 offsets, sentence ``i`` is ``tokens[s[i]:s[i + 1]]``,
* ``shard-NNNNN.documents.npy``: int64 offsets into the sentences, document ``d`` is sentences
  ``docs[d]`` to ``docs[d + 1]``,

plus ``counts.npy`` (how often each token id occurs) and ``meta.json``, written last, so that a
directory without it is an interrupted build and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from bertfast.data.corpus import BUILTIN, CorpusStats, EmptyCorpusError, read_documents
from bertfast.data.tokenizer import WordPieceTokenizer
from bertfast.io import atomic_write_text, write_error

CACHE_VERSION = 2  # 2: sentences split at lowercase and CJK ends, lines split into sentences
META_FILE = "meta.json"
_ENCODE_BATCH = 4096  # sentences per call into the (multi-threaded) Rust tokenizer


@dataclass
class Shard:
    tokens: np.ndarray  # memory-mapped
    sentences: np.ndarray
    documents: np.ndarray


class TokenizedCorpus:
    """The documents of a token cache: ``document(d)`` gives its shard and sentence token ranges."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / META_FILE).read_text(encoding="utf-8"))
        self.shards = [
            Shard(
                tokens=np.load(self.directory / f"shard-{i:05d}.tokens.npy", mmap_mode="r"),
                sentences=np.load(self.directory / f"shard-{i:05d}.sentences.npy"),
                documents=np.load(self.directory / f"shard-{i:05d}.documents.npy"),
            )
            for i in range(self.meta["shards"])
        ]
        self.counts = np.load(self.directory / "counts.npy")
        # Global document d lives in shard doc_shard[d] as that shard's document doc_local[d].
        sizes = [len(s.documents) - 1 for s in self.shards]
        self.doc_shard = np.repeat(np.arange(len(sizes)), sizes)
        self.doc_local = np.concatenate([np.arange(n) for n in sizes]) if sizes else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.doc_shard)

    # Pickled (to DataLoader workers) as its directory, so the shards are mapped again, not copied.
    def __getstate__(self) -> dict:
        return {"directory": str(self.directory)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"])

    def sentence_bounds(self, d: int) -> tuple[int, np.ndarray]:
        """(shard index, token offsets of the document's sentences: n_sentences + 1 values)."""
        shard = int(self.doc_shard[d])
        local = int(self.doc_local[d])
        docs = self.shards[shard].documents
        return shard, self.shards[shard].sentences[docs[local]:docs[local + 1] + 1]

    def tokens(self, shard: int, start: int, end: int) -> np.ndarray:
        return self.shards[shard].tokens[start:end]

    @property
    def stats_summary(self) -> str:
        return self.meta["stats"]

    @property
    def problems(self) -> dict[str, int]:
        return self.meta["problems"]


def sources_fingerprint(paths: list[str]) -> str:
    """Changes when a source file is added, removed, resized or touched."""
    keys = []
    for path in paths:
        if path == BUILTIN:
            keys.append([BUILTIN, sys.version])
        else:
            stat = os.stat(path)
            keys.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:16]


def cache_key(paths: list[str], tokenizer: WordPieceTokenizer) -> str:
    spec = json.dumps([CACHE_VERSION, tokenizer.fingerprint(), sources_fingerprint(paths)])
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def _batched_documents(paths: list[str], stats: CorpusStats) -> Iterator[list[list[str]]]:
    batch: list[list[str]] = []
    size = 0
    for document in read_documents(paths, stats):
        batch.append(document)
        size += len(document)
        if size >= _ENCODE_BATCH:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class ShardWriter:
    """Writes documents of token-id sentences into the shard files of a cache directory."""

    def __init__(self, directory: str | os.PathLike, vocab_size: int, shard_tokens: int = 1 << 24) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
        self.shard_tokens = shard_tokens
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self.shards = self.documents = self.tokens = 0
        self._reset()

    def _reset(self) -> None:
        self._tokens: list[np.ndarray] = []
        self._sentences, self._documents = [0], [0]

    def add_document(self, sentences: list[list[int]]) -> None:
        """Add a document; sentences without tokens are dropped, and so is a document left empty."""
        arrays = [np.asarray(ids, dtype=np.int64) for ids in sentences if len(ids)]
        if not arrays:
            return
        for array in arrays:
            self._tokens.append(array)
            self._sentences.append(self._sentences[-1] + len(array))
        self._documents.append(self._documents[-1] + len(arrays))
        self.documents += 1
        if self._sentences[-1] >= self.shard_tokens:
            self._flush()

    @property
    def pending_tokens(self) -> int:
        return self._sentences[-1]

    def _flush(self) -> None:
        try:
            self._write_shard()
        except OSError as e:
            raise write_error(self.directory, e) from e

    def _write_shard(self) -> None:
        prefix = self.directory / f"shard-{self.shards:05d}"
        tokens = np.concatenate(self._tokens)
        self.counts += np.bincount(tokens, minlength=len(self.counts))
        self.tokens += len(tokens)
        np.save(f"{prefix}.tokens.npy", tokens.astype(self.dtype))
        np.save(f"{prefix}.sentences.npy", np.asarray(self._sentences, dtype=np.int64))
        np.save(f"{prefix}.documents.npy", np.asarray(self._documents, dtype=np.int64))
        self.shards += 1
        self._reset()

    def finish(self, **meta: object) -> None:
        """Write the last shard, the token counts and ``meta.json`` (extra ``meta`` fields included)."""
        if len(self._documents) > 1:
            self._flush()
        np.save(self.directory / "counts.npy", self.counts)
        meta = {"version": CACHE_VERSION, "shards": self.shards, "tokens": self.tokens,
                "documents": self.documents, "stats": f"{self.documents} documents", "problems": {}, **meta}
        atomic_write_text(self.directory / META_FILE, json.dumps(meta, indent=2) + "\n")


def build_token_cache(paths: list[str], tokenizer: WordPieceTokenizer, cache_root: str | os.PathLike,
                      shard_tokens: int = 1 << 24, progress: bool = True) -> TokenizedCorpus:
    """Tokenise the documents of ``paths`` into a cache under ``cache_root`` (or reuse a finished one)."""
    directory = Path(cache_root) / cache_key(paths, tokenizer)
    if (directory / META_FILE).is_file():
        return TokenizedCorpus(directory)
    partial = directory.with_name(directory.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    writer = ShardWriter(partial, tokenizer.vocab_size, shard_tokens)
    stats = CorpusStats()
    bar = tqdm(desc="tokenizing", unit=" docs", disable=not progress, dynamic_ncols=True)
    for batch in _batched_documents(paths, stats):
        encoded = tokenizer.encode_batch([s for doc in batch for s in doc])
        position = 0
        for doc in batch:
            writer.add_document(encoded[position:position + len(doc)])
            position += len(doc)
        bar.update(len(batch))
        bar.set_postfix(tokens=f"{writer.tokens + writer.pending_tokens:,}", refresh=False)
    bar.close()
    if writer.documents == 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise EmptyCorpusError(f"the corpus yields no text ({stats.summary()}); sources: {', '.join(paths)}")
    writer.finish(sources=paths, stats=stats.summary(), problems=dict(stats.problems))
    try:
        partial.rename(directory)
    except OSError:  # another process finished the same cache first
        shutil.rmtree(partial, ignore_errors=True)
    return TokenizedCorpus(directory)

"""Sentence-pair instances for MLM + NSP, as in BERT's ``create_pretraining_data.py``.

An instance is ``[CLS] A [SEP] B [SEP]``: sentences of one document are accumulated into a chunk
of a target length (the maximum, or with ``short_seq_prob`` a random shorter one), A is the
chunk's first sentences up to a random split point, and B is either the rest of the chunk (label
0, "is next") or, half the time, a run of sentences from a random other document (label 1,
"random"). The longer side is then trimmed one token at a time, randomly from the front or the
back, until the pair fits.

Two differences from BERT: a chunk of a single sentence is split inside that sentence when B is
to be the true continuation (BERT always draws a random B there), which keeps the labels 50/50
when documents have long sentences; and a sentence longer than half an instance (a 1 MB line, a
text without sentence ends) is cut into segments of at most that length that stand in for its
sentences, so its tokens are spread over many instances instead of truncated away.

A and B are contiguous token ranges (sentences of a document are stored back to back), so an
instance is seven integers; an epoch's instances are one small int64 array, regenerated from
(seed, epoch) rather than stored.
"""

from __future__ import annotations

import numpy as np

from bertfast.data.cache import TokenizedCorpus

# Columns of an instance row.
A_SHARD, A_START, A_END, B_SHARD, B_START, B_END, IS_RANDOM_NEXT = range(7)
SPECIAL_TOKENS_PER_PAIR = 3  # [CLS] A [SEP] B [SEP]


def truncation_cuts(len_a: int, len_b: int, max_tokens: int) -> tuple[int, int]:
    """Tokens to remove from A and from B: BERT trims the longer side (B on ties) one at a time."""
    excess = max(0, len_a + len_b - max_tokens)
    if len_a > len_b:
        cut_a = min(excess, len_a - len_b)
        rest = excess - cut_a
        return cut_a + rest // 2, (rest + 1) // 2
    cut_b = min(excess, len_b - len_a)
    rest = excess - cut_b
    return rest // 2, cut_b + (rest + 1) // 2


def _trim(start: int, end: int, cut: int, rng: np.random.Generator) -> tuple[int, int]:
    # Each removed token comes from the front or the back with probability 1/2.
    front = int(rng.binomial(cut, 0.5)) if cut else 0
    return start + front, end - (cut - front)


def segment_limit(max_seq_len: int) -> int:
    """The longest sentence kept whole: half of an instance's tokens (rounded up, so two segments fill one)."""
    return max(1, -(-(max_seq_len - SPECIAL_TOKENS_PER_PAIR) // 2))


def segmented_bounds(bounds: np.ndarray, limit: int) -> np.ndarray:
    """Sentence offsets with every sentence longer than ``limit`` cut into near-equal segments."""
    lengths = np.diff(bounds)
    if len(lengths) == 0 or lengths.max() <= limit:
        return bounds
    points = [bounds[:1]]
    for start, length in zip(bounds[:-1], lengths, strict=True):
        pieces = -(-int(length) // limit)
        points.append(start + (np.arange(1, pieces + 1) * int(length)) // pieces)
    return np.concatenate(points)


def document_instances(corpus: TokenizedCorpus, doc: int, pool: np.ndarray, max_seq_len: int,
                       short_seq_prob: float, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """The instances of document ``doc``; random B segments come from the other documents of ``pool``."""
    max_tokens = max_seq_len - SPECIAL_TOKENS_PER_PAIR
    shard, bounds = corpus.sentence_bounds(doc)
    bounds = segmented_bounds(bounds, segment_limit(max_seq_len))
    n_sentences = len(bounds) - 1
    target = max_tokens
    if rng.random() < short_seq_prob:
        target = int(rng.integers(2, max_tokens + 1))
    instances: list[tuple[int, ...]] = []
    first = 0  # first sentence of the current chunk
    i = 0
    while i < n_sentences:
        if i < n_sentences - 1 and bounds[i + 1] - bounds[first] < target:
            i += 1
            continue
        chunk = i + 1 - first  # sentences first..i make the chunk
        a_sentences = int(rng.integers(1, chunk)) if chunk >= 2 else 1
        a_start, a_end = int(bounds[first]), int(bounds[first + a_sentences])
        chunk_end = int(bounds[i + 1])
        random_next = rng.random() < 0.5
        if not random_next and chunk == 1:
            if chunk_end - a_start < 2:
                random_next = True  # a one-token sentence cannot be split
            else:
                a_end = int(rng.integers(a_start + 1, chunk_end))
        if random_next:
            b_shard, b_start, b_end = _random_segment(corpus, doc, pool, target - (a_end - a_start),
                                                      segment_limit(max_seq_len), rng)
            # The sentences of the chunk that B did not use start the next chunk.
            i = first + a_sentences - 1
        else:
            b_shard, b_start, b_end = shard, a_end, chunk_end
        cut_a, cut_b = truncation_cuts(a_end - a_start, b_end - b_start, max_tokens)
        a_start, a_end = _trim(a_start, a_end, cut_a, rng)
        b_start, b_end = _trim(b_start, b_end, cut_b, rng)
        instances.append((shard, a_start, a_end, b_shard, b_start, b_end, int(random_next)))
        first = i = i + 1
        if rng.random() < short_seq_prob:
            target = int(rng.integers(2, max_tokens + 1))
        else:
            target = max_tokens
    return instances


def _random_segment(corpus: TokenizedCorpus, doc: int, pool: np.ndarray, length: int, limit: int,
                    rng: np.random.Generator) -> tuple[int, int, int]:
    """Sentences of a random other document of ``pool`` from a random start, until ``length`` tokens."""
    if len(pool) > 1:
        other = int(rng.integers(len(pool) - 1))
        other_doc = int(pool[other])
        if other_doc == doc:  # skip the document itself: take the last one in its place
            other_doc = int(pool[-1])
    else:
        other_doc = doc
    shard, bounds = corpus.sentence_bounds(other_doc)
    bounds = segmented_bounds(bounds, limit)
    start = int(rng.integers(len(bounds) - 1))
    # The first sentence boundary at or beyond the wanted length (or the document end).
    end = int(np.searchsorted(bounds, bounds[start] + max(length, 1), side="left"))
    end = min(max(end, start + 1), len(bounds) - 1)
    return shard, int(bounds[start]), int(bounds[end])


def create_instances(corpus: TokenizedCorpus, docs: np.ndarray, max_seq_len: int, short_seq_prob: float,
                     rng: np.random.Generator) -> np.ndarray:
    """All instances of ``docs`` (one pass), shuffled: an (N, 7) int64 array of rows as above."""
    if max_seq_len < SPECIAL_TOKENS_PER_PAIR + 2:
        raise ValueError(f"max_seq_len must be at least {SPECIAL_TOKENS_PER_PAIR + 2}, got {max_seq_len}")
    rows: list[tuple[int, ...]] = []
    for doc in docs:
        rows.extend(document_instances(corpus, int(doc), docs, max_seq_len, short_seq_prob, rng))
    instances = np.asarray(rows, dtype=np.int64).reshape(-1, 7)
    return instances[rng.permutation(len(instances))]


def own_document_tokens(instances: np.ndarray) -> int:
    """Tokens of their own documents the instances hold: A, and B where it is the true continuation."""
    own_b = instances[:, IS_RANDOM_NEXT] == 0
    return int((instances[:, A_END] - instances[:, A_START]).sum()
               + (instances[own_b, B_END] - instances[own_b, B_START]).sum())


def instance_tokens(corpus: TokenizedCorpus, row: np.ndarray, cls_id: int, sep_id: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(input ids, token type ids) of ``[CLS] A [SEP] B [SEP]``."""
    a = corpus.tokens(int(row[A_SHARD]), int(row[A_START]), int(row[A_END]))
    b = corpus.tokens(int(row[B_SHARD]), int(row[B_START]), int(row[B_END]))
    ids = np.concatenate(([cls_id], a, [sep_id], b, [sep_id])).astype(np.int64)
    types = np.zeros(len(ids), dtype=np.int64)
    types[len(a) + 2:] = 1
    return ids, types

"""NSP instances: [CLS] A [SEP] B [SEP] layout, segment ids, label balance, truncation, determinism."""

import numpy as np
import pytest

from bertfast.data.cache import ShardWriter, TokenizedCorpus
from bertfast.data.instances import (
    A_END,
    A_SHARD,
    A_START,
    B_END,
    B_SHARD,
    B_START,
    IS_RANDOM_NEXT,
    create_instances,
    instance_tokens,
    truncation_cuts,
)

CLS, SEP = 2, 3
FIRST_ID = 10  # token ids below this are "special"


def write_corpus(directory, n_docs=40, sentence_lengths=(4, 30), sentences_per_doc=(1, 12), seed=0,
                 shard_tokens=1 << 24) -> TokenizedCorpus:
    """Documents of sentences whose token ids count up: each token id says where it came from."""
    rng = np.random.default_rng(seed)
    writer = ShardWriter(directory, vocab_size=60000, shard_tokens=shard_tokens)
    next_id = FIRST_ID
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.integers(*sentences_per_doc, endpoint=True)):
            length = int(rng.integers(*sentence_lengths, endpoint=True))
            sentences.append(list(range(next_id, next_id + length)))
            next_id += length
        writer.add_document(sentences)
    writer.finish()
    return TokenizedCorpus(directory)


def document_ranges(corpus):
    """(shard, first token, end token) of every document."""
    ranges = []
    for d in range(len(corpus)):
        shard, bounds = corpus.sentence_bounds(d)
        ranges.append((shard, int(bounds[0]), int(bounds[-1])))
    return ranges


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), shard_tokens=2000)


def test_token_cache_round_trips_documents(corpus):
    assert len(corpus.shards) > 1  # documents spread over several shards
    shard, bounds = corpus.sentence_bounds(0)
    first = corpus.tokens(shard, int(bounds[0]), int(bounds[1]))
    assert first[0] == FIRST_ID and np.all(np.diff(first.astype(np.int64)) == 1)
    total = sum(int(b[-1] - b[0]) for b in (corpus.sentence_bounds(d)[1] for d in range(len(corpus))))
    assert total == corpus.meta["tokens"] == int(corpus.counts.sum())


@pytest.mark.parametrize("max_seq_len", [16, 64])
def test_layout_segments_and_lengths(corpus, max_seq_len):
    docs = np.arange(len(corpus))
    instances = create_instances(corpus, docs, max_seq_len, 0.1, np.random.default_rng(0))
    assert len(instances) > 50
    for row in instances:
        ids, types = instance_tokens(corpus, row, CLS, SEP)
        len_a, len_b = row[A_END] - row[A_START], row[B_END] - row[B_START]
        assert len_a >= 1 and len_b >= 1
        assert len(ids) == len_a + len_b + 3 <= max_seq_len
        assert ids[0] == CLS and ids[len_a + 1] == SEP and ids[-1] == SEP
        assert not np.isin(ids[1:len_a + 1], [CLS, SEP]).any()
        assert types.tolist() == [0] * (len_a + 2) + [1] * (len_b + 1)


def test_next_sentence_labels_are_balanced_and_truthful(corpus):
    ranges = document_ranges(corpus)

    def doc_of(shard, start):
        return next(d for d, (s, lo, hi) in enumerate(ranges) if s == shard and lo <= start < hi)

    docs = np.arange(len(corpus))
    instances = np.concatenate([create_instances(corpus, docs, 64, 0.1, np.random.default_rng(seed))
                                for seed in range(5)])
    random_fraction = instances[:, IS_RANDOM_NEXT].mean()
    assert 0.45 < random_fraction < 0.55, random_fraction
    for row in instances:
        a_doc, b_doc = doc_of(row[A_SHARD], row[A_START]), doc_of(row[B_SHARD], row[B_START])
        if row[IS_RANDOM_NEXT]:
            assert b_doc != a_doc
        else:  # the true continuation: same document, right after A (up to truncation)
            assert b_doc == a_doc and row[B_SHARD] == row[A_SHARD] and row[B_START] >= row[A_END]


def test_long_sentences_are_truncated_from_both_ends(tmp_path):
    corpus = write_corpus(tmp_path, n_docs=60, sentence_lengths=(14, 22), sentences_per_doc=(2, 5))
    instances = create_instances(corpus, np.arange(len(corpus)), 32, 0.0, np.random.default_rng(0))
    starts = {int(b) for d in range(len(corpus)) for b in corpus.sentence_bounds(d)[1]}
    lengths = (instances[:, A_END] - instances[:, A_START]) + (instances[:, B_END] - instances[:, B_START])
    assert lengths.max() == 29 and (lengths == 29).mean() > 0.7
    # A starts and B ends at sentence boundaries unless tokens were trimmed there.
    front_cut = np.mean([row[A_START] not in starts for row in instances])
    back_cut = np.mean([row[B_END] not in starts for row in instances])
    assert 0.2 < front_cut < 0.95 and 0.2 < back_cut < 0.95, (front_cut, back_cut)


def test_short_seq_prob_draws_shorter_targets(corpus):
    docs = np.arange(len(corpus))
    full = create_instances(corpus, docs, 128, 0.0, np.random.default_rng(0))
    short = create_instances(corpus, docs, 128, 1.0, np.random.default_rng(0))
    def mean_len(rows):
        return np.mean((rows[:, A_END] - rows[:, A_START]) + (rows[:, B_END] - rows[:, B_START]))
    assert len(short) > len(full) and mean_len(short) < 0.8 * mean_len(full)


def test_instances_depend_only_on_the_generator_seed(corpus):
    docs = np.arange(len(corpus))
    first = create_instances(corpus, docs, 64, 0.1, np.random.default_rng([7, 0]))
    again = create_instances(corpus, docs, 64, 0.1, np.random.default_rng([7, 0]))
    other = create_instances(corpus, docs, 64, 0.1, np.random.default_rng([7, 1]))
    np.testing.assert_array_equal(first, again)
    assert first.shape != other.shape or not np.array_equal(first, other)


def reference_truncate(len_a, len_b, max_tokens):
    """BERT's truncate_seq_pair, counting which side each removed token comes from."""
    cut_a = cut_b = 0
    while len_a + len_b > max_tokens:
        if len_a > len_b:
            len_a, cut_a = len_a - 1, cut_a + 1
        else:
            len_b, cut_b = len_b - 1, cut_b + 1
    return cut_a, cut_b


def test_truncation_cuts_match_berts_loop():
    for len_a in range(1, 30):
        for len_b in range(1, 30):
            for max_tokens in (2, 5, 17, 40):
                expected = reference_truncate(len_a, len_b, max_tokens)
                assert truncation_cuts(len_a, len_b, max_tokens) == expected


def test_a_single_document_corpus_still_yields_pairs(tmp_path):
    corpus = write_corpus(tmp_path, n_docs=1, sentences_per_doc=(6, 6))
    instances = create_instances(corpus, np.arange(1), 32, 0.1, np.random.default_rng(0))
    assert len(instances) >= 1
    assert ((instances[:, A_END] - instances[:, A_START]) >= 1).all()

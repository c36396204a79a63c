"""From the token cache to batches: held-out split, rank sharding, determinism by position."""

import numpy as np
import pytest
import torch

from bertfast.data import (
    PretrainingData,
    baseline_accuracy,
    build_token_cache,
    make_collator,
    train_tokenizer,
)
from bertfast.data.instances import instance_tokens


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(60)]
    lines = []
    for _ in range(60):
        for _ in range(rng.integers(3, 9)):
            lines.append(" ".join(rng.choice(words, rng.integers(4, 14))) + " .")
        lines.append("")
    corpus_file = root / "corpus.txt"
    corpus_file.write_text("\n".join(lines), encoding="utf-8")
    tokenizer = train_tokenizer([line for line in lines if line], vocab_size=120)
    corpus = build_token_cache([str(corpus_file)], tokenizer, root / "cache", progress=False)
    return corpus, tokenizer


def data(setup, **kwargs):
    corpus, tokenizer = setup
    options = dict(batch_size=4, max_seq_len=48, eval_fraction=0.1, seed=3)
    options.update(kwargs)
    return PretrainingData(corpus, tokenizer, make_collator(tokenizer), **options)


def test_cache_is_reused(setup):
    corpus, tokenizer = setup
    sources = list(corpus.meta["sources"])
    again = build_token_cache(sources, tokenizer, corpus.directory.parent, progress=False)
    assert again.directory == corpus.directory


def test_held_out_documents_are_disjoint_and_fixed(setup):
    a, b = data(setup, seed=1), data(setup, seed=2)
    assert len(a.eval_docs) == 6 and not set(a.eval_docs) & set(a.train_docs)
    assert len(a.eval_docs) + len(a.train_docs) == len(setup[0])
    np.testing.assert_array_equal(a.eval_docs, b.eval_docs)
    first, second = a.eval_batches(), b.eval_batches()
    assert all(torch.equal(x[k], y[k]) for x, y in zip(first, second, strict=True) for k in x)


def test_ranks_split_each_global_batch(setup):
    single = data(setup, batch_size=4)
    ranks = [data(setup, batch_size=2, rank=r, world_size=2) for r in range(2)]
    epoch = single.epoch(1)
    shards = [r.epoch(1) for r in ranks]
    assert len(shards[0]) == len(shards[1]) == len(epoch)
    corpus, tokenizer = setup
    for index in (0, len(epoch) - 1):
        rows = epoch.instances[index * 4:(index + 1) * 4]
        expected = [instance_tokens(corpus, row, tokenizer.cls_id, tokenizer.sep_id)[0] for row in rows]
        got = [shards[r][index]["attention_mask"].sum(1).tolist() for r in range(2)]
        assert got[0] + got[1] == [len(ids) for ids in expected]
        assert shards[0][index]["labels"].shape[0] == 2


def test_batches_are_a_function_of_seed_epoch_and_index(setup):
    first, again = data(setup).epoch(2), data(setup).epoch(2)
    for index in (0, 3):
        assert all(torch.equal(first[index][k], again[index][k]) for k in first[index])
    other_epoch = data(setup).epoch(3)
    assert not torch.equal(first[0]["input_ids"], other_epoch[0]["input_ids"])
    with pytest.raises(IndexError):
        first[len(first)]


def test_too_small_corpus_for_the_batch_is_an_error(setup):
    with pytest.raises(ValueError, match="fewer than one batch"):
        data(setup, batch_size=100000).epoch(0)


def test_most_frequent_token_baseline(setup):
    d = data(setup)
    token = d.most_frequent_token()
    assert token == d.tokenizer.tokenizer.token_to_id(".")  # every sentence ends with one
    hits, total = baseline_accuracy(d.eval_batches(), token)
    assert total > 0 and 0 < hits < total

"""Checkpoints: resuming reproduces an uninterrupted run exactly, and every file loads safely."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bertfast.data import train_tokenizer
from bertfast.training import PretrainConfig, pretrain
from bertfast.training.checkpoint import list_checkpoints, load_state, resolve_resume

pytestmark = pytest.mark.usefixtures("one_thread")


def write_corpus(path, n_docs=30, seed=0):
    """Documents about one of a few topics each, so that NSP and MLM have something to learn."""
    rng = np.random.default_rng(seed)
    topics = [[f"{t}{i}" for i in range(12)] for t in ("alpha", "beta", "gamma", "delta")]
    common = ["the", "a", "of", "is", "and"]
    lines = []
    for _ in range(n_docs):
        words = topics[rng.integers(len(topics))] + common
        lines += [" ".join(rng.choice(words, rng.integers(5, 15))) + " ." for _ in range(rng.integers(3, 10))]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return str(path)


def config(tmp_path, corpus, name, **overrides):
    values = dict(corpus=[corpus], output_dir=str(tmp_path / name), vocab_size=150, seq_len=32, batch_size=4,
                  grad_accum=2, max_steps=6, warmup_steps=2, save_every=3, eval_every=3, log_every=1,
                  keep_checkpoints=0, progress=False, seed=5)
    values.update(overrides)
    return PretrainConfig(**values)


def records(run_dir, split="train"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["split"] == split}


DETERMINISTIC = ("loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc", "lr", "grad_norm", "tokens")


def test_resumed_run_matches_an_uninterrupted_one_exactly(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    assert pretrain(config(tmp_path, corpus, "full")) == 0
    full = tmp_path / "full"
    assert [step for step, _ in list_checkpoints(full)] == [3, 6]

    torch.manual_seed(1234)  # the resumed run must not depend on the state it starts in
    np.random.seed(99)
    checkpoint = full / "checkpoint-3"
    assert pretrain(config(tmp_path, corpus, "resumed", resume=str(checkpoint))) == 0
    resumed = tmp_path / "resumed"

    expected, got = records(full), records(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert {k: got[step][k] for k in DETERMINISTIC} == {k: expected[step][k] for k in DETERMINISTIC}
    assert records(resumed, "eval")[6]["loss"] == records(full, "eval")[6]["loss"]
    final_full = load_file(full / "final/model.safetensors")
    final_resumed = load_file(resumed / "final/model.safetensors")
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)
    # A different seed is a different run: the comparison above is not vacuous.
    assert pretrain(config(tmp_path, corpus, "other", seed=6, tokenizer=str(checkpoint))) == 0
    assert records(tmp_path / "other")[4]["loss"] != expected[4]["loss"]


def test_checkpoint_contents_load_with_weights_only(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    cfg = config(tmp_path, corpus, "run", max_steps=4, save_every=2, keep_checkpoints=1, eval_every=0)
    assert pretrain(cfg) == 0
    run = tmp_path / "run"
    assert [step for step, _ in list_checkpoints(run)] == [4]  # older ones pruned
    assert resolve_resume(run, "latest") == run / "checkpoint-4"
    state = load_state(run / "checkpoint-4")  # torch.load(weights_only=True)
    assert state["step"] == 4 and state["world_size"] == 1
    assert set(state["ranks"][0]["rng"]) >= {"python", "numpy", "torch"}
    assert {"optimizer", "scheduler", "scaler", "epoch", "batch_index"} <= set(state)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        assert (run / "checkpoint-4" / name).is_file() and (run / "final" / name).is_file()
    assert not list(run.glob(".*tmp*"))


def test_resume_latest_continues_and_extends_a_run(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    assert pretrain(config(tmp_path, corpus, "run", max_steps=2, eval_every=0, warmup_steps=0)) == 0
    assert pretrain(config(tmp_path, corpus, "run", max_steps=4, eval_every=0, warmup_steps=0,
                           resume="latest")) == 0
    train = records(tmp_path / "run")
    assert sorted(train) == [1, 2, 3, 4]
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "run" / "final"))


def test_dataloader_workers_do_not_change_the_batches(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    # One tokenizer for both runs (training one twice need not give the same vocabulary).
    lines = [line for line in Path(corpus).read_text(encoding="utf-8").splitlines() if line]
    train_tokenizer(lines, 150).save(tmp_path / "tokenizer")
    options = dict(max_steps=3, eval_every=0, save_every=0, grad_accum=1,
                   tokenizer=str(tmp_path / "tokenizer"))
    assert pretrain(config(tmp_path, corpus, "inline", **options)) == 0
    assert pretrain(config(tmp_path, corpus, "workers", num_workers=2, **options)) == 0
    inline, workers = records(tmp_path / "inline"), records(tmp_path / "workers")
    assert [inline[s]["loss"] for s in inline] == [workers[s]["loss"] for s in workers]

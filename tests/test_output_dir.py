"""Output directories: a run never mixes into another, never runs twice at once, and cleans up after a kill."""

import json
import os

import pytest
from tiny_runs import sentiment_rows, write_corpus, write_corpus_tokenizer, write_jsonl, write_pretrained

from bertfast.cli import main
from bertfast.training.rundir import RunDirectory

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pretrain(tmp_path):
    corpus, vocab = write_corpus(tmp_path / "corpus.txt"), write_corpus_tokenizer(tmp_path / "vocab")

    def run(*extra, steps=2):
        return main(["pretrain", "--output-dir", str(tmp_path / "run"), "--corpus", corpus, "--tokenizer", vocab,
                     "--seq-len", "32", "--batch-size", "4", "--max-steps", str(steps), "--eval-every", "0",
                     "--save-every", "1", "--log-every", "1", "--no-progress", *extra])
    return run


def train_steps(run):
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"]


def test_a_second_run_into_a_finished_run_is_refused_unless_overwrite(pretrain, tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain(steps=3) == 0
    before = (run / "metrics.jsonl").read_text()
    assert pretrain() == 2
    err = capsys.readouterr().err
    assert f"--output-dir {run} holds another run (checkpoint-1, checkpoint-2, checkpoint-3" in err
    assert "--overwrite" in err
    assert (run / "metrics.jsonl").read_text() == before

    assert pretrain("--overwrite") == 0
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert train_steps(run) == [1, 2]
    assert pretrain("--resume", "latest", steps=3) == 0  # continues the new run, not the old one
    assert train_steps(run) == [1, 2, 3]


def test_a_concurrent_run_is_stopped_by_the_lock_and_named(pretrain, tmp_path, capsys):
    holder = RunDirectory.open(tmp_path / "run", [], resume=False, overwrite=False)
    try:
        assert pretrain() == 2
    finally:
        holder.release()
    err = capsys.readouterr().err
    assert f"is in use by another run (pid {os.getpid()} on " in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert pretrain() == 0  # released


def test_stale_temporaries_of_a_killed_run_are_removed_at_start(pretrain, tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain() == 0
    half_written = run / ".checkpoint-3.tmp-999999999"  # no such process
    half_written.mkdir()
    (half_written / "model.safetensors").write_bytes(b"x" * 1000)
    (run / ".metrics.png.k2j3h4.tmp").write_bytes(b"x")
    (run / "cache" / "0123abcd.partial-999999999").mkdir()
    assert pretrain("--resume", "latest", steps=3) == 0
    assert "removed 3 temporary file(s) left by a killed run" in capsys.readouterr().out
    assert not [p for p in run.rglob("*") if "tmp" in p.name or "partial" in p.name]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return write_pretrained(tmp_path_factory.mktemp("pretrained"))


def test_finetune_refuses_a_finished_run_and_eval_only_never_writes_over_training(pretrained, tmp_path, capsys):
    run = tmp_path / "run"
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(8, seed=1))
    evals = write_jsonl(tmp_path / "eval.jsonl", sentiment_rows(4, seed=2))
    common = ["finetune", "--task", "classification", "--eval", evals, "--output-dir", str(run), "--no-progress",
              "--seq-len", "16", "--batch-size", "4", "--epochs", "1"]
    assert main([*common, "--model", str(pretrained), "--train", train]) == 0
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    assert main([*common, "--model", str(pretrained), "--train", train]) == 2
    err = capsys.readouterr().err
    assert f"--output-dir {run} holds another run (best, eval_results.json, finetune_config.json, last" in err
    for flags in ([], ["--overwrite"]):
        assert main([*common, "--model", str(run / "best"), "--eval-only", *flags]) == 2
        assert f"--eval-only would write over the training run in {run}" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files

    assert main([*common, "--model", str(pretrained), "--train", train, "--overwrite"]) == 0

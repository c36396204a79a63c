"""What --resume may change (applied and logged) and what it may not (refused before any work)."""

import json

import pytest
from tiny_runs import write_corpus, write_corpus_tokenizer

from bertfast.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def finished(tmp_path):
    """A finished 2-step run; ``run(*flags)`` resumes it with only ``flags`` given."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    assert main(["pretrain", "--output-dir", str(out), "--corpus", corpus, "--tokenizer",
                 write_corpus_tokenizer(tmp_path / "vocab"), "--seq-len", "32", "--batch-size", "4",
                 "--max-steps", "2", "--warmup-steps", "0", "--eval-every", "0", "--log-every", "1",
                 "--no-progress"]) == 0

    def run(*flags):
        return main(["pretrain", "--output-dir", str(out), "--resume", "latest", *flags])
    return run


def records(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def test_a_bare_resume_continues_with_the_saved_options_and_applies_the_changed_ones(finished, tmp_path, capsys):
    capsys.readouterr()
    assert finished("--max-steps", "4", "--lr", "5e-4") == 0
    out = capsys.readouterr().out
    assert "resume: applying changed options: --max-steps 2 -> 4, --lr 0.001 -> 0.0005" in out
    assert "resume: the lr schedule is recomputed: warmup to 0.0005 over 0 steps, linear decay to 0 at step 4" in out
    train = records(tmp_path / "run")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert train[2]["lr"] == pytest.approx(5e-4 * (4 - 2) / 4)  # the new peak, on the new schedule
    assert train[3]["lr"] == pytest.approx(5e-4 * (4 - 3) / 4)


@pytest.mark.parametrize(("flags", "message"), [
    (["--preset", "mini"], "cannot change --preset mini (the run has tiny)"),
    (["--optimizer", "lamb"], "cannot change --optimizer lamb (the run has adamw)"),
    (["--vocab-size", "99"], "cannot change --vocab-size 99 (the run has 4000)"),
    (["--seq-len", "600"], "--seq-len 600 exceeds the checkpoint's max_position_embeddings (512)"),
])
def test_options_a_resumed_run_cannot_change_are_refused_before_any_work(finished, flags, message, capsys):
    capsys.readouterr()
    assert finished(*flags, "--max-steps", "3") == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "corpus:" not in captured.out  # refused before the data is prepared


def test_an_edited_corpus_is_refused(finished, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus.read_text() + "\nalpha1 beta2 .\n")
    assert finished("--max-steps", "3") == 2
    assert "cannot change the corpus files (one was added, removed, resized or modified" in capsys.readouterr().err

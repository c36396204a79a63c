"""``bertfast pretrain`` end to end: learning, files written, transformers compatibility, signals."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tiny_runs import write_corpus, write_corpus_tokenizer

from bertfast.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def read_records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_default_corpus_run_learns_and_writes_everything(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["pretrain", "--output-dir", str(run), "--max-steps", "40", "--seq-len", "64",
                 "--batch-size", "16", "--vocab-size", "1000", "--warmup-steps", "4", "--lr", "2e-3",
                 "--eval-every", "20", "--save-every", "20", "--log-every", "5", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "held-out: MLM acc" in out and "most-frequent-token baseline" in out

    records = read_records(run)
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    for key in ("step", "loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc", "lr", "tokens_per_s"):
        assert all(key in r for r in train), key
    assert [r["step"] for r in train] == list(range(5, 41, 5))
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["loss"] < evals[0]["loss"] and 0 < evals[-1]["baseline_mlm_acc"] < 0.2
    assert (run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    transformers = pytest.importorskip("transformers")
    checkpoint = run / "checkpoint-40"
    model, info = transformers.BertForPreTraining.from_pretrained(checkpoint, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = transformers.BertTokenizerFast.from_pretrained(checkpoint)
    batch = tokenizer(["The import statement finds a module."], ["It then loads it."], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).seq_relationship_logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()
    assert (run / "final" / "model.safetensors").is_file() and (run / "final" / "vocab.txt").is_file()


def test_broken_input_is_reported_and_an_empty_corpus_fails_clearly(tmp_path, capsys):
    good = tmp_path / "good.txt"
    rng = np.random.default_rng(0)
    good.write_text("\n\n".join("\n".join(" ".join(rng.choice(list("abcdefgh"), 8)) + " ." for _ in range(6))
                                for _ in range(12)))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "Fine document. Two sentences."}\nnot json\n{"no": "text"}\n\xff\xfe\n')
    (tmp_path / "empty.txt").write_text("")
    args = ["pretrain", "--output-dir", str(tmp_path / "run"), "--corpus", str(tmp_path / "*.txt"), str(bad),
            "--max-steps", "2", "--seq-len", "32", "--batch-size", "4", "--vocab-size", "60",
            "--eval-every", "0", "--no-progress"]
    with pytest.warns(UserWarning) as caught:
        assert main(args) == 0
    assert any("skipped broken input" in str(w.message) for w in caught)
    summary = "1 bad encoding lines, 1 empty files, 1 invalid json lines, 1 missing text field"
    assert summary in capsys.readouterr().out

    code = main(["pretrain", "--output-dir", str(tmp_path / "run2"), "--corpus", str(tmp_path / "empty.txt"),
                 "--no-progress"])
    assert code == 2
    assert "the corpus yields no text" in capsys.readouterr().err


def test_tokenizer_train_command(tmp_path, capsys):
    args = ["tokenizer", "train", "--corpus", "builtin", "--vocab-size", "500", "--output", str(tmp_path)]
    assert main(args) == 0
    vocab = (tmp_path / "vocab.txt").read_text().splitlines()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(vocab) == 500
    assert (tmp_path / "tokenizer.json").is_file()
    assert "500-token WordPiece vocabulary" in capsys.readouterr().out


def wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize(("signum", "expected_code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_to_the_process_group_saves_a_checkpoint_and_the_run_resumes(tmp_path, signum, expected_code):
    """What SLURM, `timeout` and Ctrl-C do: the signal reaches the DataLoader workers too."""
    run = tmp_path / "run"
    common = ["--output-dir", str(run), "--corpus", write_corpus(tmp_path / "corpus.txt"), "--tokenizer",
              write_corpus_tokenizer(tmp_path / "vocab"), "--seq-len", "32", "--batch-size", "4",
              "--eval-every", "0", "--log-every", "1", "--no-progress", "--num-workers", "2"]
    command = [sys.executable, "-m", "bertfast", "pretrain", *common, "--max-steps", "100000", "--save-every", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    try:
        started = wait_for(lambda: (run / "metrics.jsonl").is_file() and
                           len((run / "metrics.jsonl").read_text().splitlines()) >= 2, timeout=120)
        assert started, "training did not start"
        os.killpg(process.pid, signum)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == expected_code, output
    assert f"{signal.Signals(signum).name}: stopped after step" in output
    assert "Traceback" not in output and "killed by signal" not in output
    (checkpoint,) = run.glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert state["step"] == step >= 2

    if signum == signal.SIGINT:
        return  # resuming after SIGTERM shows it; once is enough
    assert main(["pretrain", *common, "--max-steps", str(step + 2), "--resume", "latest"]) == 0
    steps = [r["step"] for r in read_records(run) if r["split"] == "train"]
    assert steps == list(range(1, step + 3))
    assert (run / "final" / "model.safetensors").is_file()

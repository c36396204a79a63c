"""Several processes: a stalled one (SIGSTOP, a hung file system) is named by the others within --dist-timeout;
SIGTERM to torchrun saves one checkpoint of all of them."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from tiny_runs import write_corpus, write_corpus_tokenizer

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_stalled_rank_is_named_by_the_healthy_one(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "bertfast", "pretrain", "--output-dir", str(run), "--device", "cpu",
               "--corpus", write_corpus(tmp_path / "corpus.txt", n_docs=60), "--tokenizer",
               write_corpus_tokenizer(tmp_path / "vocab"), "--seq-len", "32", "--batch-size", "2",
               "--max-steps", "100000", "--eval-every", "0", "--save-every", "0", "--log-every", "1",
               "--no-progress", "--dist-timeout", "4"]
    port = free_port()
    ranks = []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        ranks.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2):
            assert time.monotonic() < deadline and ranks[0].poll() is None, "training did not start"
            time.sleep(0.1)
        ranks[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        output, _ = ranks[0].communicate(timeout=60)
        waited = time.monotonic() - stopped
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    assert ranks[0].returncode == 1, output
    (line,) = [line for line in output.splitlines() if line.startswith("bertfast pretrain: error:")]
    assert "rank 0 waited" in line and "rank(s) 1 stalled or died" in line
    assert "rank 1: training step" in line and "Raise --dist-timeout (4 s)" in line
    assert waited < 30


def test_sigterm_to_torchrun_saves_one_checkpoint_of_all_processes(tmp_path):
    """torchrun passes SIGTERM to its processes, which save together; torchrun itself exits 1 (its own doing)."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "bertfast", "pretrain", "--output-dir", str(run), "--device", "cpu",
               "--corpus", write_corpus(tmp_path / "corpus.txt", n_docs=60), "--tokenizer",
               write_corpus_tokenizer(tmp_path / "vocab"), "--seq-len", "32", "--batch-size", "2",
               "--max-steps", "100000", "--eval-every", "0", "--save-every", "0", "--log-every", "1",
               "--no-progress"]
    process = subprocess.Popen(command, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2):
            assert time.monotonic() < deadline and process.poll() is None, "training did not start"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=90)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 1, output
    assert "SIGTERM: stopped after step" in output
    (checkpoint,) = run.glob("checkpoint-*")
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2 and state["step"] == int(checkpoint.name[11:])
    assert not list(run.glob(".checkpoint-*"))

"""A write that fails (size limit, full or read-only disk) is a one-line error naming the file and the cause."""

import resource
import subprocess
import sys

from tiny_runs import write_corpus, write_corpus_tokenizer


def test_a_checkpoint_that_cannot_be_written_is_named_with_its_cause(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "bertfast", "pretrain", "--output-dir", str(run), "--corpus",
               write_corpus(tmp_path / "corpus.txt"), "--tokenizer", write_corpus_tokenizer(tmp_path / "vocab"),
               "--seq-len", "32", "--batch-size", "4", "--max-steps", "2", "--save-every", "1", "--eval-every", "0",
               "--no-progress"]
    limit = 1 << 20  # the cache and tokenizer fit; a checkpoint of the tiny model (2 MB) does not

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(command, capture_output=True, text=True, preexec_fn=limit_file_size, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"bertfast pretrain: error: cannot write {run}/.checkpoint-1.tmp-")
    assert line.endswith("model.safetensors: the file size limit of this process was reached "
                         "(ulimit -f: 1,048,576 bytes)")
    assert not list(run.glob("checkpoint-*")) and not list(run.glob(".checkpoint-*"))

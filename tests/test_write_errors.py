"""A write that fails (size limit, full or read-only disk) is a one-line error naming the file and the cause."""

import resource

from tiny_runs import write_corpus, write_corpus_tokenizer

from bertfast.cli import main


def test_a_checkpoint_that_cannot_be_written_is_named_with_its_cause(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["pretrain", "--output-dir", str(run), "--corpus", write_corpus(tmp_path / "corpus.txt"), "--tokenizer",
            write_corpus_tokenizer(tmp_path / "vocab"), "--seq-len", "32", "--batch-size", "4", "--max-steps", "2",
            "--save-every", "1", "--eval-every", "0", "--no-progress"]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit = 1 << 20  # the cache and tokenizer fit; a checkpoint of the tiny model (2 MB) does not
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        code = main(args)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"bertfast pretrain: error: cannot write {run}/.checkpoint-1.tmp-")
    assert line.endswith("model.safetensors: the file size limit of this process was reached "
                         "(ulimit -f: 1,048,576 bytes)")
    assert not list(run.glob("checkpoint-*")) and not list(run.glob(".checkpoint-*"))

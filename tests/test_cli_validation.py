"""Bad options and inputs are found before any work, with exit code 2 and a message naming the option or file."""

import pytest
import torch
from tiny_runs import sentiment_rows, write_corpus, write_corpus_tokenizer, write_jsonl, write_pretrained

from bertfast.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def pretrain(tmp_path, *flags):
    return main(["pretrain", "--output-dir", str(tmp_path / "run"), "--corpus", write_corpus(tmp_path / "c.txt"),
                 "--seq-len", "32", "--batch-size", "4", "--max-steps", "2", "--no-progress", *flags])


@pytest.mark.parametrize(("flags", "message"), [
    (["--mask-prob", "1.5"], "mask_prob must be in [0, 1], got 1.5"),
    (["--mask-token-prob", "0.9", "--random-token-prob", "0.2"], "mask_token_prob + random_token_prob must be at"),
    (["--dist-timeout", "0"], "dist_timeout must be positive"),
    (["--vocab-size", "5"], "vocab_size must exceed BERT's 5 special tokens"),
    (["--resume", "latest", "--overwrite"], "--overwrite replaces the run in OUTPUT_DIR; --resume continues it"),
])
def test_bad_pretrain_options_are_usage_errors(tmp_path, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain(tmp_path, *flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_device_is_named(tmp_path, capsys):
    assert pretrain(tmp_path, "--device", "cuda") == 2
    assert "--device cuda was asked for, but CUDA is not available" in capsys.readouterr().err


def test_config_file_syntax_errors_name_the_line_and_column(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("batch_size: 8\nlr: [1e-3\n")
    (tmp_path / "run.json").write_text('{"lr": 1e-3,}')
    for name, message in (("run.yaml", "run.yaml: invalid YAML at line 3, column 1: expected ',' or ']'"),
                          ("run.json", "run.json: invalid JSON at line 1, column 13: Expecting property name")):
        with pytest.raises(SystemExit) as exit_info:
            main(["pretrain", "--config", str(tmp_path / name)])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bad_pretrain_inputs_fail_before_training(tmp_path, capsys):
    (tmp_path / "tokenizer.json").write_text("{garbage")
    assert pretrain(tmp_path, "--tokenizer", str(tmp_path / "tokenizer.json")) == 2
    err = capsys.readouterr().err
    assert f"tokenizer file {tmp_path / 'tokenizer.json'} is not a valid tokenizer.json: key must be a string at " \
           "line 1 column 2" in err

    assert pretrain(tmp_path, "--tokenizer", write_corpus_tokenizer(tmp_path / "vocab"), "--batch-size", "5000") == 2
    captured = capsys.readouterr()
    assert "fewer than one batch of 5000" in captured.err and "model:" not in captured.out

    (tmp_path / "a-file").write_text("")
    assert main(["pretrain", "--output-dir", str(tmp_path / "a-file" / "run"), "--no-progress"]) == 2
    assert f"--output-dir {tmp_path / 'a-file' / 'run'}: cannot write there: not a directory" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return write_pretrained(tmp_path_factory.mktemp("pretrained"))


def finetune(tmp_path, model, *flags, task="classification", rows=None):
    data = write_jsonl(tmp_path / "data.jsonl", rows or sentiment_rows(8))
    return main(["finetune", "--task", task, "--model", str(model), "--train", data, "--eval", data,
                 "--output-dir", str(tmp_path / "run"), "--no-progress", "--seq-len", "16", *flags])


def test_bad_finetune_models_are_named(pretrained, tmp_path, capsys):
    cases = [(tmp_path / "missing", "--model {}: no such directory"),
             (pretrained / "model.safetensors", "--model {} is a file; pass the directory that holds config.json"),
             (tmp_path, "--model {} holds no config.json: not a transformers model directory")]
    for model, message in cases:
        assert finetune(tmp_path, model) == 2
        assert message.format(model) in capsys.readouterr().err
    # A longer --seq-len than the model takes is its limit (a note, not a crash in the forward pass).
    assert finetune(tmp_path, pretrained, "--seq-len", "100", "--epochs", "1", "--batch-size", "8",
                    "--output-dir", str(tmp_path / "long")) == 0
    out = capsys.readouterr().out
    assert "note: --seq-len 100 exceeds the model's max_position_embeddings (64, in" in out
    assert "features of 64 tokens at most" in out

    small = tmp_path / "small"
    write_pretrained(small, vocab_size=12)
    for name in ("vocab.txt", "tokenizer.json"):
        (small / name).write_bytes((pretrained / name).read_bytes())
    assert finetune(tmp_path, small) == 2
    assert f"the tokenizer in {small} has 25 tokens, more than the model's vocab_size (12)" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_non_bio_tags_are_refused_before_training(pretrained, tmp_path, capsys):
    rows = [{"tokens": ["the", "movie"], "tags": ["O", "B-X"]}, {"tokens": ["a", "film"], "tags": ["O", "FILM"]}]
    assert finetune(tmp_path, pretrained, task="token-classification", rows=rows) == 2
    assert f"{tmp_path / 'data.jsonl'}:2: tag 'FILM' is not O, B-TYPE or I-TYPE" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_tokenizer_that_cannot_be_written_is_named(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    corpus = write_corpus(tmp_path / "c.txt")
    assert main(["tokenizer", "train", "--corpus", corpus, "--vocab-size", "60", "--output",
                 str(tmp_path / "a-file" / "vocab")]) == 1
    assert f"cannot write {tmp_path / 'a-file' / 'vocab'}: not a directory" in capsys.readouterr().err

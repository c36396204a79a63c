"""Options: config files (YAML/JSON), command-line precedence, validation, and --help coverage."""

import dataclasses
import json

import pytest

from bertfast.cli import main
from bertfast.training.config import PretrainConfig, load_config_file


def test_defaults_are_the_documented_default_run():
    config = PretrainConfig()
    assert (config.preset, config.corpus, config.seq_len, config.device) == ("tiny", ["builtin"], 128, "auto")


def test_yaml_file_with_dashes_and_strings_is_coerced(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("batch-size: 8\nlr: 1e-3\nwhole_word_mask: true\ncorpus: data/*.txt\noptimizer: lamb\n"
                    "tokenizer: null\nmax_steps: 1e3\n")
    config = PretrainConfig.from_dict(load_config_file(path))
    assert (config.batch_size, config.lr, config.whole_word_mask, config.optimizer) == (8, 1e-3, True, "lamb")
    assert config.corpus == ["data/*.txt"] and config.tokenizer is None and config.max_steps == 1000


def test_json_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"corpus": ["a.txt", "b.jsonl"], "seq_len": 64, "precision": "bf16"}))
    config = PretrainConfig.from_dict(load_config_file(path))
    assert (config.corpus, config.seq_len, config.precision) == (["a.txt", "b.jsonl"], 64, "bf16")


@pytest.mark.parametrize(("values", "message"), [
    ({"batch_sise": 8}, "unknown option"),
    ({"batch_size": "eight"}, "batch_size expects int"),
    ({"batch_size": 2.5}, "batch_size expects int"),
    ({"whole_word_mask": "sometimes"}, "whole_word_mask expects bool"),
    ({"optimizer": "sgd"}, "optimizer must be one of"),
    ({"batch_size": 0}, "batch_size must be positive"),
    ({"eval_fraction": 1.0}, "eval_fraction"),
])
def test_bad_values_are_rejected_with_the_option_name(values, message):
    with pytest.raises(ValueError, match=message):
        PretrainConfig.from_dict(values)


def test_command_line_overrides_the_config_file(tmp_path, monkeypatch):
    path = tmp_path / "run.yaml"
    path.write_text("batch_size: 8\nlr: 0.01\nmax_steps: 3\n")
    seen = {}
    monkeypatch.setattr("bertfast.training.pretrain", lambda config: seen.setdefault("config", config) and 0)
    assert main(["pretrain", "--config", str(path), "--lr", "0.002", "--corpus", "x.txt", "y.txt",
                 "--no-progress"]) == 0
    config = seen["config"]
    assert (config.batch_size, config.lr, config.max_steps) == (8, 0.002, 3)
    assert config.corpus == ["x.txt", "y.txt"] and config.progress is False


def test_bad_config_file_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--config", str(path)])
    assert exit_info.value.code == 2
    assert "must hold a mapping" in capsys.readouterr().err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = capsys.readouterr().out
    for field in dataclasses.fields(PretrainConfig):
        assert "--" + field.name.replace("_", "-") in text
    assert "--config" in text and "Exit codes" in text and "torchrun" in text

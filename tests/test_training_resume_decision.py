"""The one resume decision: which checkpoint, which options, what is refused, for both commands."""

import pytest
import torch

from bertfast.finetune import FinetuneConfig
from bertfast.io import CheckpointError
from bertfast.training import PretrainConfig
from bertfast.training.checkpoint import STATE_FILE
from bertfast.training.distributed import DistEnv
from bertfast.training.resume import FINETUNE, PRETRAIN, check_resume, decide_resume, resumed_options


def finetune_config(**overrides):
    values = dict(task="classification", model="pretrained", train="train.jsonl", eval="eval.jsonl", lr=3e-3)
    return FinetuneConfig(**{**values, **overrides})


def saved_run(tmp_path, config, world_size=1):
    last = tmp_path / "run" / "last"
    last.mkdir(parents=True)
    torch.save({"config": config.to_dict(), "world_size": world_size}, last / STATE_FILE)
    return tmp_path / "run"


def test_a_bare_finetune_resume_takes_the_runs_options(tmp_path):
    out = saved_run(tmp_path, finetune_config(output_dir="ignored", epochs=2, seed=7))
    values = resumed_options(FINETUNE, FinetuneConfig, {"output-dir": str(out), "resume": True, "epochs": 4})
    config = FinetuneConfig.from_dict(values)
    assert (config.task, config.model, config.lr, config.seed, config.epochs) == ("classification", "pretrained",
                                                                                  3e-3, 7, 4)
    assert (config.output_dir, config.resume) == (str(out), True)  # never the checkpoint's


def test_without_resume_the_options_are_those_given(tmp_path):
    saved_run(tmp_path, finetune_config())
    assert resumed_options(FINETUNE, FinetuneConfig, {"output_dir": str(tmp_path / "run"), "lr": 1.0}) == {
        "output_dir": str(tmp_path / "run"), "lr": 1.0}


def test_finetune_refuses_changed_training_options_and_process_counts(tmp_path):
    saved = {"config": finetune_config().to_dict(), "world_size": 1}
    applied, data = check_resume(FINETUNE, finetune_config(epochs=5), saved, "run/last", DistEnv())
    assert (applied, data) == (["--epochs 3 -> 5"], [])
    with pytest.raises(CheckpointError, match=r"--resume run/last: cannot change --lr 0.001 \(the run has 0.003\); "
                                              r"--seed 1 \(the run has 0\)\. A resumed fine-tuning run continues"):
        check_resume(FINETUNE, finetune_config(lr=1e-3, seed=1), saved, "run/last", DistEnv())
    with pytest.raises(CheckpointError, match=r"cannot change the number of processes 2 \(the run has 1\)"):
        check_resume(FINETUNE, finetune_config(), saved, "run/last", DistEnv(world_size=2))


def test_an_option_the_checkpoint_predates_counts_as_its_default():
    old = finetune_config().to_dict()
    del old["best_metric"], old["clip_norm"]
    saved = {"config": old, "world_size": 1}
    assert check_resume(FINETUNE, finetune_config(), saved, "run/last", DistEnv()) == ([], [])
    with pytest.raises(CheckpointError, match=r"--clip-norm 0.5 \(the run has 1.0\)"):
        check_resume(FINETUNE, finetune_config(clip_norm=0.5), saved, "run/last", DistEnv())


def test_pretrain_warns_on_a_different_data_stream_and_process_count():
    saved = {"config": PretrainConfig().to_dict(), "world_size": 2}
    applied, data = check_resume(PRETRAIN, PretrainConfig(lr=5e-4, seed=3), saved, "ckpt", DistEnv())
    assert (applied, data) == (["--lr 0.001 -> 0.0005"], ["--seed", "number of processes"])


def test_finetune_resume_without_a_finished_epoch_is_refused_and_pretrain_latest_starts_fresh(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="has no finished epoch to resume from"):
        decide_resume(FINETUNE, finetune_config(output_dir=str(tmp_path), resume=True), DistEnv())
    start = decide_resume(PRETRAIN, PretrainConfig(output_dir=str(tmp_path), resume="latest"), DistEnv())
    assert (start.checkpoint, start.state) == (None, None)
    assert f"no checkpoint in {tmp_path} yet: starting from scratch" in capsys.readouterr().out

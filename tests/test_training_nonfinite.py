"""The non-finite guard: a step with a NaN loss is skipped; too many in a row stop the run."""

import numpy as np
import pytest
import torch

from bertfast.training import PretrainConfig, Pretrainer
from bertfast.training.distributed import DistEnv

pytestmark = pytest.mark.usefixtures("one_thread")


def make_trainer(tmp_path, poison, **overrides):
    """A trainer whose model's loss is NaN on the forward calls (counted from 0) ``poison`` picks."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(30)]
    text = "\n\n".join("\n".join(" ".join(rng.choice(words, 8)) + " ." for _ in range(5)) for _ in range(20))
    if not (tmp_path / "corpus.txt").exists():  # rewriting it would make it another corpus for --resume
        (tmp_path / "corpus.txt").write_text(text)
    values = dict(corpus=[str(tmp_path / "corpus.txt")], output_dir=str(tmp_path / "run"), vocab_size=80,
                  seq_len=32, batch_size=4, max_steps=5, warmup_steps=0, eval_every=0, log_every=1,
                  progress=False, max_nonfinite_steps=3)
    values.update(overrides)
    trainer = Pretrainer(PretrainConfig(**values), DistEnv(), torch.device("cpu"))
    forward = trainer.model.forward
    calls = iter(range(10**6))

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if poison(next(calls)):
            out.loss = out.loss * float("nan")
        return out

    trainer.model.forward = poisoned
    return trainer


def test_a_nan_step_is_skipped_and_training_goes_on(tmp_path, capsys):
    trainer = make_trainer(tmp_path, lambda call: call == 1)
    assert trainer.train() == 0
    assert (trainer.step, trainer.guard.skipped) == (5, 1)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert "step 2: non-finite loss (nan); update skipped (1 in a row" in capsys.readouterr().out


def test_consecutive_nan_steps_stop_the_run(tmp_path, capsys):
    trainer = make_trainer(tmp_path, lambda call: call >= 1)
    assert trainer.train() == 1
    assert (trainer.step, trainer.guard.skipped) == (1, 3)
    out = capsys.readouterr().out
    assert "stopping: 3 consecutive steps had a non-finite loss" in out
    assert not (tmp_path / "run" / "final").exists()


def test_resuming_from_a_checkpoint_with_a_nan_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from bertfast.io import CheckpointError

    trainer = make_trainer(tmp_path, lambda call: False, max_steps=2, save_every=2)
    assert trainer.train() == 0
    weights_file = tmp_path / "run" / "checkpoint-2" / "model.safetensors"
    weights = load_file(weights_file)
    weights["bert.embeddings.word_embeddings.weight"][3, 1] = float("inf")
    save_file(weights, weights_file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"checkpoint-2 has non-finite weights \(bert.embeddings.word_emb"):
        make_trainer(tmp_path, lambda call: False, max_steps=4, resume="latest")

"""Fine-tuning never trains on, nor saves, non-finite values: NaN steps are skipped, NaN models refused."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_runs import sentiment_rows, write_jsonl, write_pretrained

from bertfast.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return write_pretrained(tmp_path_factory.mktemp("pretrained"))


def finetune(model, tmp_path, *extra):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(16, seed=1))
    evals = write_jsonl(tmp_path / "eval.jsonl", sentiment_rows(8, seed=2))
    return main(["finetune", "--task", "classification", "--model", str(model), "--train", train, "--eval", evals,
                 "--output-dir", str(tmp_path / "run"), "--no-progress", "--seq-len", "16", "--batch-size", "4",
                 "--epochs", "2", *extra])


def test_a_checkpoint_with_a_nan_weight_is_refused_at_load(pretrained, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in pretrained.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(broken / "model.safetensors")
    name = next(k for k in weights if k.endswith("query.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    assert finetune(broken, tmp_path) == 2
    assert "has non-finite weights (bert.encoder.layer.0.attention.self.query.weight)" in capsys.readouterr().err
    assert not (tmp_path / "run" / "best").exists()


def test_a_huge_learning_rate_stops_the_run_and_keeps_no_nonfinite_model(pretrained, tmp_path, capsys):
    assert finetune(pretrained, tmp_path, "--lr", "1e4", "--max-nonfinite-steps", "2") == 1
    captured = capsys.readouterr()
    # Either the guard stops training or the epoch's evaluation is not finite: no model is kept either way.
    assert ("stopping: 2 consecutive steps had a non-finite loss" in captured.err
            or "the evaluation gave non-finite loss; the model is not saved" in captured.err)
    assert "update skipped" in captured.out
    # An epoch that evaluated finitely before the divergence may have kept its model; nothing non-finite is kept.
    for name in ("best", "last"):
        if (tmp_path / "run" / name).exists():
            weights = load_file(tmp_path / "run" / name / "model.safetensors")
            assert all(torch.isfinite(w).all() for w in weights.values()), name


def test_a_nan_step_is_skipped_and_the_saved_model_is_finite(pretrained, tmp_path, monkeypatch, capsys):
    from bertfast.models import BertForSequenceClassification

    forward = BertForSequenceClassification.forward
    calls = iter(range(10**6))

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training and next(calls) == 1:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(BertForSequenceClassification, "forward", poisoned)
    assert finetune(pretrained, tmp_path) == 0
    assert "step 2: non-finite loss (nan)" in capsys.readouterr().out
    for name in ("best", "last"):
        weights = load_file(tmp_path / "run" / name / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values())

"""The training commands on a GPU: bf16/fp16 autocast, the Triton kernels with dropout, checkpoints from CUDA."""

from __future__ import annotations

import json

import pytest
import torch

import bertfast
from bertfast import BertConfig
from bertfast.cli import main

pytestmark = pytest.mark.gpu


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_pretrain_on_cuda_learns_and_saves(tmp_path, precision):
    run = tmp_path / "run"
    code = main(["pretrain", "--device", "cuda", "--precision", precision, "--output-dir", str(run),
                 "--max-steps", "60", "--seq-len", "128", "--batch-size", "32", "--vocab-size", "2000",
                 "--warmup-steps", "6", "--lr", "2e-3", "--eval-every", "30", "--save-every", "30",
                 "--log-every", "10", "--no-progress"])
    assert code == 0
    train = [r for r in records(run) if r["split"] == "train"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    model = bertfast.BertForPreTraining.from_pretrained(run / "final")  # written from CUDA, loads on CPU
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_training_step_with_dropout_is_finite_and_repeats_with_the_seed():
    config = BertConfig.from_preset("mini", vocab_size=1000)  # dropout 0.1 everywhere, as BERT trains
    device = torch.device("cuda")
    ids = torch.randint(5, 1000, (16, 128), device=device)
    mask = (torch.arange(128, device=device)[None, :] < torch.randint(1, 129, (16, 1), device=device)).long()
    labels = torch.where(torch.rand(16, 128, device=device) < 0.15, ids, -100)

    def step(seed):
        torch.manual_seed(0)
        model = bertfast.BertForPreTraining(config).to(device).train()
        torch.manual_seed(seed)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])

    loss1, grads1 = step(1)
    loss2, grads2 = step(1)
    loss3, _ = step(2)
    assert torch.isfinite(loss1) and torch.isfinite(grads1).all()
    assert torch.equal(loss1, loss2) and torch.equal(grads1, grads2)  # deterministic attention backward too
    assert not torch.equal(loss1, loss3)


def test_finetune_on_cuda(tmp_path):
    directory = tmp_path / "pretrained"
    words = "good great bad awful the a movie film was".split()
    directory.mkdir()
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    config = BertConfig(vocab_size=5 + len(words), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=64)
    bertfast.BertForPreTraining(config).save_pretrained(directory)
    rows = [{"text": f"the movie was {w}", "label": "pos" if w in ("good", "great") else "neg"}
            for w in ("good", "great", "bad", "awful") * 16]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    code = main(["finetune", "--task", "classification", "--model", str(directory), "--train", str(data),
                 "--eval", str(data), "--device", "cuda", "--epochs", "8", "--batch-size", "8", "--lr", "3e-3",
                 "--output-dir", str(out), "--no-progress"])
    assert code == 0
    evals = [r for r in records(out) if r["split"] == "eval"]
    assert max(r["accuracy"] for r in evals) >= 0.9  # chance is 0.5

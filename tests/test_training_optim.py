"""Optimizers and schedule: BERT's weight-decay groups, LAMB against a direct formula, warmup + decay."""

import pytest
import torch
from torch import nn

from bertfast.training.optim import BETAS, EPS, Lamb, build_optimizer, linear_schedule, parameter_groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = nn.Embedding(10, 4)
        self.dense = nn.Linear(4, 4)
        self.LayerNorm = nn.LayerNorm(4)

    def forward(self, ids):
        return self.LayerNorm(self.dense(self.embeddings(ids))).pow(2).sum()


def test_no_weight_decay_on_biases_and_layernorm():
    model = Tiny()
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = parameter_groups(model, 0.01)
    assert sorted(names[id(p)] for p in decay["params"]) == ["dense.weight", "embeddings.weight"]
    expected = ["LayerNorm.bias", "LayerNorm.weight", "dense.bias"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == expected
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)


def lamb_reference(p, grads, lr, wd, adapt):
    """LAMB written out step by step on plain tensors."""
    p = p.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for step, g in enumerate(grads, 1):
        m = BETAS[0] * m + (1 - BETAS[0]) * g
        v = BETAS[1] * v + (1 - BETAS[1]) * g * g
        update = (m / (1 - BETAS[0] ** step)) / ((v / (1 - BETAS[1] ** step)).sqrt() + EPS) + wd * p
        ratio = p.norm() / update.norm() if adapt else 1.0
        p = p - lr * ratio * update
    return p


@pytest.mark.parametrize(("wd", "adapt"), [(0.01, True), (0.0, False)])
def test_lamb_matches_the_formula(wd, adapt):
    torch.manual_seed(0)
    start = torch.randn(5, 3)
    grads = [torch.randn(5, 3) for _ in range(4)]
    param = nn.Parameter(start.clone())
    opt = Lamb([param], lr=0.05, weight_decay=wd, adapt=adapt)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    expected = lamb_reference(start, grads, 0.05, wd, adapt)
    torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-6)


def test_lamb_trust_ratio_leaves_zero_tensors_unscaled():
    param = nn.Parameter(torch.zeros(3))
    param.grad = torch.ones(3)
    Lamb([param], lr=0.1, weight_decay=0.01).step()
    torch.testing.assert_close(param.detach(), torch.full((3,), -0.1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_optimizers_reduce_a_loss_and_round_trip_their_state(name):
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer(name, model, lr=0.01, weight_decay=0.01)
    ids = torch.arange(10)
    first = model(ids).item()
    for _ in range(20):
        opt.zero_grad()
        model(ids).backward()
        opt.step()
    assert model(ids).item() < first
    clone = build_optimizer(name, model, lr=0.01, weight_decay=0.01)
    clone.load_state_dict(opt.state_dict())
    assert clone.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("sgd", model, 0.1, 0.0)


def test_linear_warmup_then_linear_decay_to_zero():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    schedule = linear_schedule(opt, warmup_steps=4, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(schedule.get_last_lr()[0])
        opt.step()
        schedule.step()
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4:] == pytest.approx([1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert schedule.get_last_lr()[0] == 0.0

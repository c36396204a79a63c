"""The one optimizer step of pretraining and fine-tuning: accumulation, scaling, the non-finite guard, clipping."""

import copy
import math

import pytest
import torch

from bertfast import BertConfig, BertForSequenceClassification
from bertfast.training.guard import NonFiniteError
from bertfast.training.optim import linear_schedule
from bertfast.training.step import OptimizerStep

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def batch(n, seed, length=8):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(5, 50, (n, length), generator=g),
            "attention_mask": torch.ones(n, length, dtype=torch.long),
            "labels": torch.randint(0, 3, (n,), generator=g)}


def split(big, sizes):
    parts, start = [], 0
    for size in sizes:
        parts.append({k: v[start:start + size] for k, v in big.items()})
        start += size
    return parts


def make_step(model, precision="fp32", clip_norm=0.0, max_nonfinite_steps=3, lr=0.1, warmup=0, total=100,
              messages=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = linear_schedule(optimizer, warmup, total)
    say = messages.append if messages is not None else (lambda message: None)
    return OptimizerStep(model, optimizer, scheduler, precision=precision, device=torch.device("cpu"),
                         clip_norm=clip_norm, max_nonfinite_steps=max_nonfinite_steps, hint="try less", say=say)


def loss_of(module, batch):
    return module(**batch).loss


def nan_loss_of(module, batch):
    return module(**batch).loss * float("nan")


def test_accumulated_micro_batches_equal_one_big_batch():
    big = batch(8, seed=1)
    one, accumulated = tiny_model(), tiny_model()
    whole = make_step(one)([big], loss_of, 1)
    # Unequal micro-batches (an epoch's last one is smaller): each weighs what it holds.
    parts = make_step(accumulated)(split(big, [5, 3]), loss_of, 1)
    assert parts.applied and whole.applied
    assert parts.loss == pytest.approx(whole.loss, rel=1e-6)
    assert parts.grad_norm == pytest.approx(whole.grad_norm, rel=1e-5)
    for (name, a), b in zip(one.named_parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_the_gradient_norm_is_taken_once_before_clipping_and_the_update_is_clipped():
    big = batch(6, seed=2)
    free, clipped = tiny_model(), tiny_model()
    start = copy.deepcopy(free.state_dict())
    unclipped = make_step(free, lr=1.0)([big], loss_of, 1)
    result = make_step(clipped, lr=1.0, clip_norm=0.01)([big], loss_of, 1)
    assert result.grad_norm == pytest.approx(unclipped.grad_norm, rel=1e-6) and result.grad_norm > 0.01
    # SGD at lr 1: the update is the gradient, so its norm is the clipped norm, in the same direction.
    free_update = torch.cat([(start[n] - p.detach()).flatten() for n, p in free.named_parameters()])
    clipped_update = torch.cat([(start[n] - p.detach()).flatten() for n, p in clipped.named_parameters()])
    assert clipped_update.norm().item() == pytest.approx(0.01, rel=1e-4)
    torch.testing.assert_close(clipped_update, free_update * (0.01 / unclipped.grad_norm), rtol=1e-3, atol=1e-7)


def test_a_non_finite_loss_skips_the_step_counts_it_and_stops_after_the_limit():
    model = tiny_model()
    messages = []
    step = make_step(model, max_nonfinite_steps=3, messages=messages)
    before = copy.deepcopy(model.state_dict())
    for number in (1, 2):
        result = step([batch(4, seed=number)], nan_loss_of, number)
        assert not result.applied and result.skipped_for == "loss"
    assert (step.guard.consecutive, step.guard.skipped) == (2, 2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())  # the poisoned gradients are dropped
    assert messages[0] == "step 1: non-finite loss (nan); update skipped (1 in a row, stopping at 3)"
    assert step([batch(4, seed=3)], loss_of, 3).applied  # a good step resets the run of skips
    assert (step.guard.consecutive, step.guard.skipped) == (0, 2)
    for number in (4, 5):
        step([batch(4, seed=number)], nan_loss_of, number)
    with pytest.raises(NonFiniteError, match="stopping: 3 consecutive steps had a non-finite loss"):
        step([batch(4, seed=6)], nan_loss_of, 6)


class _InfiniteGradient(torch.autograd.Function):
    """0 in the forward pass; an infinite gradient for its input in the backward one."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return grad.new_full(ctx.shape, float("inf"))


def infinite_gradient_of(module, batch):
    return module(**batch).loss + _InfiniteGradient.apply(module.classifier.bias)


def test_a_non_finite_gradient_with_a_finite_loss_is_skipped():
    step = make_step(tiny_model())
    result = step([batch(4, seed=1)], infinite_gradient_of, 1)
    assert (result.applied, result.skipped_for, step.guard.consecutive) == (False, "gradient norm", 1)
    assert math.isfinite(result.loss) and result.grad_norm == float("inf")
    assert step.scheduler.last_epoch == 0


def test_the_schedule_advances_on_applied_steps_only():
    model = tiny_model()
    step = make_step(model, lr=1.0, warmup=4, total=8)
    lrs = []
    for number, fn in enumerate((loss_of, nan_loss_of, loss_of, nan_loss_of, loss_of), start=1):
        result = step([batch(4, seed=number)], fn, number)
        lrs.append((result.applied, result.lr))
    # Warmup 1/5, 2/5, 3/5 of the peak over the three applied steps; a skipped one has the next step's lr.
    assert lrs == [(True, 0.2), (False, 0.4), (True, 0.4), (False, 0.6), (True, 0.6)]
    assert step.scheduler.last_epoch == 3


def test_bf16_and_fp32_have_no_scaler():
    for precision in ("fp32", "bf16"):
        step = make_step(tiny_model(), precision=precision)
        assert not step.scaler.is_enabled()
        assert step([batch(4, seed=1)], loss_of, 1).applied


def test_fp16_overflow_lowers_the_scale_without_counting_and_a_good_step_updates():
    model = tiny_model()
    messages = []
    step = make_step(model, precision="fp16", max_nonfinite_steps=1, messages=messages)
    assert step.scaler.is_enabled() and step.scaler.get_scale() == 2.0**16
    before = copy.deepcopy(model.state_dict())

    result = step([batch(4, seed=1)], infinite_gradient_of, 1)
    assert (result.applied, result.skipped_for) == (False, "fp16 overflow")
    assert step.scaler.get_scale() == 2.0**15  # halved by scaler.update
    assert step.guard.consecutive == 0  # the scaler's routine: max_nonfinite_steps=1 did not stop the run
    assert step.scheduler.last_epoch == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert messages == ["step 1: fp16 gradient overflow at loss scale 65536; update skipped, the scale is now 32768"]

    result = step([batch(4, seed=2)], loss_of, 2)
    assert result.applied and step.scheduler.last_epoch == 1
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert step.scaler.get_scale() == 2.0**15  # growth only after growth_interval clean steps


def test_fp16_overflow_at_a_scale_of_one_counts_as_non_finite():
    step = make_step(tiny_model(), precision="fp16", max_nonfinite_steps=2)
    step.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    assert step([batch(4, seed=1)], infinite_gradient_of, 1).skipped_for == "fp16 overflow"
    assert step.guard.consecutive == 1
    with pytest.raises(NonFiniteError):
        step([batch(4, seed=2)], infinite_gradient_of, 2)

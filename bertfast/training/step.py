"""One optimizer step, the same for pretraining and fine-tuning.

A step is a list of micro-batches whose gradients add up (gradient accumulation). Each micro-batch's
mean loss is weighted by its share of the step's examples, so the accumulated gradient is that of one
batch holding them all, even when the last micro-batch of an epoch is smaller. Under
DistributedDataParallel the gradients are averaged over processes on the last micro-batch only.

Precision: autocast to bf16 or fp16 around the forward pass; fp16 scales the loss with a
``GradScaler`` (bf16 and fp32 need none: the scaler is disabled and every call to it is a no-op).

After the backward passes the gradients are unscaled, their global norm is computed once, and they
are clipped to ``clip_norm`` (0: not clipped). The step is applied only when the loss (over all
processes) and the gradient norm are finite. Otherwise it is skipped: no update, gradients dropped.

* A skipped step does not advance the learning-rate schedule, nor the trainers' step count: the
  schedule counts the updates the model receives, so warmup and decay span real updates.
* The non-finite guard counts skipped steps; ``max_nonfinite_steps`` in a row raise
  :class:`~bertfast.training.guard.NonFiniteError`. An fp16 gradient overflow (finite loss, overflowing
  gradients) at a loss scale above 1 is the scaler's routine, not counted: a fresh scaler starts at
  2^16 and often overflows on the first steps, halving its scale each time. At a scale of 1 or less
  the gradients overflow fp16 even unscaled, so the overflow counts.
* ``scaler.update`` runs after every step, applied or skipped: it halves the scale after an overflow
  and doubles it after ``growth_interval`` clean steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bertfast.training.distributed import DistEnv, all_reduce
from bertfast.training.guard import NonFiniteError, NonFiniteGuard
from bertfast.training.precision import resolve_precision

Batch = Mapping[str, Tensor]


@dataclass(frozen=True)
class StepResult:
    applied: bool
    loss: float  # the example-weighted mean loss of the micro-batches, averaged over processes
    grad_norm: float  # the global gradient norm after unscaling, before clipping
    lr: float  # the learning rate the step had (applied or not)
    skipped_for: str | None = None  # "loss", "gradient norm" or "fp16 overflow"


class OptimizerStep:
    """Accumulate, scale, check, clip and apply one step; ``scaler`` and ``guard`` are saved with checkpoints.

    ``loss_of(module, batch)`` runs the forward pass (under autocast) and returns the batch's mean loss;
    ``module`` is the DistributedDataParallel wrapper when there is one, else ``model``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *, precision: str,
                 device: torch.device, clip_norm: float, max_nonfinite_steps: int, hint: str,
                 env: DistEnv | None = None, ddp: nn.Module | None = None,
                 say: Callable[[str], None] = print) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.precision, self.amp_dtype = resolve_precision(precision, device)
        self.device = device
        self.clip_norm = clip_norm
        self.env = env or DistEnv()
        self.module = ddp or model
        self.ddp = ddp
        self.say = say
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.guard = NonFiniteGuard(max_nonfinite_steps, hint)

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def __call__(self, micro_batches: Sequence[Batch], loss_of: Callable[[nn.Module, Batch], Tensor],
                 number: int) -> StepResult:
        """Step ``number`` (counted from 1, for messages) over ``micro_batches``; raises NonFiniteError
        when it is the ``max_nonfinite_steps``-th skipped step in a row."""
        examples = sum(len(batch["input_ids"]) for batch in micro_batches)
        loss = torch.zeros((), device=self.device, dtype=torch.float32)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with self.ddp.no_sync() if self.ddp is not None and not last else nullcontext():
                with self.autocast():
                    part = loss_of(self.module, batch).float() * (len(batch["input_ids"]) / examples)
                self.scaler.scale(part).backward()
            loss += part.detach()
        loss = all_reduce(loss, self.env) / self.env.world_size  # non-finite anywhere: non-finite everywhere

        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)  # the same on every process: gradients are averaged
        lr = self.optimizer.param_groups[0]["lr"]
        loss_value, norm_value = loss.item(), grad_norm.item()
        skipped_for = None
        if not torch.isfinite(loss):
            skipped_for = "loss"
        elif not torch.isfinite(grad_norm):
            skipped_for = "fp16 overflow" if self.scaler.is_enabled() else "gradient norm"
        if skipped_for is None:
            if self.clip_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), self.clip_norm, grad_norm)
            self.scaler.step(self.optimizer)  # (the unscaled gradients are finite: the scaler applies them)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if skipped_for is None:
            self.scheduler.step()
            self.guard.ok()
            return StepResult(True, loss_value, norm_value, lr)
        if skipped_for == "fp16 overflow" and scale > 1.0:
            self.say(f"step {number}: fp16 gradient overflow at loss scale {scale:g}; update skipped, the scale "
                     f"is now {self.scaler.get_scale():g}")
            return StepResult(False, loss_value, norm_value, lr, skipped_for)
        self.guard.skip()
        what = f"loss ({loss_value})" if skipped_for == "loss" else \
            f"gradient norm ({norm_value}; loss {loss_value:.4g})"
        self.say(f"step {number}: non-finite {what}; update skipped ({self.guard.consecutive} in a row, stopping "
                 f"at {self.guard.max_consecutive})")
        if self.guard.exhausted:
            raise NonFiniteError(self.guard.stop_message())
        return StepResult(False, loss_value, norm_value, lr, skipped_for)

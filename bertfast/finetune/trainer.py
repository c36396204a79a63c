"""The fine-tuning loop behind ``bertfast finetune``: AdamW with linear warmup and decay, one evaluation per epoch.

After each epoch's evaluation the model is saved to ``OUTPUT_DIR/last`` and, when the task's main
metric improved, to ``OUTPUT_DIR/best`` (transformers' format plus the tokenizer files, written
atomically), so ``transformers.AutoModelFor...`` and bertfast's classes both load either; the best
model's predictions on the evaluation data go to ``OUTPUT_DIR/predictions.jsonl``. With
``eval_only`` a fine-tuned model is evaluated as it is. ``last/`` also holds the trainer state
(optimizer, schedule, RNG states, best record), so ``resume`` continues after the last finished
epoch exactly as an uninterrupted run would have.

Under ``torchrun`` every process trains on its share of each epoch (DistributedDataParallel; gloo
on CPU, NCCL on GPU); the first process evaluates and writes everything while the others wait.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from bertfast.data import load_tokenizer
from bertfast.finetune.config import FinetuneConfig
from bertfast.finetune.data import DataError, RowErrors
from bertfast.finetune.preflight import (
    check_bio_tags,
    check_model_directory,
    check_tokenizer_fits,
    fitted_seq_len,
)
from bertfast.finetune.results import write_eval_results
from bertfast.finetune.tasks import Feature, collate, load_fine_tuned, make_task
from bertfast.io import CheckpointError, atomic_write_text, load_state_dict
from bertfast.training.checkpoint import STATE_FILE, capture_rng, load_state, restore_rng, write_checkpoint
from bertfast.training.distributed import (
    DistEnv,
    DistributedStall,
    all_reduce,
    barrier,
    gather_to_main,
    init_distributed,
    is_collective_failure,
    pick_device,
    report_progress,
    shutdown,
    stall_message,
)
from bertfast.training.guard import NonFiniteError, NonFiniteGuard, check_finite_model
from bertfast.training.metrics import MetricsLog
from bertfast.training.optim import build_optimizer, linear_schedule
from bertfast.training.precision import resolve_precision
from bertfast.training.rundir import FINETUNE_FILES, RunDirectory

# Options a resumed run must share with the run it continues (--epochs may grow: the schedule stretches).
_RESUME_OPTIONS = ("task", "model", "train", "regression", "batch_size", "grad_accum", "lr", "warmup_ratio",
                   "weight_decay", "clip_norm", "seq_len", "max_answer_length", "precision", "seed",
                   "data_format", "text_column", "text_pair_column", "label_column", "column_names", "label_names",
                   "best_metric")


def finetune(config: FinetuneConfig) -> int:
    """Fine-tune as ``config`` says (in each process under torchrun); returns the exit code (0)."""
    env, device = init_distributed(config.device, config.dist_timeout)
    run_dir = None
    try:
        if env.is_main:
            run_dir = RunDirectory.open(config.output_dir, FINETUNE_FILES, resume=config.resume,
                                        overwrite=config.overwrite, eval_only=config.eval_only, say=tqdm.write)
        Finetuner(config, env, device).run()
    except RuntimeError as e:
        if env.enabled and is_collective_failure(e):
            raise DistributedStall(stall_message(env, e)) from e
        raise
    finally:
        if run_dir is not None:
            run_dir.release()
        shutdown(env)
    return 0


class Finetuner:
    """``on_epoch(epoch, record)`` is called after each epoch's evaluation (``bertfast glue``'s progress)."""

    def __init__(self, config: FinetuneConfig, env: DistEnv | None = None,
                 device: torch.device | None = None,
                 on_epoch: Callable[[int, dict[str, Any]], None] | None = None) -> None:
        self.config = config
        self.on_epoch = on_epoch
        self.errors = RowErrors(config.skip_bad_rows)
        self.env = env or DistEnv()
        self.out = Path(config.output_dir)
        self.device = device or pick_device(config.device, self.env)
        self.precision, self.amp_dtype = resolve_precision(config.precision, self.device)
        for seeded in (random.seed, np.random.seed, torch.manual_seed):
            seeded(config.seed)

        model_config = check_model_directory(config)
        self.seq_len = fitted_seq_len(config, model_config, self.say)
        self.tokenizer = load_tokenizer(config.model)
        check_tokenizer_fits(self.tokenizer, model_config, config.model)
        if config.eval_only:
            model = self._fine_tuned_model()
            self.train_examples = []
        else:
            self.task = make_task(config.task, config.regression, config.max_answer_length,
                                  config.data_options(), self.errors)
            self.train_examples = self.task.read(config.train)
            overrides = self.task.label_config(self.train_examples)
            model = self.task.model_class.from_pretrained(config.model, **overrides)
        check_finite_model(model, f"the model in {config.model}", CheckpointError)
        self.eval_examples = self.task.read(config.eval)
        check_bio_tags(self.train_examples + self.eval_examples)
        self.train_features = self.task.encode(self.train_examples, self.tokenizer, self.seq_len)
        self.eval_features = self.task.encode(self.eval_examples, self.tokenizer, self.seq_len)
        self.model = model.to(self.device).train()
        self.guard = NonFiniteGuard(config.max_nonfinite_steps)
        self.ddp = None
        if self.env.enabled and not config.eval_only:
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        examples_per_step = config.batch_size * config.grad_accum
        shard = math.ceil(len(self.train_features) / self.env.world_size)  # DistributedSampler's share
        self.steps_per_epoch = math.ceil(shard / examples_per_step)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.optimizer = build_optimizer("adamw", self.model, config.lr, config.weight_decay)
        self.scheduler = linear_schedule(self.optimizer, round(config.warmup_ratio * self.total_steps),
                                         self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step, self.start_epoch = 0, 1
        self.best: dict[str, Any] | None = None
        if config.resume:
            self._resume()
        self.main_metric = config.best_metric or self.task.main_metric
        self.say(f"{config.task}: {len(self.train_examples)} train / {len(self.eval_examples)} eval examples "
                 f"({len(self.train_features)} / {len(self.eval_features)} features of {self.seq_len} tokens "
                 f"at most); {self.model.num_parameters() / 1e6:.2f}M parameters, {self.precision} on {self.device}"
                 + (f" x {self.env.world_size} processes" if self.env.enabled else ""))

    def say(self, message: str) -> None:
        if self.env.is_main:
            tqdm.write(message)

    def _fine_tuned_model(self) -> Any:
        """The model to evaluate as it is: every weight of the task's head must be in the checkpoint."""
        cfg = self.config
        model, self.task = load_fine_tuned(cfg.model, cfg.task, cfg.regression, cfg.max_answer_length,
                                           cfg.data_options(), self.errors)
        return model

    def _resume(self) -> None:
        """Load ``OUTPUT_DIR/last``: weights, optimizer, schedule, scaler, RNG states, step and best record."""
        last = self.out / "last"
        if not (last / STATE_FILE).is_file():
            raise CheckpointError(f"{self.out} has no finished epoch to resume from (no last/{STATE_FILE})")
        state = load_state(last)
        # (a run saved before an option existed ran with its default)
        defaults = {f.name: f.default for f in fields(FinetuneConfig)}
        changed = [k for k in _RESUME_OPTIONS if state["config"].get(k, defaults[k]) != getattr(self.config, k)]
        if changed:
            raise CheckpointError(f"--resume: {', '.join('--' + k.replace('_', '-') for k in changed)} "
                                  f"differ from the run in {self.out}; a resumed run must keep them")
        if state["world_size"] != self.env.world_size:
            raise CheckpointError(f"--resume: the run in {self.out} used {state['world_size']} processes, "
                                  f"this one has {self.env.world_size}")
        self.model.load_checkpoint_state(load_state_dict(last), strict=True, source=str(last))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"][self.env.rank])
        self.step, self.start_epoch, self.best = state["step"], state["epoch"] + 1, state["best"]
        self.say(f"resuming after epoch {state['epoch']} (step {self.step}) from {last}")

    def _state(self, epoch: int, rng: list[dict[str, Any]]) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "epoch": epoch, "step": self.step, "best": self.best,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng, "world_size": self.env.world_size}

    def _loader(self, features: list[Feature], shuffle: bool, epoch: int = 0) -> DataLoader:
        collate_fn = partial(collate, pad_id=self.tokenizer.pad_id)
        if shuffle and self.env.enabled:
            # Each process its own share of one permutation (padded with repeats to equal shares).
            sampler = DistributedSampler(features, self.env.world_size, self.env.rank, seed=self.config.seed)
            sampler.set_epoch(epoch)
            return DataLoader(features, batch_size=self.config.batch_size, sampler=sampler, collate_fn=collate_fn)
        return DataLoader(features, batch_size=self.config.batch_size, shuffle=shuffle, collate_fn=collate_fn,
                          generator=torch.Generator().manual_seed(self.config.seed + epoch))

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _write_model(self, directory: Path) -> None:
        self.model.config.extra.update(self.task.config_updates())
        self.model.save_pretrained(directory)
        self.tokenizer.tokenizer.no_truncation()  # the encoding limit of this run is not the tokenizer's
        self.tokenizer.save(directory)

    def run(self) -> dict[str, Any]:
        """Train for the configured epochs; returns the best evaluation record."""
        cfg = self.config
        if not self.env.is_main:
            return self._follow()
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "finetune_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        self.metrics = MetricsLog(self.out / "metrics.jsonl", self.step if cfg.resume else None)
        if cfg.eval_only:
            scores, predictions = self.evaluate()
            self._check_finite_result(scores, "evaluation")
            self.best = {"split": "eval", "epoch": 0, "step": 0, **scores}
            self.metrics.write(self.best)
            self._write_predictions(predictions)
            self._finish()
            self.say(f"eval {self._shown(scores)} (predictions in {self.out / 'predictions.jsonl'})")
            return self.best
        for epoch in range(self.start_epoch, cfg.epochs + 1):
            self.train_epoch(epoch)
            report_progress(self.env, f"evaluating epoch {epoch} (rank 0; the others wait)")
            rng = gather_to_main(capture_rng(), self.env)  # (the others wait while this process evaluates)
            scores, predictions = self.evaluate()
            record = {"split": "eval", "epoch": epoch, "step": self.step, **scores}
            self.metrics.write(record)
            self._check_finite_result(scores, f"epoch {epoch}")
            if self.main_metric not in record:
                raise DataError(f"--best-metric {self.main_metric}: the evaluation gives no such metric; it gives "
                                f"{', '.join(scores)}")
            if self.best is None or record[self.main_metric] > self.best[self.main_metric]:
                self.best = record
                write_checkpoint(self.out / "best", self._write_model, None)
                self._write_predictions(predictions)
            # last/ comes after best/: a crash between them resumes from the epoch before, which repeats exactly
            write_checkpoint(self.out / "last", self._write_model, self._state(epoch, rng))
            self.say(f"epoch {epoch}: eval {self._shown(scores)}")
            if self.on_epoch is not None:
                self.on_epoch(epoch, record)
            barrier(self.env)
        self._finish()
        best = self.best
        self.say(f"best: epoch {best['epoch']}, {self.main_metric} {best[self.main_metric]:.4f} "
                 f"-> {self.out / 'best'} (last epoch in {self.out / 'last'})")
        return best

    def _finish(self) -> None:
        """eval_results.json of the best evaluation; the bad rows skipped, if any."""
        write_eval_results(self.out, self.best, len(self.eval_examples))
        report = self.errors.report()
        if report:
            self.say(report)

    def _check_finite_result(self, scores: dict[str, float], when: str) -> None:
        """Stop before a model with non-finite weights or evaluation scores is written as best/ or last/."""
        check_finite_model(self.model, f"the model after {when}")
        bad = [k for k, v in scores.items() if not math.isfinite(v)]
        if bad:
            raise NonFiniteError(f"{when}: the evaluation gave non-finite {', '.join(bad)}; the model is not saved")

    def _follow(self) -> dict[str, Any]:
        """A process other than the first: train its shares in step with the first, which does the rest."""
        if not self.config.eval_only:
            for epoch in range(self.start_epoch, self.config.epochs + 1):
                self.train_epoch(epoch)
                report_progress(self.env, f"evaluating epoch {epoch} (rank 0; the others wait)")
                gather_to_main(capture_rng(), self.env)
                barrier(self.env)
        return {}

    @staticmethod
    def _shown(scores: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.4f}" for k, v in scores.items())

    def _write_predictions(self, predictions: list[Any]) -> None:
        """predictions.jsonl: one line per evaluation example, {"prediction": ..., "label": ...}."""
        lines = (json.dumps({"prediction": p, "label": self.task.gold(e)})
                 for p, e in zip(predictions, self.eval_examples, strict=True))
        atomic_write_text(self.out / "predictions.jsonl", "".join(line + "\n" for line in lines))

    def _steps(self, epoch: int) -> Any:
        """The epoch's optimizer steps, each a list of up to ``grad_accum`` batches."""
        batches = iter(self._loader(self.train_features, shuffle=True, epoch=epoch))
        while step := list(itertools.islice(batches, self.config.grad_accum)):
            yield step

    def train_epoch(self, epoch: int) -> None:
        cfg = self.config
        window_loss, window_steps = 0.0, 0
        bar = tqdm(self._steps(epoch), total=self.steps_per_epoch, desc=f"epoch {epoch}",
                   disable=not cfg.progress or not self.env.is_main, leave=False)
        model = self.ddp or self.model
        for step in bar:
            report_progress(self.env, f"training step {self.step + 1} (epoch {epoch})")
            examples = sum(len(batch["input_ids"]) for batch in step)
            loss = torch.zeros((), device=self.device)
            for i, batch in enumerate(step):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                # DDP averages the gradients over processes on the step's last batch only
                last = i == len(step) - 1
                with model.no_sync() if self.ddp is not None and not last else nullcontext():
                    with self._autocast():
                        # each batch's mean loss, weighted by its share of the step's examples
                        part = model(**batch).loss * (len(batch["input_ids"]) / examples)
                    self.scaler.scale(part).backward()
                loss += part.detach()
            loss = all_reduce(loss, self.env) / self.env.world_size
            if not self._apply_step(loss):
                continue
            self.step += 1
            window_loss += loss.item()
            window_steps += 1
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if self.env.is_main and (self.step % cfg.log_every == 0 or self.step % self.steps_per_epoch == 0):
                self.metrics.write({"split": "train", "epoch": epoch, "step": self.step,
                                    "loss": window_loss / window_steps, "lr": self.scheduler.get_last_lr()[0]})
                window_loss, window_steps = 0.0, 0

    def _apply_step(self, loss: torch.Tensor) -> bool:
        """Clip and apply the accumulated gradients; False (nothing applied) when the loss or gradient norm
        is not finite. Loss and gradients are all-reduced, so every process decides the same."""
        cfg = self.config
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_norm if cfg.clip_norm > 0
                                                   else float("inf"))
        # The fp16 scaler skips overflowing gradients itself (and lowers its scale).
        finite = bool(torch.isfinite(loss)) and (self.scaler.is_enabled() or bool(torch.isfinite(grad_norm)))
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.guard.ok()
        else:
            self.scaler.update()
            self.guard.skip()
            self.say(f"step {self.step + 1}: non-finite loss ({loss.item()}) or gradient norm ({grad_norm.item()}); "
                     f"update skipped ({self.guard.consecutive} in a row, stopping at {self.guard.max_consecutive})")
        self.optimizer.zero_grad(set_to_none=True)
        if self.guard.exhausted:
            raise NonFiniteError(self.guard.stop_message())
        if finite:
            self.scheduler.step()
        return finite

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], list[Any]]:
        """(the eval loss (mean over features) and the task's metrics, one prediction per eval example)."""
        self.model.eval()
        loss_sum, outputs = 0.0, []
        for batch in self._loader(self.eval_features, shuffle=False):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self._autocast():
                output = self.model(**batch)
            loss_sum += output.loss.item() * batch["input_ids"].shape[0]
            outputs.extend(self.task.split_outputs(output, batch))
        self.model.train()
        scores = self.task.score(self.eval_examples, self.eval_features, outputs)
        predictions = self.task.predict(self.eval_examples, self.eval_features, outputs)
        return {"loss": loss_sum / len(self.eval_features), **scores}, predictions

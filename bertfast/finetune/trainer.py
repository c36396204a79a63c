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
from bertfast.training.checkpoint import capture_rng, restore_rng, write_checkpoint
from bertfast.training.distributed import (
    DistEnv,
    barrier,
    gather_to_main,
    pick_device,
    report_progress,
)
from bertfast.training.guard import NonFiniteError, check_finite_model
from bertfast.training.metrics import MetricsLog
from bertfast.training.optim import build_optimizer, linear_schedule
from bertfast.training.precision import resolve_precision
from bertfast.training.resume import FINETUNE, RunStart, decide_resume, training_run
from bertfast.training.step import OptimizerStep


def finetune(config: FinetuneConfig) -> int:
    """Fine-tune as ``config`` says (in each process under torchrun); returns the exit code (0)."""
    with training_run(FINETUNE, config, tqdm.write) as (env, device, start):
        Finetuner(config, env, device, start=start).run()
    return 0


class Finetuner:
    """``on_epoch(epoch, record)`` is called after each epoch's evaluation (``bertfast glue``'s progress)."""

    def __init__(self, config: FinetuneConfig, env: DistEnv | None = None,
                 device: torch.device | None = None,
                 on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
                 start: RunStart | None = None) -> None:
        """``start`` is the decision of :func:`~bertfast.training.resume.start_run` (made here when None)."""
        self.config = config
        self.on_epoch = on_epoch
        self.errors = RowErrors(config.skip_bad_rows)
        self.env = env or DistEnv()
        self.out = Path(config.output_dir)
        self.device = device or pick_device(config.device, self.env)
        self.precision = resolve_precision(config.precision, self.device)[0]
        start = start or decide_resume(FINETUNE, config, self.env, self.say)
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
        self.optimizer_step = OptimizerStep(
            self.model, self.optimizer, self.scheduler, precision=self.precision, device=self.device,
            clip_norm=config.clip_norm, max_nonfinite_steps=config.max_nonfinite_steps,
            hint="try a lower --lr, more --warmup-ratio or --precision bf16/fp32", env=self.env, ddp=self.ddp,
            say=self.say)
        self.step, self.start_epoch = 0, 1
        self.best: dict[str, Any] | None = None
        if start.checkpoint is not None:
            self._resume(start)
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

    def _resume(self, start: RunStart) -> None:
        """Load ``OUTPUT_DIR/last``: weights, optimizer, schedule, scaler, RNG states, step and best record."""
        last, state = start.checkpoint, start.state
        self.model.load_checkpoint_state(load_state_dict(last), strict=True, source=str(last))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.optimizer_step.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"][self.env.rank])
        self.step, self.start_epoch, self.best = state["step"], state["epoch"] + 1, state["best"]
        self.say(f"resuming after epoch {state['epoch']} (step {self.step}) from {last}")

    def _state(self, epoch: int, rng: list[dict[str, Any]]) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "epoch": epoch, "step": self.step, "best": self.best,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.optimizer_step.scaler.state_dict(), "rng": rng, "world_size": self.env.world_size}

    def _loader(self, features: list[Feature], shuffle: bool, epoch: int = 0) -> DataLoader:
        collate_fn = partial(collate, pad_id=self.tokenizer.pad_id)
        if shuffle and self.env.enabled:
            # Each process its own share of one permutation (padded with repeats to equal shares).
            sampler = DistributedSampler(features, self.env.world_size, self.env.rank, seed=self.config.seed)
            sampler.set_epoch(epoch)
            return DataLoader(features, batch_size=self.config.batch_size, sampler=sampler, collate_fn=collate_fn)
        return DataLoader(features, batch_size=self.config.batch_size, shuffle=shuffle, collate_fn=collate_fn,
                          generator=torch.Generator().manual_seed(self.config.seed + epoch))

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
        for step in bar:
            report_progress(self.env, f"training step {self.step + 1} (epoch {epoch})")
            batches = [{k: v.to(self.device) for k, v in batch.items()} for batch in step]
            result = self.optimizer_step(batches, lambda module, batch: module(**batch).loss, self.step + 1)
            if not result.applied:
                continue
            self.step += 1
            window_loss += result.loss
            window_steps += 1
            bar.set_postfix(loss=f"{result.loss:.4f}")
            if self.env.is_main and (self.step % cfg.log_every == 0 or self.step % self.steps_per_epoch == 0):
                self.metrics.write({"split": "train", "epoch": epoch, "step": self.step,
                                    "loss": window_loss / window_steps, "lr": result.lr})
                window_loss, window_steps = 0.0, 0

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], list[Any]]:
        """(the eval loss (mean over features) and the task's metrics, one prediction per eval example)."""
        self.model.eval()
        loss_sum, outputs = 0.0, []
        for batch in self._loader(self.eval_features, shuffle=False):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.optimizer_step.autocast():
                output = self.model(**batch)
            loss_sum += output.loss.item() * batch["input_ids"].shape[0]
            outputs.extend(self.task.split_outputs(output, batch))
        self.model.train()
        scores = self.task.score(self.eval_examples, self.eval_features, outputs)
        predictions = self.task.predict(self.eval_examples, self.eval_features, outputs)
        return {"loss": loss_sum / len(self.eval_features), **scores}, predictions

"""The pretraining loop behind ``bertfast pretrain``: MLM + NSP on a corpus, from a config.

One optimizer step is ``grad_accum`` micro-batches, applied by :class:`~bertfast.training.step.OptimizerStep`
as in fine-tuning (autocast, the fp16 gradient scaler, clipping, the schedule). A step whose loss or
gradient norm is not finite on any rank is skipped on all ranks; ``max_nonfinite_steps`` of them in a
row stop the run (exit code 1).

Determinism: the data at every point is a function of (seed, epoch, batch index) (see
``bertfast.data.pipeline``), and a checkpoint stores the optimizer, scheduler, scaler and every RNG
state, so a resumed run reproduces the losses of an uninterrupted one exactly on CPU.

SIGINT and SIGTERM let the current step finish, save a checkpoint and return: exit code 130 after
SIGINT (the shell's code for Ctrl-C), 0 after SIGTERM (a preempted run whose state is safe). A
second SIGINT interrupts at once.
"""

from __future__ import annotations

import json
import random
import signal
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from bertfast.config import BertConfig
from bertfast.data import (
    CorpusStats,
    EmptyCorpusError,
    PretrainingData,
    WordPieceTokenizer,
    baseline_accuracy,
    build_token_cache,
    load_tokenizer,
    make_collator,
    read_documents,
    resolve_paths,
    train_tokenizer,
)
from bertfast.data.cache import sources_fingerprint
from bertfast.io import CheckpointError, atomic_write_text, load_state_dict
from bertfast.models import BertForPreTraining
from bertfast.training.checkpoint import (
    capture_rng,
    checkpoint_name,
    prune_checkpoints,
    restore_rng,
    write_checkpoint,
)
from bertfast.training.config import PretrainConfig
from bertfast.training.distributed import (
    DistEnv,
    all_reduce,
    barrier,
    gather_to_main,
    report_progress,
)
from bertfast.training.guard import NonFiniteError, check_finite_model
from bertfast.training.metrics import MetricsLog, plot_metrics, read_metrics
from bertfast.training.optim import build_optimizer, linear_schedule, retarget_schedule
from bertfast.training.precision import resolve_precision
from bertfast.training.resume import PRETRAIN, RunStart, decide_resume, training_run
from bertfast.training.signals import STOP_SIGNALS, ignore_stop_signals, start_workers
from bertfast.training.step import OptimizerStep

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
# Per-micro-batch sums kept for the train records: their order in the window tensor.
_SUMS = ("loss", "mlm_loss", "nsp_loss", "mlm_correct", "mlm_count", "nsp_correct", "sequences", "tokens",
         "micro_batches")


def pretrain(config: PretrainConfig) -> int:
    """Run pretraining as ``config`` says (in each process under torchrun); returns the exit code."""
    out = Path(config.output_dir)
    cache = [Path(config.cache_dir)] if config.cache_dir else []
    subdirectories = [out / "cache", out / "tokenizer", *cache]
    with training_run(PRETRAIN, config, tqdm.write, subdirectories) as (env, device, start):
        return Pretrainer(config, env, device, start).train()


def prepare_tokenizer(config: PretrainConfig, paths: list[str], env: DistEnv) -> WordPieceTokenizer:
    """The tokenizer named by ``--tokenizer``, or one trained on the corpus and cached in OUTPUT_DIR."""
    if config.tokenizer:
        return load_tokenizer(config.tokenizer, lowercase=config.lowercase)
    directory = Path(config.output_dir) / "tokenizer"
    source = {"corpus": paths, "sources": sources_fingerprint(paths), "vocab_size": config.vocab_size,
              "lowercase": config.lowercase}
    source_file = directory / "trained_on.json"
    if env.is_main:
        cached = source_file.is_file() and json.loads(source_file.read_text(encoding="utf-8")) == source
        if not cached:
            stats = CorpusStats()
            with warnings.catch_warnings():  # the token cache pass reports broken input
                warnings.simplefilter("ignore")
                sentences = (s for doc in read_documents(paths, stats) for s in doc)
                tokenizer = train_tokenizer(sentences, config.vocab_size, lowercase=config.lowercase)
            if stats.sentences == 0:
                raise EmptyCorpusError(f"the corpus yields no text ({stats.summary()}); "
                                       f"sources: {', '.join(paths)}")
            tokenizer.save(directory)
            atomic_write_text(source_file, json.dumps(source) + "\n")
    barrier(env)
    return load_tokenizer(directory)


class Pretrainer:
    def __init__(self, config: PretrainConfig, env: DistEnv, device: torch.device,
                 start: RunStart | None = None) -> None:
        """``start`` is the decision of :func:`~bertfast.training.resume.start_run` (made here when None)."""
        self.config = config
        self.env = env
        self.device = device
        self.out = Path(config.output_dir)
        self.stop_signal: int | None = None
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.precision = resolve_precision(config.precision, device)[0]
        for seeded in (random.seed, np.random.seed, torch.manual_seed):
            seeded(config.seed + env.rank)

        start = start or decide_resume(PRETRAIN, config, env, self.say)
        self.resume_from = str(start.checkpoint) if start.checkpoint else None
        self.resume_state = start.state
        self.paths = resolve_paths(config.corpus)
        self.sources = sources_fingerprint(self.paths)

        report_progress(env, "preparing the data (tokenizer, token cache)")
        self._prepare_data()
        self._prepare_model()
        self.step = self.epoch = self.batch_index = 0
        self.tokens_seen = 0
        self.elapsed_before = 0.0
        self.window = torch.zeros(len(_SUMS), dtype=torch.float64, device=device)
        if self.resume_from:
            self._load_checkpoint(Path(self.resume_from))
        self.last_saved = self.step if self.resume_from else -1
        self.last_eval = -1
        self.lr, self.grad_norm = self.scheduler.get_last_lr()[0], None
        self.started = self.window_started = time.perf_counter()
        self.live_tokens = 0.0  # tokens trained on since window_started (for tokens/s)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", self.step if self.resume_from else None) \
            if env.is_main else None

    # ------------------------------------------------------------------ setup
    def say(self, message: str) -> None:
        if self.env.is_main:
            tqdm.write(message)

    def _prepare_data(self) -> None:
        cfg, env = self.config, self.env
        paths = self.paths
        if self.resume_from:
            self.tokenizer = load_tokenizer(self.resume_from)
        else:
            self.tokenizer = prepare_tokenizer(cfg, paths, env)
        cache_root = Path(cfg.cache_dir) if cfg.cache_dir else self.out / "cache"
        if env.is_main:
            corpus = build_token_cache(paths, self.tokenizer, cache_root, progress=cfg.progress)
        barrier(env)
        if not env.is_main:
            corpus = build_token_cache(paths, self.tokenizer, cache_root, progress=False)
        self.say(f"corpus: {corpus.stats_summary}; {corpus.meta['tokens']:,} tokens "
                 f"(vocabulary {self.tokenizer.vocab_size:,})")
        if corpus.problems and env.is_main:
            warnings.warn(f"corpus: skipped broken input: {corpus.stats_summary}", stacklevel=2)
        collator = make_collator(self.tokenizer, cfg.mask_prob, cfg.mask_token_prob, cfg.random_token_prob,
                                 cfg.whole_word_mask)
        self.data = PretrainingData(corpus, self.tokenizer, collator, batch_size=cfg.batch_size,
                                    max_seq_len=cfg.seq_len, short_seq_prob=cfg.short_seq_prob,
                                    eval_fraction=cfg.eval_fraction, seed=cfg.seed, rank=env.rank,
                                    world_size=env.world_size)
        self.eval_batches = self.data.eval_batches()
        self.baseline_token = self.data.most_frequent_token()
        hits, total = baseline_accuracy(self.eval_batches, self.baseline_token)
        counts = all_reduce(torch.tensor([hits, total], dtype=torch.float64, device=self.device), env)
        self.baseline_acc = counts[0].item() / counts[1].item() if counts[1] > 0 else None
        self.data.epoch(0)  # a corpus too small for one batch is an error now, not after the model
        report = self.data.report()
        self.say(f"data: {len(self.data.train_docs)} train / {len(self.data.eval_docs)} held-out documents, "
                 f"{report.instances} instances per epoch of {cfg.seq_len} tokens at most")
        for line in report.lines():
            self.say(line)
        if env.is_main:
            for warning in report.warnings():
                warnings.warn(f"corpus: {warning}", stacklevel=2)

    def _prepare_model(self) -> None:
        cfg = self.config
        if self.resume_from:
            config = BertConfig.from_pretrained(self.resume_from)
        else:
            config = BertConfig.from_preset(cfg.preset, vocab_size=self.tokenizer.vocab_size,
                                            pad_token_id=self.tokenizer.pad_id,
                                            max_position_embeddings=max(512, cfg.seq_len))
        self.model = BertForPreTraining(config)
        if self.resume_from:
            self.model.load_checkpoint_state(load_state_dict(self.resume_from), strict=True,
                                             source=self.resume_from)
            check_finite_model(self.model, f"the checkpoint {self.resume_from}", CheckpointError)
        self.model.to(self.device).train()
        if cfg.activation_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.optimizer = build_optimizer(cfg.optimizer, self.model, cfg.lr, cfg.weight_decay)
        self.scheduler = linear_schedule(self.optimizer, cfg.warmup_steps, cfg.max_steps)
        self.ddp = None
        if self.env.enabled:
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.optimizer_step = OptimizerStep(
            self.model, self.optimizer, self.scheduler, precision=self.precision, device=self.device,
            clip_norm=cfg.clip_norm, max_nonfinite_steps=cfg.max_nonfinite_steps,
            hint="try a lower --lr, more --warmup-steps or --precision bf16/fp32", env=self.env, ddp=self.ddp,
            say=self.say)
        self.guard = self.optimizer_step.guard
        self.say(f"model: {cfg.preset} preset, {self.model.num_parameters() / 1e6:.2f}M parameters, "
                 f"{self.precision} on {self.device}" + (f" x {self.env.world_size} processes"
                                                         if self.env.enabled else ""))

    # ------------------------------------------------------------ checkpoints
    def _load_checkpoint(self, path: Path) -> None:
        state = self.resume_state
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        retarget_schedule(self.scheduler, self.config.lr)  # the loaded state carries the old peak lr
        self.optimizer_step.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_index = state["step"], state["epoch"], state["batch_index"]
        self.guard.consecutive, self.guard.skipped = state["consecutive_nonfinite"], state["skipped_steps"]
        self.tokens_seen = state["tokens_seen"]
        self.elapsed_before = state["elapsed_s"]
        if len(state["ranks"]) == self.env.world_size:
            mine = state["ranks"][self.env.rank]
            restore_rng(mine["rng"])
            self.window = mine["window"].to(self.device)
        self.say(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.batch_index})")

    def _write_model(self, directory: Path) -> None:
        self.model.save_pretrained(directory)
        self.tokenizer.save(directory)

    def save_checkpoint(self) -> None:
        report_progress(self.env, f"saving {checkpoint_name(self.step)}")
        per_rank = gather_to_main({"rng": capture_rng(), "window": self.window.cpu()}, self.env)
        if self.env.is_main:
            state = {
                "step": self.step, "epoch": self.epoch, "batch_index": self.batch_index,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.optimizer_step.scaler.state_dict(), "ranks": per_rank, "world_size": self.env.world_size,
                "consecutive_nonfinite": self.guard.consecutive, "skipped_steps": self.guard.skipped,
                "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed(), "config": self.config.to_dict(),
                "corpus_sources": self.sources,
            }
            write_checkpoint(self.out / checkpoint_name(self.step), self._write_model, state)
            prune_checkpoints(self.out, self.config.keep_checkpoints)
            self.plot()
        self.last_saved = self.step
        barrier(self.env)

    def plot(self) -> None:
        if self.env.is_main:
            plot_metrics(read_metrics(self.metrics.path), self.out / "metrics.png")

    # ------------------------------------------------------------------- loop
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def batch_stream(self) -> Iterator[dict[str, Tensor]]:
        """Micro-batches from the current data position on, across epochs; advances the position."""
        while True:
            batches = self.data.epoch(self.epoch)
            loader = DataLoader(batches, batch_size=None, sampler=range(self.batch_index, len(batches)),
                                num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda",
                                # Its own generator: creating a loader must not draw from the global RNG.
                                generator=torch.Generator(), worker_init_fn=ignore_stop_signals)
            for batch in start_workers(loader):
                self.batch_index += 1
                yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            self.epoch, self.batch_index = self.epoch + 1, 0

    def _batch_sums(self, out: Any, batch: dict[str, Tensor]) -> Tensor:
        """One micro-batch's contribution to the train record's sums (in the order of ``_SUMS``)."""
        sequences = batch["input_ids"].shape[0]
        values = (out.loss.detach(), out.mlm_loss.detach(), out.nsp_loss.detach(),
                  out.mlm_accuracy * out.mlm_count, out.mlm_count, out.nsp_accuracy * sequences, sequences,
                  batch["attention_mask"].sum(), 1)
        return torch.stack([torch.as_tensor(v, device=self.device, dtype=torch.float64) for v in values])

    def train_step(self, batches: Iterator[dict[str, Tensor]]) -> bool:
        """One optimizer step; False when it was skipped (a non-finite loss or gradient norm, an fp16 overflow).

        Raises NonFiniteError after ``max_nonfinite_steps`` skipped steps in a row."""
        report_progress(self.env, f"training step {self.step + 1}")
        micro_batches = [next(batches) for _ in range(self.config.grad_accum)]
        sums = []

        def loss_of(module: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
            out = module(**batch)
            sums.append(self._batch_sums(out, batch))
            return out.loss

        result = self.optimizer_step(micro_batches, loss_of, self.step + 1)
        if result.applied:
            self.lr, self.grad_norm = result.lr, result.grad_norm
            self.step += 1
            step_sums = sum(sums)
            self.window += step_sums
            self.live_tokens += step_sums[_SUMS.index("tokens")].item()
        return result.applied

    def _log_train(self, bar: tqdm) -> None:
        window = all_reduce(self.window.clone(), self.env)
        tokens = torch.tensor([self.live_tokens], dtype=torch.float64, device=self.device)
        tokens = all_reduce(tokens, self.env)
        now = time.perf_counter()
        values = dict(zip(_SUMS, window.tolist(), strict=True))
        micro = max(values["micro_batches"], 1)
        record = {
            "split": "train", "step": self.step, "epoch": self.epoch,
            "loss": values["loss"] / micro, "mlm_loss": values["mlm_loss"] / micro,
            "nsp_loss": values["nsp_loss"] / micro,
            "mlm_acc": values["mlm_correct"] / max(values["mlm_count"], 1),
            "nsp_acc": values["nsp_correct"] / max(values["sequences"], 1),
            "lr": self.lr, "grad_norm": float(self.grad_norm) if self.grad_norm is not None else None,
            "tokens_per_s": tokens.item() / max(now - self.window_started, 1e-9),
            "tokens": self.tokens_seen + int(values["tokens"]), "elapsed_s": self.elapsed(),
        }
        self.tokens_seen = record["tokens"]
        self.window.zero_()
        self.live_tokens, self.window_started = 0.0, now
        if self.env.is_main:
            self.metrics.write(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", mlm=f"{record['mlm_acc']:.3f}",
                            nsp=f"{record['nsp_acc']:.3f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any] | None:
        """Loss and accuracies on the held-out batches (all ranks), as a ``"split": "eval"`` record."""
        self.last_eval = self.step
        report_progress(self.env, f"evaluating at step {self.step}")
        model = self.model
        model.eval()
        sums = torch.zeros(6, dtype=torch.float64, device=self.device)
        for batch in self.eval_batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.optimizer_step.autocast():
                out = model(**batch)
            n = batch["input_ids"].shape[0]
            sums += torch.stack([torch.as_tensor(v, device=self.device, dtype=torch.float64) for v in (
                out.mlm_loss * out.mlm_count, out.mlm_accuracy * out.mlm_count, out.mlm_count,
                out.nsp_loss * n, out.nsp_accuracy * n, n)])
        model.train()
        mlm_loss, mlm_correct, count, nsp_loss, nsp_correct, n = all_reduce(sums, self.env).tolist()
        if n == 0:
            return None
        record = {"split": "eval", "step": self.step, "loss": (mlm_loss / count) + (nsp_loss / n),
                  "mlm_loss": mlm_loss / count, "nsp_loss": nsp_loss / n, "mlm_acc": mlm_correct / count,
                  "nsp_acc": nsp_correct / n, "baseline_mlm_acc": self.baseline_acc,
                  "masked_tokens": int(count), "sequences": int(n)}
        if self.env.is_main:
            self.metrics.write(record)
            self.say(f"eval @ step {self.step}: loss {record['loss']:.3f}, MLM acc {record['mlm_acc']:.3f} "
                     f"(most-frequent-token baseline {self.baseline_acc:.3f}), "
                     f"NSP acc {record['nsp_acc']:.3f}")
        return record

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop_signal = signum

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_signal is not None else 0.0], device=self.device)
        return bool(all_reduce(flag, self.env, dist.ReduceOp.MAX if self.env.enabled else None).item())

    def train(self) -> int:
        cfg = self.config
        previous = {}
        for signum in STOP_SIGNALS:
            try:
                previous[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: leave signals alone
                pass
        self.started = self.window_started = time.perf_counter()
        self.live_tokens = 0.0
        batches = self.batch_stream()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True,
                   disable=not (self.env.is_main and cfg.progress))
        code = EXIT_OK
        try:
            while self.step < cfg.max_steps:
                try:
                    if not self.train_step(batches):
                        continue
                except NonFiniteError as e:
                    self.say(str(e))
                    code = EXIT_FAILED
                    break
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    self._log_train(bar)
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    self.evaluate()
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save_checkpoint()
                if self._stop_requested():
                    name = signal.Signals(self.stop_signal or signal.SIGTERM).name
                    if self.last_saved != self.step:
                        self.save_checkpoint()
                    self.say(f"{name}: stopped after step {self.step}; saved "
                             f"{self.out / checkpoint_name(self.step)} (continue with --resume latest)")
                    return EXIT_INTERRUPTED if self.stop_signal == signal.SIGINT else EXIT_OK
        finally:
            bar.close()
            batches.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if code == EXIT_OK:
            self.finish()
        elif self.env.is_main:
            self.plot()
        return code

    def finish(self) -> None:
        """Final eval, checkpoint, ``final/`` model, plot and summary."""
        final_eval = self.evaluate() if self.last_eval != self.step else None
        if self.last_saved != self.step:
            self.save_checkpoint()
        if self.env.is_main:
            write_checkpoint(self.out / "final", self._write_model, None)
            self.plot()
            records = read_metrics(self.metrics.path)
            train = [r for r in records if r["split"] == "train"]
            evals = [r for r in records if r["split"] == "eval"]
            final_eval = final_eval or (evals[-1] if evals else None)
            lines = [f"done: {self.step} steps, {self.tokens_seen:,} tokens in {self.elapsed():.0f}s"]
            if train:
                first, last = train[0], train[-1]
                lines.append(f"train loss {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} "
                             f"(step {last['step']}), {last['tokens_per_s']:,.0f} tokens/s")
            if final_eval:
                lines.append(f"held-out: MLM acc {final_eval['mlm_acc']:.3f} vs most-frequent-token baseline "
                             f"{final_eval['baseline_mlm_acc']:.3f}, NSP acc {final_eval['nsp_acc']:.3f} "
                             "(chance 0.500)")
            lines.append(f"model: {self.out / 'final'}  metrics: {self.metrics.path}  "
                         f"plot: {self.out / 'metrics.png'}")
            self.say("\n".join(lines))
        barrier(self.env)


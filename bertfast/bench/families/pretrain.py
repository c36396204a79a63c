"""Pretraining throughput: tokens/s of full training steps, bertfast against named baselines."""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
from collections.abc import Callable

import torch

from bertfast.bench.suite import Context, Entry, Group

TITLE = "Pretraining throughput"
NOTES = """\
Every baseline trains on the same batches of the built-in corpus (real NSP pairs, dynamic MLM masks,
padded to the longest row) with AdamW, clipping at 1.0 and the same precision:
`bertfast pretrain step` is `Pretrainer.train_step`, exactly what `bertfast pretrain` runs per step
(data loading, masking, forward, backward, clipping, optimizer, schedule, metrics); `bertfast model`
the same model in a bare loop over pre-built batches; `bertfast, torch backend` every op forced to
the plain-PyTorch reference; `bertfast, torch backend + torch.compile` that compiled;
`transformers (sdpa)` transformers' BertForPreTraining with the same weights; `data pipeline only`
builds the batches, no model. Tokens are real (non-padding) tokens, averaged over the batches.
"""

AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _model_step(model, batches: list[dict], dtype: torch.dtype | None, device: torch.device,
                backend: str | None = None) -> Callable[[], None]:
    from bertfast.ops import use_backend
    from bertfast.training import build_optimizer

    optimizer = build_optimizer("adamw", model, 1e-4, 0.01)
    position = [0]

    def step() -> None:
        batch = {k: v.to(device) for k, v in batches[position[0] % len(batches)].items()}
        position[0] += 1
        with use_backend(backend), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(**batch).loss
        with use_backend(backend):
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _group(preset: str, batch_size: int, seq_len: int, precision: str, ctx: Context, n_batches: int) -> Group:
    names = ("bertfast pretrain step", "bertfast model", "bertfast, torch backend",
             *(("bertfast, torch backend + torch.compile",) if ctx.compile else ()), "transformers (sdpa)",
             "data pipeline only")
    work: dict[str, float] = {}

    def build() -> dict[str, Entry | str]:
        from bertfast import BertForPreTraining
        from bertfast.training import PretrainConfig, Pretrainer
        from bertfast.training.distributed import DistEnv

        workdir = tempfile.TemporaryDirectory()
        config = PretrainConfig(output_dir=workdir.name, preset=preset, batch_size=batch_size, seq_len=seq_len,
                                precision=precision, progress=False, max_steps=10**6, eval_every=0, save_every=0,
                                device=ctx.device.type)
        torch.manual_seed(0)
        trainer = Pretrainer(config, DistEnv(), ctx.device)
        epoch = trainer.data.epoch(1)
        batches = [epoch[i] for i in range(min(len(epoch), n_batches))]
        work["step"] = statistics.mean(int(b["attention_mask"].sum()) for b in batches)
        initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        stream = trainer.batch_stream()

        def trainer_step() -> None:
            trainer.train_step(stream)

        trainer_step.workdir = workdir  # the trainer's output directory lives as long as its step

        def fresh_model():
            model = BertForPreTraining(trainer.model.config)
            model.load_state_dict(initial)
            return model.to(ctx.device).train()

        dtype = AMP[precision]
        steps = {"bertfast pretrain step": trainer_step,
                 "bertfast model": _model_step(fresh_model(), batches, dtype, ctx.device),
                 "bertfast, torch backend": _model_step(fresh_model(), batches, dtype, ctx.device, "torch")}
        if ctx.compile:
            steps["bertfast, torch backend + torch.compile"] = _model_step(
                torch.compile(fresh_model()), batches, dtype, ctx.device, "torch")
        if importlib.util.find_spec("transformers") is not None:
            import transformers

            fresh_model().save_pretrained(workdir.name + "/weights")
            theirs = transformers.BertForPreTraining.from_pretrained(workdir.name + "/weights",
                                                                     attn_implementation="sdpa")
            steps["transformers (sdpa)"] = _model_step(theirs.to(ctx.device).train(), batches, dtype, ctx.device)
        position = [0]

        def data_step() -> None:
            epoch[position[0] % len(epoch)]
            position[0] += 1

        steps["data pipeline only"] = data_step
        entries: dict[str, Entry | str] = {name: Entry({"step": fn}) for name, fn in steps.items()}
        return {"transformers (sdpa)": "needs transformers, which is not installed", **entries}

    group = Group("pretraining step", f"{preset}, batch {batch_size} x <={seq_len}, {precision}", batch_size,
                  "batch size", names, build, ("step",), work, "tokens/s", precision, "bertfast pretrain step",
                  info={"series": f"{preset} seq {seq_len} {precision}"})
    return group


def groups(ctx: Context) -> list[Group]:
    rounds = ctx.plan.rounds * ctx.plan.reps + ctx.plan.warmup + 1
    if ctx.quick:
        return [_group("tiny", 4, 32, "fp32", ctx, rounds * 6)]
    if ctx.on_gpu:
        return [_group("base", 64, 128, "bf16", ctx, rounds * 6)]
    return [_group("tiny", 32, 128, "fp32", ctx, rounds * 6)]

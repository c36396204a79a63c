"""Two processes with DistributedDataParallel on gloo: parameters stay in sync, data is split by rank."""

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from bertfast.training import PretrainConfig, Pretrainer
from bertfast.training.distributed import init_distributed, is_collective_failure, shutdown


def write_corpus(path, n_docs=40, seed=0):
    rng = np.random.default_rng(seed)
    topics = [[f"{t}{i}" for i in range(12)] for t in ("alpha", "beta", "gamma")]
    lines = []
    for _ in range(n_docs):
        words = topics[rng.integers(len(topics))] + ["the", "of", "is"]
        lines += [" ".join(rng.choice(words, rng.integers(5, 15))) + " ." for _ in range(rng.integers(3, 10))]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return str(path)


def _join(rank: int, world_size: int, port: int):
    """This spawned process's place in a gloo group, as torchrun would describe it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    return init_distributed("cpu")


def _worker(rank: int, world_size: int, port: int, config: dict, out: str) -> None:
    env, device = _join(rank, world_size, port)
    try:
        trainer = Pretrainer(PretrainConfig(**config), env, device)
        batch = trainer.data.epoch(0)[0]
        # The unmasked token ids of this rank's first batch.
        first_batch = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
        code = trainer.train()
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        torch.save({"code": code, "params": params, "first_batch": first_batch}, f"{out}/rank{rank}.pt")
    finally:
        shutdown(env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_two_processes_stay_in_sync(tmp_path):
    config = dict(corpus=[write_corpus(tmp_path / "corpus.txt")], output_dir=str(tmp_path / "run"),
                  vocab_size=150, seq_len=32, batch_size=4, grad_accum=2, max_steps=4, warmup_steps=1,
                  save_every=2, eval_every=2, log_every=1, progress=False, device="cpu")
    mp.spawn(_worker, args=(2, free_port(), config, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["code"] == ranks[1]["code"] == 0
    # Each rank reads its own share of the data...
    first = [r["first_batch"] for r in ranks]
    assert first[0].shape != first[1].shape or not torch.equal(first[0], first[1])
    # ...and the parameters are identical after every all-reduced step.
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # rank 0 writes, once
    assert all(r["grad_norm"] > 0 and r["lr"] > 0 for r in train)
    assert (run / "final" / "model.safetensors").is_file()
    state = torch.load(run / "checkpoint-4" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2


def _finetune_worker(rank: int, world_size: int, port: int, config: dict, out: str) -> None:
    from bertfast.finetune import FinetuneConfig, Finetuner

    env, device = _join(rank, world_size, port)
    try:
        trainer = Finetuner(FinetuneConfig(**config), env, device)
        first_batch = next(iter(trainer._loader(trainer.train_features, shuffle=True, epoch=1)))["input_ids"]
        best = trainer.run()
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        torch.save({"best": best, "params": params, "first_batch": first_batch, "steps": trainer.step},
                   f"{out}/rank{rank}.pt")
    finally:
        shutdown(env)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_two_processes_fine_tune_in_sync(tmp_path):
    from bertfast import BertConfig, BertForPreTraining

    words = "good great bad awful the a movie film was".split()
    model_dir = tmp_path / "pretrained"
    model_dir.mkdir()
    (model_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    torch.manual_seed(0)
    BertForPreTraining(BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=32)).save_pretrained(model_dir)
    rows = [{"text": f"the movie was {w}", "label": "pos" if w in ("good", "great") else "neg"}
            for w in ("good", "bad", "great", "awful") * 5]  # 20 examples: 10 per process
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = dict(task="classification", model=str(model_dir), train=str(data), eval=str(data),
                  output_dir=str(tmp_path / "run"), epochs=2, batch_size=2, grad_accum=2, seq_len=16,
                  log_every=1, progress=False, device="cpu")
    mp.spawn(_finetune_worker, args=(2, free_port(), config, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert not torch.equal(ranks[0]["first_batch"], ranks[1]["first_batch"])  # each process its own share
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2 * 3  # ceil(10 / (2 x 2)) steps an epoch
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]  # written once
    assert [r["epoch"] for r in records if r["split"] == "eval"] == [1, 2]
    assert ranks[0]["best"]["epoch"] in (1, 2) and ranks[1]["best"] == {}
    assert (run / "best" / "model.safetensors").is_file() and (run / "predictions.jsonl").is_file()


@pytest.mark.parametrize("message,failure", [
    ("Application timeout caused pair closure", True),  # gloo, a pair timing out inside a backward's all-reduce
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234", True),
    ("Timed out waiting 4000ms for recv operation to complete", True),
    ("NCCL error in: ProcessGroupNCCL.cpp:1, unhandled system error", True),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
    ("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)", False),
])
def test_collective_failures_are_told_from_other_errors(message, failure):
    assert is_collective_failure(RuntimeError(message)) is failure
    assert not is_collective_failure(ValueError(message))

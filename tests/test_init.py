"""BERT's initialisation: normal(0, initializer_range) weights, zero biases, unit LayerNorm, tied decoder."""

import torch

import bertfast
from bertfast import BertConfig


def test_initialisation_follows_bert():
    config = BertConfig.from_preset("mini", vocab_size=5000, initializer_range=0.05)
    torch.manual_seed(0)
    model = bertfast.BertForPreTraining(config)
    embeddings = model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.weight is embeddings
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias
    assert embeddings[config.pad_token_id].abs().max() == 0
    for name, p in model.named_parameters():
        if "LayerNorm.weight" in name:
            assert torch.all(p == 1), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:
            assert abs(p.std().item() - 0.05) < 0.005 and abs(p.mean().item()) < 0.005, name

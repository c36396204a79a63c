"""Fine-tuning test helpers: a tiny pretrained BERT directory with a written vocabulary, a SQuAD v2.0 file.

The vocabulary is written out rather than trained: WordPiece training breaks ties in hash-map order,
and a vocabulary that changed from run to run would make the tests' outcomes vary too.
"""

import json

import torch

from bertfast.config import BertConfig
from bertfast.data import load_tokenizer
from bertfast.data.tokenizer import SPECIAL_TOKENS
from bertfast.models import BertForPreTraining


def write_pretrained(directory, words, seed=0, initializer_range=0.02, dropout=0.1):
    """config.json, model.safetensors, vocab.txt and tokenizer.json of a 2-layer, 32-wide BERT."""
    (directory / "vocab.txt").write_text("\n".join([*SPECIAL_TOKENS, *sorted(set(words))]) + "\n")
    tokenizer = load_tokenizer(directory / "vocab.txt")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                        initializer_range=initializer_range, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    BertForPreTraining(config).save_pretrained(directory)
    tokenizer.save(directory)
    return directory


def squad_file(path, rng, n, filler, cities):
    """A SQuAD v2.0 file of n questions "which city": half name a city in their context, half none."""
    paragraphs = []
    for i in range(n):
        words = rng.choices(filler, k=rng.randint(3, 12))
        answerable = i % 2 == 0
        if answerable:
            words.insert(rng.randrange(len(words) + 1), rng.choice(cities))
        context = " ".join(words)
        city = next((w for w in words if w in cities), None)
        answers = [{"text": city, "answer_start": context.index(city)}] if city else []
        paragraphs.append({"context": context, "qas": [{"id": f"q{i}", "question": "which city",
                                                        "answers": answers, "is_impossible": not city}]})
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return str(path)

"""Fine-tuning data: the JSONL readers, their errors, and how each task encodes its examples."""

import json

import pytest
import torch

from bertfast.data import train_tokenizer
from bertfast.finetune import DataError, make_task
from bertfast.finetune.data import (
    read_classification,
    read_multiple_choice,
    read_question_answering,
    read_token_classification,
)
from bertfast.finetune.formats import read_jsonl
from bertfast.finetune.tasks import IGNORE, collate

WORDS = "the cat sat on a mat while paris is the capital of france and berlin of germany".split()


@pytest.fixture(scope="module")
def tokenizer():
    sentences = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    return train_tokenizer(sentences * 3, vocab_size=80, min_frequency=1)


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_read_jsonl_names_file_and_line(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, "", "{broken"])
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON"):
        read_jsonl(path)
    with pytest.raises(DataError, match=r"d\.jsonl:1: expected a JSON object"):
        read_jsonl(write(tmp_path / "d.jsonl", ["[1, 2]"]))
    with pytest.raises(DataError, match="holds no examples"):
        read_jsonl(write(tmp_path / "d.jsonl", [""]))
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_classification_reader(tmp_path):
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "text_pair": "c", "label": 3}]
    examples = read_classification(write(tmp_path / "c.jsonl", rows))
    assert [(e.text, e.text_pair, e.label) for e in examples] == [("a", None, "pos"), ("b", "c", 3)]
    with pytest.raises(DataError, match=r"c\.jsonl:2: missing field 'label'"):
        read_classification(write(tmp_path / "c.jsonl", [rows[0], {"text": "x"}]))
    with pytest.raises(DataError, match=r"c\.jsonl:1: field 'label' must be a number"):
        read_classification(write(tmp_path / "c.jsonl", rows), regression=True)
    assert read_classification(write(tmp_path / "r.jsonl", [{"text": "a", "label": 2}]), True)[0].label == 2.0


def test_token_choice_and_qa_readers(tmp_path):
    with pytest.raises(DataError, match=r"t\.jsonl:2: 2 tokens but 1 tags"):
        read_token_classification(write(tmp_path / "t.jsonl", [{"tokens": ["a"], "tags": ["O"]},
                                                               {"tokens": ["a", "b"], "tags": ["O"]}]))
    with pytest.raises(DataError, match=r"m\.jsonl:1: label 2 is not an index"):
        read_multiple_choice(write(tmp_path / "m.jsonl", [{"context": "c", "choices": ["a", "b"], "label": 2}]))
    mixed = [{"context": "c", "choices": ["a", "b"], "label": 0}, {"context": "c", "choices": ["a"], "label": 0}]
    with pytest.raises(DataError, match=r"m\.jsonl:2: 1 choices"):
        read_multiple_choice(write(tmp_path / "m.jsonl", mixed))
    bad = {"question": "q", "context": "in paris", "answer": {"text": "paris", "start": 0}}
    with pytest.raises(DataError, match=r"q\.jsonl:1: the answer 'paris' is not at character 0"):
        read_question_answering(write(tmp_path / "q.jsonl", [bad]))
    good = {**bad, "answer": {"text": "paris", "start": 3}}
    assert read_question_answering(write(tmp_path / "q.jsonl", [good]))[0].answer_start == 3


def test_classification_labels_and_collate(tmp_path, tokenizer):
    task = make_task("classification")
    train = read_classification(write(tmp_path / "c.jsonl", [
        {"text": "the cat", "label": "b"}, {"text": "a mat", "text_pair": "on paris", "label": "a"}]))
    assert task.label_config(train)["id2label"] == {0: "a", 1: "b"}
    features = task.encode(train, tokenizer, seq_len=16)
    assert [f["labels"] for f in features] == [1, 0]
    batch = collate(features, tokenizer.pad_id)
    assert batch["input_ids"][0, 0] == tokenizer.cls_id and batch["token_type_ids"][1].max() == 1
    assert batch["attention_mask"].sum(1).tolist() == [len(f["input_ids"]) for f in features]
    unseen = read_classification(write(tmp_path / "e.jsonl", [{"text": "x", "label": "c"}]))
    with pytest.raises(DataError, match=r"e\.jsonl:1: label 'c' does not occur in the training data"):
        task.encode(unseen, tokenizer, seq_len=16)


def test_token_labels_sit_on_first_word_pieces(tmp_path, tokenizer):
    task = make_task("token-classification")
    examples = read_token_classification(write(tmp_path / "t.jsonl", [
        {"tokens": ["berlinparis", "is", "france"], "tags": ["B-LOC", "O", "B-LOC"]}]))
    task.label_config(examples)
    feature = task.encode(examples, tokenizer, seq_len=32)[0]
    pieces = tokenizer.tokenizer.encode(["berlinparis"], is_pretokenized=True, add_special_tokens=False).ids
    assert len(pieces) > 1  # the made-up word is split, so only its first piece is labelled
    loc, other = task.label2id["B-LOC"], task.label2id["O"]
    assert feature["labels"] == [IGNORE, loc] + [IGNORE] * (len(pieces) - 1) + [other, loc, IGNORE]
    assert [w for w, _ in feature["_firsts"]] == [0, 1, 2]


def test_multiple_choice_batches_are_three_dimensional(tmp_path, tokenizer):
    task = make_task("multiple-choice")
    examples = read_multiple_choice(write(tmp_path / "m.jsonl", [
        {"context": "the cat sat", "choices": ["on a mat", "paris"], "label": 1}] * 3))
    features = task.encode(examples, tokenizer, seq_len=16)
    batch = collate(features, tokenizer.pad_id)
    assert batch["input_ids"].shape[:2] == (3, 2) and batch["labels"].tolist() == [1, 1, 1]
    records = task.describe(examples, features, [torch.tensor([0.0, 1.0])] * 3)
    assert records[0]["choice"] == 1 and sum(records[0]["probabilities"]) == pytest.approx(1.0)


def test_prediction_records_of_classification_and_regression(tmp_path, tokenizer):
    examples = read_classification(write(tmp_path / "c.jsonl", [{"text": "the cat", "label": "b"},
                                                                {"text": "a mat", "label": "a"}]))
    task = make_task("classification")
    task.label_config(examples)
    features = task.encode(examples, tokenizer, seq_len=16)
    records = task.describe(examples, features, [torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])])
    assert records[0] == {"label": "a", "probabilities": {"a": pytest.approx(0.8808, abs=1e-4),
                                                          "b": pytest.approx(0.1192, abs=1e-4)}}
    assert records[1]["probabilities"] == {"a": 0.5, "b": 0.5}
    regression = make_task("classification", regression=True)
    assert regression.describe(examples, features, [torch.tensor([1.5]), torch.tensor([-2.0])]) == [
        {"score": 1.5}, {"score": -2.0}]


def test_question_answering_windows_and_spans(tmp_path, tokenizer):
    task = make_task("question-answering", max_answer_length=4)
    context = "the cat sat on a mat while paris is the capital of france and berlin of germany"
    start = context.index("berlin")
    examples = read_question_answering(write(tmp_path / "q.jsonl", [
        {"question": "capital of germany", "context": context, "answer": {"text": "berlin", "start": start}}]))
    features = task.encode(examples, tokenizer, seq_len=16)
    assert len(features) > 1 and all(len(f["input_ids"]) <= 16 for f in features)
    holding = [f for f in features if f["start_positions"] > 0]
    assert holding and len(holding) < len(features)  # windows without the answer point at [CLS]
    for f in holding:
        offsets = f["_offsets"]
        s, e = f["start_positions"] - f["_lead"], f["end_positions"] - f["_lead"]
        assert context[offsets[s][0]:offsets[e][1]] == "berlin"
    # Scoring picks the best span over every window: make the answer's window certain of it.
    outputs = []
    for f in features:
        n = len(f["input_ids"])
        starts, ends = torch.zeros(n), torch.zeros(n)
        if f is holding[0]:
            starts[f["start_positions"]] = ends[f["end_positions"]] = 10.0
        outputs.append((starts, ends))
    assert task.score(examples, features, outputs) == {"exact_match": 1.0, "f1": 1.0}
    # Spans end at or after their start (not start 5, end 0), and are at most max_answer_length tokens long.
    _, s, e = task.best_span(torch.tensor([0.0, 0, 0, 0, 0, 9]), torch.tensor([8.0, 0, 0, 0, 0, 0]))
    assert (s, e) == (5, 5)
    _, s, e = task.best_span(torch.tensor([9.0, 0, 0, 0, 0, 0.5]), torch.tensor([0.0, 0, 0, 2, 0, 9]))
    assert (s, e) == (0, 3)

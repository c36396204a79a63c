"""Evaluation metrics against values computed by hand."""

import math
import random

import pytest
from seqeval import metrics as seqeval

from bertfast.metrics import (
    accuracy,
    bio_spans,
    f1_binary,
    f1_macro,
    matthews_corrcoef,
    normalize_answer,
    pearson,
    span_f1,
    spearman,
    squad_exact_match,
    squad_f1,
)

PRED = [1, 1, 0, 1, 0, 0]
GOLD = [1, 0, 0, 1, 1, 0]  # tp=2 fp=1 fn=1 tn=2


def test_accuracy_and_f1():
    assert accuracy(PRED, GOLD) == pytest.approx(4 / 6)
    assert f1_binary(PRED, GOLD) == pytest.approx(2 / 3)  # P = R = 2/3
    assert f1_binary(PRED, GOLD, positive=0) == pytest.approx(2 / 3)
    # Class a: tp 1, predicted 2, actual 2 -> F1 1/2; b: tp 1, predicted 1, actual 2 -> 2/3; c: never right -> 0.
    assert f1_macro(["a", "a", "b", "c"], ["a", "b", "b", "a"]) == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert f1_binary([0, 0], [0, 0]) == 0.0
    with pytest.raises(ValueError, match="length"):
        accuracy([1], [1, 0])


def test_matthews():
    # Binary: (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (4 - 1) / sqrt(3*3*3*3) = 1/3.
    assert matthews_corrcoef(PRED, GOLD) == pytest.approx(1 / 3)
    assert matthews_corrcoef([1, 0, 1], [1, 0, 1]) == pytest.approx(1.0)
    assert matthews_corrcoef([0, 1], [1, 0]) == pytest.approx(-1.0)
    assert matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0
    # Three classes: n=4, correct=2, predicted counts {a2,b1,c1}, actual {a2,b2}:
    # (2*4 - (4+2)) / sqrt((16 - 6) * (16 - 8)) = 2 / sqrt(80).
    assert matthews_corrcoef(["a", "a", "b", "c"], ["a", "b", "b", "a"]) == pytest.approx(2 / math.sqrt(80))


def test_correlations():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    # Deviations (-1, 0, 1) and (-1, 1, 0) -> 1 / sqrt(2 * 2).
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0
    # Monotone but not linear: Spearman 1, Pearson below 1.
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [1, 4, 9, 100]) < 0.9
    # Ties get averaged ranks: (1, 2.5, 2.5, 4) vs (1, 2, 3, 4): deviations (-1.5, 0, 0, 1.5) and
    # (-1.5, -0.5, 0.5, 1.5) -> 4.5 / sqrt(4.5 * 5).
    assert spearman([10, 20, 20, 30], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def test_bio_spans_and_span_f1():
    tags = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "I-ORG", "O", "I-PER"]
    assert bio_spans(tags) == {("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 5), ("ORG", 6, 6), ("PER", 8, 8)}
    with pytest.raises(ValueError, match="not O, B-TYPE or I-TYPE"):
        bio_spans(["X-PER"])
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "B-MISC"]]
    # Gold chunks 3; predicted 4: PER(0,0) wrong, LOC right, ORG right, MISC wrong -> P 2/4, R 2/3.
    scores = span_f1(pred, gold)
    assert scores["precision"] == pytest.approx(0.5) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert span_f1([["O"]], [["O"]])["f1"] == 0.0


def test_squad_metrics():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an Apple a day") == "apple day"
    assert squad_exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert squad_exact_match("Eiffel", "Eiffel tower") == 0.0
    # pred {in, paris, france}, gold {paris}: P 1/3, R 1 -> F1 0.5.
    assert squad_f1("in Paris, France", "Paris") == pytest.approx(0.5)
    assert squad_f1("London", "Paris") == 0.0
    assert squad_f1("the", "") == 1.0  # both normalise to empty


def test_span_f1_agrees_with_seqeval():
    rng = random.Random(0)
    tags = ["O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC"]  # I- after O or another type starts a chunk
    for _ in range(50):
        lengths = [rng.randint(1, 8) for _ in range(rng.randint(1, 5))]
        gold = [rng.choices(tags, k=n) for n in lengths]
        pred = [[t if rng.random() < 0.7 else rng.choice(tags) for t in g] for g in gold]
        ours = span_f1(pred, gold)
        assert ours["precision"] == pytest.approx(seqeval.precision_score(gold, pred, zero_division=0))
        assert ours["recall"] == pytest.approx(seqeval.recall_score(gold, pred, zero_division=0))
        assert ours["f1"] == pytest.approx(seqeval.f1_score(gold, pred, zero_division=0))

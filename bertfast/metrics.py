"""GLUE-style evaluation metrics on plain Python sequences.

Classification: accuracy, F1 (binary and macro), Matthews correlation (the multiclass form, as
scikit-learn). Regression: Pearson and Spearman correlation. Tagging: span-level F1 over BIO tags
(seqeval's default, conlleval-compatible chunking). Extractive QA: SQuAD exact match and token F1
after SQuAD's answer normalisation, and the official SQuAD v1.1 and v2.0 evaluations (v2.0: no-answer
questions, the no-answer threshold and the search for the best one), as fractions rather than the
official scripts' percentages.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Hashable, Sequence


def _check_lengths(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"predictions and references differ in length: {len(a)} vs {len(b)}")
    if not a:
        raise ValueError("no predictions to score")


def accuracy(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    _check_lengths(predictions, references)
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def _f1(true_positives: int, predicted: int, actual: int) -> float:
    # Precision or recall with a zero denominator counts as 0, as scikit-learn's zero_division=0.
    if true_positives == 0:
        return 0.0
    precision, recall = true_positives / predicted, true_positives / actual
    return 2 * precision * recall / (precision + recall)


def f1_binary(predictions: Sequence[Hashable], references: Sequence[Hashable], positive: Hashable = 1) -> float:
    """F1 of the ``positive`` class."""
    _check_lengths(predictions, references)
    pairs = list(zip(predictions, references, strict=True))
    tp = sum(p == positive and r == positive for p, r in pairs)
    return _f1(tp, sum(p == positive for p, _ in pairs), sum(r == positive for _, r in pairs))


def f1_macro(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    """The unweighted mean of per-class F1 over every class seen in predictions or references."""
    _check_lengths(predictions, references)
    classes = set(predictions) | set(references)
    return sum(f1_binary(predictions, references, c) for c in classes) / len(classes)


def matthews_corrcoef(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    """Matthews correlation (Gorodkin's multiclass R_K); 0 when either side is constant."""
    _check_lengths(predictions, references)
    n = len(references)
    correct = sum(p == r for p, r in zip(predictions, references, strict=True))
    predicted, actual = Counter(predictions), Counter(references)
    classes = set(predicted) | set(actual)
    cov_pa = correct * n - sum(predicted[c] * actual[c] for c in classes)
    cov_pp = n * n - sum(v * v for v in predicted.values())
    cov_aa = n * n - sum(v * v for v in actual.values())
    if cov_pp == 0 or cov_aa == 0:
        return 0.0
    return cov_pa / math.sqrt(cov_pp * cov_aa)


def pearson(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Pearson correlation; 0 when either side is constant (it is undefined there)."""
    _check_lengths(predictions, references)
    n = len(references)
    mean_p, mean_r = sum(predictions) / n, sum(references) / n
    dp = [p - mean_p for p in predictions]
    dr = [r - mean_r for r in references]
    var_p, var_r = sum(d * d for d in dp), sum(d * d for d in dr)
    if var_p == 0 or var_r == 0:
        return 0.0
    return sum(a * b for a, b in zip(dp, dr, strict=True)) / math.sqrt(var_p * var_r)


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks; tied values share the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson correlation of the (tie-averaged) ranks."""
    _check_lengths(predictions, references)
    return pearson(_ranks(predictions), _ranks(references))


def _split_tag(tag: str) -> tuple[str, str]:
    if tag in ("O", ""):
        return "O", ""
    prefix, _, kind = tag.partition("-")
    if prefix not in ("B", "I") or not kind:
        raise ValueError(f"tag {tag!r} is not O, B-TYPE or I-TYPE")
    return prefix, kind


def bio_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, first, last) of each chunk; an I- tag that does not continue a chunk of its type starts one."""
    spans = set()
    start, kind = None, ""
    for i, tag in enumerate([*tags, "O"]):
        prefix, tag_kind = _split_tag(tag)
        continues = prefix == "I" and start is not None and tag_kind == kind
        if start is not None and not continues:
            spans.add((kind, start, i - 1))
            start = None
        if prefix != "O" and not continues:
            start, kind = i, tag_kind
    return spans


def span_f1(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 of exactly matching BIO chunks over all sequences (seqeval's)."""
    _check_lengths(predictions, references)
    correct = predicted = actual = 0
    for pred, ref in zip(predictions, references, strict=True):
        if len(pred) != len(ref):
            raise ValueError(f"a predicted tag sequence has {len(pred)} tags, its reference {len(ref)}")
        pred_spans, ref_spans = bio_spans(pred), bio_spans(ref)
        correct += len(pred_spans & ref_spans)
        predicted += len(pred_spans)
        actual += len(ref_spans)
    return {"precision": correct / predicted if predicted else 0.0,
            "recall": correct / actual if actual else 0.0,
            "f1": _f1(correct, predicted, actual)}


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation and the articles a/an/the, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _bag_f1(pred: list[str], ref: list[str]) -> float:
    return _f1(sum((Counter(pred) & Counter(ref)).values()), len(pred), len(ref))


def squad_f1(prediction: str, reference: str) -> float:
    """F1 of the bags of normalised tokens; two empty answers match (SQuAD v2.0's rule)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    return _bag_f1(pred, ref)


def squad_v1_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """SQuAD v1.1's evaluation: exact match and F1, each the best over an example's reference answers."""
    _check_lengths(predictions, references)
    exact = f1 = 0.0
    for prediction, answers in zip(predictions, references, strict=True):
        if not answers:
            raise ValueError("SQuAD v1.1 scoring needs at least one reference answer per question")
        pred = normalize_answer(prediction).split()
        exact += max(squad_exact_match(prediction, a) for a in answers)
        f1 += max(_bag_f1(pred, normalize_answer(a).split()) for a in answers)  # v1.1: no tokens scores 0
    return {"exact_match": exact / len(predictions), "f1": f1 / len(predictions)}


def _v2_raw_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list, list]:
    exact, f1 = [], []
    for prediction, answers in zip(predictions, references, strict=True):
        # References that normalise to nothing do not count; an unanswerable question's only answer is "".
        golds = [a for a in answers if normalize_answer(a)] or [""]
        exact.append(max(squad_exact_match(prediction, g) for g in golds))
        f1.append(max(squad_f1(prediction, g) for g in golds))
    return exact, f1


def _best_threshold(predictions: Sequence[str], scores: Sequence[float], na_probs: Sequence[float],
                    has_answer: Sequence[bool]) -> tuple[float, float]:
    """(score, threshold) of the best no-answer threshold, as the official script's find_best_thresh.

    Start from answering nothing (every unanswerable question right), then answer the questions in
    order of rising no-answer score, keeping the threshold where the total peaked.
    """
    current = best = float(sum(not h for h in has_answer))
    threshold = 0.0
    for i in sorted(range(len(scores)), key=lambda i: na_probs[i]):
        current += scores[i] if has_answer[i] else (-1 if predictions[i] else 0)
        if current > best:
            best, threshold = current, na_probs[i]
    return best / len(scores), threshold


def squad_v2_scores(predictions: Sequence[str], references: Sequence[Sequence[str]],
                    na_probs: Sequence[float] | None = None, na_prob_thresh: float = 1.0) -> dict[str, float]:
    """SQuAD v2.0's official evaluation (evaluate-v2.0.py), scores as fractions.

    ``references[i]`` lists question i's answers, empty when it is unanswerable. ``na_probs[i]`` is
    its no-answer score: above ``na_prob_thresh`` the question counts as answered with "" (the
    official default: every score 0, threshold 1). Returns ``exact``, ``f1``, ``total``, the same
    over the answerable (``HasAns_*``) and the unanswerable questions (``NoAns_*``), each present when
    there are such questions, and, given ``na_probs``, ``best_exact``/``best_f1`` with the thresholds
    that reach them (``best_exact_thresh``/``best_f1_thresh``).
    """
    _check_lengths(predictions, references)
    given = na_probs is not None
    na_probs = list(na_probs) if given else [0.0] * len(predictions)
    _check_lengths(predictions, na_probs)
    has_answer = [bool(answers) for answers in references]
    exact_raw, f1_raw = _v2_raw_scores(predictions, references)

    def thresholded(raw: list[float]) -> list[float]:
        return [float(not has) if p > na_prob_thresh else s for s, p, has in zip(raw, na_probs, has_answer,
                                                                                 strict=True)]

    exact, f1 = thresholded(exact_raw), thresholded(f1_raw)
    out: dict[str, float] = {"exact": sum(exact) / len(exact), "f1": sum(f1) / len(f1), "total": len(exact)}
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        chosen = [i for i, has in enumerate(has_answer) if has == wanted]
        if chosen:
            out[f"{prefix}_exact"] = sum(exact[i] for i in chosen) / len(chosen)
            out[f"{prefix}_f1"] = sum(f1[i] for i in chosen) / len(chosen)
            out[f"{prefix}_total"] = len(chosen)
    if given:
        out["best_exact"], out["best_exact_thresh"] = _best_threshold(predictions, exact_raw, na_probs, has_answer)
        out["best_f1"], out["best_f1_thresh"] = _best_threshold(predictions, f1_raw, na_probs, has_answer)
    return out

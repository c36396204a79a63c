"""SQuAD v2.0: the official evaluation rules on hand-built cases, null-score decoding, and a run end to end."""

import json
import random

import pytest
import torch
from finetune_helpers import squad_file, write_pretrained

from bertfast.cli import main
from bertfast.data import load_tokenizer
from bertfast.finetune import make_task
from bertfast.finetune.data import QAExample
from bertfast.metrics import squad_v1_scores, squad_v2_scores

pytestmark = pytest.mark.usefixtures("one_thread")

FILLER = "the a river old town lies near was built on".split()
CITIES = "paris berlin rome madrid oslo".split()

# Five questions: answerable ones (q1, q2, and q5, whose only answer normalises to nothing) and two
# unanswerable ones (q3, q4). Raw scores: exact (1, 0, 0, 1, 1); F1 (1, 2/3, 0, 1, 1): "tower" against
# "Eiffel Tower" has precision 1, recall 1/2; q5's "a" and "the" both normalise to "".
PREDICTIONS = ["Paris", "tower", "London", "", "a"]
REFERENCES = [["Paris", "the Paris"], ["Eiffel Tower"], [], [], ["the"]]
NA_PROBS = [0.1, 0.5, 0.6, 0.9, 0.2]


def test_v2_metrics_without_no_answer_scores():
    scores = squad_v2_scores(PREDICTIONS, REFERENCES)
    assert scores["exact"] == pytest.approx(3 / 5) and scores["f1"] == pytest.approx((3 + 2 / 3) / 5)
    assert scores["HasAns_exact"] == pytest.approx(2 / 3) and scores["HasAns_f1"] == pytest.approx((2 + 2 / 3) / 3)
    assert scores["NoAns_exact"] == scores["NoAns_f1"] == pytest.approx(1 / 2)
    assert (scores["total"], scores["HasAns_total"], scores["NoAns_total"]) == (5, 3, 2)
    assert "best_f1" not in scores  # the search needs no-answer scores


def test_v2_metrics_with_a_threshold_and_the_best_threshold_search():
    # Above 0.4 a question counts as answered with "": q2 (answerable, now 0), q3 and q4 (right).
    scores = squad_v2_scores(PREDICTIONS, REFERENCES, NA_PROBS, na_prob_thresh=0.4)
    assert scores["exact"] == scores["f1"] == pytest.approx(4 / 5)
    assert scores["HasAns_exact"] == scores["HasAns_f1"] == pytest.approx(2 / 3)
    assert scores["NoAns_exact"] == scores["NoAns_f1"] == 1.0
    # The search answers in order of no-answer score, q1 q5 q2 q3 q4, from "" everywhere (2 right):
    # exact 3, 4, 4, 3, 3 -> best 4/5 at q5's 0.2; F1 3, 4, 4 2/3, 3 2/3, 3 2/3 -> best (4 2/3)/5 at q2's 0.5.
    assert scores["best_exact"] == pytest.approx(4 / 5) and scores["best_exact_thresh"] == 0.2
    assert scores["best_f1"] == pytest.approx((4 + 2 / 3) / 5) and scores["best_f1_thresh"] == 0.5
    # Nothing beats answering nothing: the threshold stays 0.
    nothing = squad_v2_scores(["x", "y"], [["a"], []], [0.3, 0.7])
    assert nothing["best_exact"] == 0.5 and nothing["best_exact_thresh"] == 0.0
    assert "NoAns_exact" not in squad_v2_scores(["a"], [["a"]])


def test_v1_takes_the_best_reference():
    scores = squad_v1_scores(["Eiffel", "in Paris"], [["Eiffel tower", "the Eiffel"], ["Paris", "in Paris, France"]])
    # q1: exact via "the Eiffel"; q2: no exact match, F1 the better of 2/3 ("Paris": P 1/2, R 1) and
    # 4/5 ("in Paris, France": P 1, R 2/3).
    assert scores == {"exact_match": 0.5, "f1": pytest.approx((1 + 0.8) / 2)}
    assert squad_v1_scores(["the"], [["a"]])["f1"] == 0.0  # v1.1: no tokens on either side scores 0, not 1


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return write_pretrained(tmp_path_factory.mktemp("pretrained"), FILLER + CITIES + "which city".split())


def example(context, answer=None, ident="q"):
    start = context.index(answer) if answer else -1
    return QAExample("f:1", "which city", context, answer or "", start, [answer] if answer else [], ident)


def logits_for(feature, span=None, span_score=0.0, null_score=0.0):
    n = len(feature["input_ids"])
    starts, ends = torch.full((n,), -5.0), torch.full((n,), -5.0)
    starts[0] = ends[0] = null_score / 2
    if span is not None:
        starts[feature["_lead"] + span[0]] = ends[feature["_lead"] + span[1]] = span_score / 2
    return starts, ends


def test_null_score_against_the_best_span(pretrained):
    tokenizer = load_tokenizer(pretrained)
    task = make_task("question-answering", max_answer_length=5)
    examples = [example("the old town paris lies near", "paris", "a"), example("the old town oslo", None, "b")]
    task.label_config(examples)
    assert task.with_negative and task.main_metric == "best_f1"
    features = task.encode(examples, tokenizer, seq_len=32)
    assert [f["start_positions"] for f in features] == [features[0]["_lead"] + 3, 0]  # unanswerable: [CLS]
    # a: span 10 against null 2 -> "paris"; b: span "oslo" 3 against null 10 -> no answer.
    outputs = [logits_for(features[0], (3, 3), 10.0, 2.0), logits_for(features[1], (3, 3), 3.0, 10.0)]
    assert task.predict(examples, features, outputs) == ["paris", ""]
    scores = task.score(examples, features, outputs)
    assert scores["exact"] == scores["HasAns_exact"] == scores["NoAns_exact"] == 1.0
    # A threshold above b's null - span difference, 7, answers b as well.
    task.threshold = 8.0
    assert task.predict(examples, features, outputs) == ["paris", "oslo"]
    # The tuned threshold is the F1 search's, and goes into the saved model's config.
    assert task.config_updates() == {"null_score_diff_threshold": scores["best_f1_thresh"]}
    records = task.describe(examples, features, outputs)
    assert [r["id"] for r in records] == ["a", "b"] and records[0]["answer"] == "paris"
    assert 0 < records[0]["score"] <= 1 and records[1]["null_score_diff"] == pytest.approx(7.0)


def test_null_score_is_the_lowest_over_windows_and_the_span_the_best(pretrained):
    tokenizer = load_tokenizer(pretrained)
    task = make_task("question-answering", max_answer_length=3)
    context = " ".join(FILLER * 2) + " rome"
    examples = [example(context, "rome")]
    task.label_config([*examples, example("the town")])
    features = task.encode(examples, tokenizer, seq_len=16)
    assert len(features) > 2
    last = features[-1]
    rome = len(last["_offsets"]) - 1
    outputs = [logits_for(f, None, null_score=9.0) for f in features[:-1]] + [logits_for(last, (rome, rome), 4.0, 6.0)]
    # Null score min(9, ..., 6) = 6 beats the best span 4 by 2: no answer at threshold 0, "rome" at 2.5.
    assert task.predict(examples, features, outputs) == [""]
    task.threshold = 2.5
    assert task.predict(examples, features, outputs) == ["rome"]


def test_squad_v2_end_to_end(pretrained, tmp_path):
    rng = random.Random(0)
    train = squad_file(tmp_path / "train-v2.0.json", rng, 48, FILLER, CITIES)
    dev = squad_file(tmp_path / "dev-v2.0.json", rng, 16, FILLER, CITIES)
    out = tmp_path / "run"
    assert main(["finetune", "--task", "question-answering", "--model", str(pretrained), "--train", train,
                 "--eval", dev, "--output-dir", str(out), "--no-progress", "--seq-len", "32", "--epochs", "3",
                 "--batch-size", "8", "--lr", "3e-3"]) == 0
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["split"] == "eval"]
    assert {"exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1", "best_f1_thresh"} <= evals[-1].keys()
    best = max(evals, key=lambda r: r["best_f1"])
    assert best["best_f1"] > 0.5  # answering nothing scores 0.5
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_best_f1"] == best["best_f1"] and results["eval_HasAns_exact"] == best["HasAns_exact"]
    assert results["eval_samples"] == 16 and results["epoch"] == best["epoch"]
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["version_2_with_negative"] and config["null_score_diff_threshold"] == best["best_f1_thresh"]
    # The saved model answers with its tuned threshold: its F1 is the search's best.
    again = tmp_path / "again"
    assert main(["finetune", "--task", "question-answering", "--model", str(out / "best"), "--eval-only",
                 "--eval", dev, "--output-dir", str(again), "--no-progress", "--seq-len", "32"]) == 0
    record = json.loads((again / "metrics.jsonl").read_text())
    assert record["f1"] == pytest.approx(best["best_f1"])
    answers = [json.loads(line)["prediction"] for line in (again / "predictions.jsonl").read_text().splitlines()]
    assert "" in answers and any(answers)

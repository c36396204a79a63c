"""``bertfast predict`` with models fine-tuned on GLUE TSV, CoNLL and SQuAD v2.0 files."""

import json
import random

import pytest
from finetune_helpers import squad_file, write_pretrained

from bertfast.cli import main
from bertfast.metrics import squad_v2_scores

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = "good great fine nice".split()
BAD = "bad awful poor sad".split()
FILLER = "the a movie film was is it man dog river town lies near".split()
CITIES = "paris berlin rome oslo".split()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return write_pretrained(tmp_path_factory.mktemp("pretrained"), GOOD + BAD + FILLER + CITIES + ["which", "city"],
                            initializer_range=0.1, dropout=0.0)


def finetune(pretrained, out, task, train, evals, *extra):
    assert main(["finetune", "--task", task, "--model", str(pretrained), "--train", str(train), "--eval", str(evals),
                 "--output-dir", str(out), "--no-progress", "--seq-len", "32", "--batch-size", "4", "--lr", "3e-3",
                 *extra]) == 0
    return out / "best"


def predict(model, source, target, *extra):
    assert main(["predict", "--model", str(model), "--input", str(source), "--output", str(target), "--seq-len", "32",
                 "--no-progress", *extra]) == 0
    return [json.loads(line) for line in target.read_text().splitlines()]


def sentiment(rng, n):
    rows = []
    for i in range(n):
        label = i % 2
        rows.append((f"{rng.choice(FILLER)} {rng.choice(GOOD if label else BAD)}", str(label)))
    return rows


def test_classification_predictions_for_a_glue_test_file(pretrained, tmp_path, capsys):
    rng = random.Random(0)
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in sentiment(rng, 64)))
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in sentiment(rng, 16)))
    model = finetune(pretrained, tmp_path / "run", "classification", tmp_path / "train.tsv", tmp_path / "dev.tsv",
                     "--epochs", "3")
    test = sentiment(rng, 20)
    (tmp_path / "test.tsv").write_text("index\tsentence\n" + "".join(f"{i}\t{s}\n" for i, (s, _) in enumerate(test)))
    records = predict(model, tmp_path / "test.tsv", tmp_path / "out" / "predictions.jsonl")
    assert f"wrote 20 predictions to {tmp_path / 'out' / 'predictions.jsonl'}" in capsys.readouterr().out
    assert [r["where"] for r in records] == [f"{tmp_path / 'test.tsv'}:{i + 2}" for i in range(20)]
    for r in records:
        assert set(r["probabilities"]) == {"0", "1"} and sum(r["probabilities"].values()) == pytest.approx(1.0)
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
    assert sum(r["label"] == y for r, (_, y) in zip(records, test, strict=True)) >= 16  # chance is 10

    # A model that is not fine-tuned, or a bad row, is an error naming it.
    code = main(["predict", "--model", str(pretrained), "--input", str(tmp_path / "test.tsv"), "--output",
                 str(tmp_path / "x.jsonl"), "--no-progress"])
    assert code == 2 and "is not a fine-tuned model of a known task" in capsys.readouterr().err
    (tmp_path / "bad.tsv").write_text("index\tsentence\n0\tnice film\n1\n2\tpoor man\n")
    code = main(["predict", "--model", str(model), "--input", str(tmp_path / "bad.tsv"), "--output",
                 str(tmp_path / "x.jsonl"), "--no-progress"])
    assert code == 2 and f"{tmp_path / 'bad.tsv'}:3: 1 fields, but the header has 2" in capsys.readouterr().err
    records = predict(model, tmp_path / "bad.tsv", tmp_path / "x.jsonl", "--skip-bad-rows")
    assert [r["where"].rsplit(":", 1)[1] for r in records] == ["2", "4"]
    assert "skipped 1 bad row(s)" in capsys.readouterr().out


def conll(rng, n, tagged=True):
    sentences = []
    for _ in range(n):
        words = rng.choices(FILLER, k=4)
        at = rng.randrange(4)
        words[at] = rng.choice(CITIES)
        sentences.append("".join(f"{w} {'B-LOC' if i == at else 'O'}\n" if tagged else f"{w}\n"
                                 for i, w in enumerate(words)))
    return "-DOCSTART- O\n\n" + "\n".join(sentences)


def test_tags_per_word_for_a_conll_file(pretrained, tmp_path):
    rng = random.Random(1)
    (tmp_path / "train.txt").write_text(conll(rng, 48))
    (tmp_path / "valid.txt").write_text(conll(rng, 12))
    model = finetune(pretrained, tmp_path / "run", "token-classification", tmp_path / "train.txt",
                     tmp_path / "valid.txt", "--epochs", "3")
    (tmp_path / "test.txt").write_text(conll(rng, 10, tagged=False))  # tokens alone
    records = predict(model, tmp_path / "test.txt", tmp_path / "tags.jsonl")
    assert len(records) == 10 and all(len(r["tags"]) == len(r["tokens"]) == 4 for r in records)
    right = sum(tag == ("B-LOC" if word in CITIES else "O") for r in records for word, tag in zip(r["tokens"],
                                                                                                  r["tags"],
                                                                                                  strict=True))
    assert right >= 36  # of 40 words; all "O" would get 30


def test_squad_v2_answers_use_the_tuned_threshold(pretrained, tmp_path):
    rng = random.Random(2)
    train = squad_file(tmp_path / "train-v2.0.json", rng, 48, FILLER, CITIES)
    dev = squad_file(tmp_path / "dev-v2.0.json", rng, 16, FILLER, CITIES)
    model = finetune(pretrained, tmp_path / "run", "question-answering", train, dev, "--epochs", "3")
    best = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    records = predict(model, dev, tmp_path / "answers.jsonl")
    assert [r["id"] for r in records] == [f"q{i}" for i in range(16)]
    assert all((r["score"] is None) == (r["answer"] == "") and "null_score_diff" in r for r in records)
    questions = [q for p in json.loads((tmp_path / "dev-v2.0.json").read_text())["data"][0]["paragraphs"]
                 for q in p["qas"]]
    scores = squad_v2_scores([r["answer"] for r in records], [[a["text"] for a in q["answers"]] for q in questions])
    assert scores["f1"] == pytest.approx(best["eval_best_f1"])  # what the threshold search promised
    assert main(["predict", "--model", str(model), "--input", dev, "--output", str(tmp_path / "predictions.json"),
                 "--seq-len", "32", "--no-progress"]) == 0
    official = json.loads((tmp_path / "predictions.json").read_text())
    assert official == {r["id"]: r["answer"] for r in records}  # SQuAD's prediction file


def test_an_existing_output_is_replaced_only_with_overwrite_and_a_locked_directory_refuses(pretrained, tmp_path,
                                                                                          capsys):
    import os

    from bertfast.training.rundir import LOCK_FILE, RunDirectory

    rng = random.Random(3)
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in sentiment(rng, 8)))
    model = finetune(pretrained, tmp_path / "run", "classification", tmp_path / "train.tsv", tmp_path / "train.tsv",
                     "--epochs", "1")
    (tmp_path / "test.tsv").write_text("sentence\nnice film\npoor man\n")
    target = tmp_path / "out" / "labels.jsonl"
    assert len(predict(model, tmp_path / "test.tsv", target)) == 2
    assert not (target.parent / LOCK_FILE).exists()  # released

    target.write_text("kept\n")
    command = ["predict", "--model", str(model), "--input", str(tmp_path / "test.tsv"), "--output", str(target),
               "--no-progress"]
    capsys.readouterr()
    assert main(command) == 2
    assert (f"--output {target} exists; pass --overwrite to replace it, or choose another --output"
            in capsys.readouterr().err)
    assert target.read_text() == "kept\n"

    holder = RunDirectory.open(target.parent, [], resume=False, overwrite=False)  # e.g. a run writing there
    try:
        assert main([*command, "--overwrite"]) == 2
    finally:
        holder.release()
    assert f"--output {target.parent} is in use by another run (pid {os.getpid()} on " in capsys.readouterr().err
    assert target.read_text() == "kept\n"
    assert main([*command, "--overwrite"]) == 0
    assert len(target.read_text().splitlines()) == 2

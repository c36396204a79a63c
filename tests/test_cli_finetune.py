"""``bertfast finetune`` end to end on tiny generated data with a tiny pretrained checkpoint, per task."""

import json
import random

import pytest
import torch

from bertfast.cli import main
from bertfast.config import BertConfig
from bertfast.data import load_tokenizer
from bertfast.data.tokenizer import SPECIAL_TOKENS
from bertfast.models import BertForPreTraining, BertForSequenceClassification

GOOD = "good great fine nice happy".split()
BAD = "bad awful poor sad ugly".split()
FILLER = "the a movie film was is this it very quite".split()
CITIES = "paris berlin rome madrid oslo".split()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny BERT checkpoint as `bertfast pretrain` writes one: config, weights, tokenizer files.

    The vocabulary is written out rather than trained: WordPiece training breaks ties in hash-map
    order, and a vocabulary that changed from run to run would make these tests' outcomes vary too.
    """
    directory = tmp_path_factory.mktemp("pretrained")
    words = GOOD + BAD + FILLER + CITIES + "where lies which city who".split()
    (directory / "vocab.txt").write_text("\n".join([*SPECIAL_TOKENS, *sorted(set(words))]) + "\n")
    tokenizer = load_tokenizer(directory / "vocab.txt")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertForPreTraining(config).save_pretrained(directory)
    tokenizer.save(directory)
    return directory


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sentiment(rng, n):
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.choices(FILLER, k=4) + [rng.choice(GOOD if label == "pos" else BAD)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def run(model, tmp_path, task, train, evals, *extra):
    out = tmp_path / "run"
    code = main(["finetune", "--task", task, "--model", str(model), "--output-dir", str(out), "--no-progress",
                 "--train", write(tmp_path / "train.jsonl", train), "--eval", write(tmp_path / "eval.jsonl", evals),
                 "--seq-len", "32", "--log-every", "5", *extra])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, [r for r in records if r["split"] == "train"], [r for r in records if r["split"] == "eval"]


def test_classification_learns_and_saves_a_transformers_model(pretrained, tmp_path, capsys):
    rng = random.Random(1)
    out, train, evals = run(pretrained, tmp_path, "classification", sentiment(rng, 96), sentiment(rng, 48),
                            "--epochs", "8", "--batch-size", "8", "--lr", "2e-3")
    assert [r["epoch"] for r in evals] == list(range(1, 9))
    assert train[-1]["loss"] < train[0]["loss"]
    assert max(r["accuracy"] for r in evals) >= 0.8  # chance is 0.5
    assert {"f1", "f1_macro", "matthews", "loss"} <= evals[-1].keys()
    assert "best: epoch" in capsys.readouterr().out

    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out / "best")
    assert model.config.id2label == {0: "neg", 1: "pos"}
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "best")
    with torch.no_grad():
        logits = model(**tokenizer(["good movie", "awful film"], padding=True, return_tensors="pt")).logits
    assert logits.shape == (2, 2) and (out / "last" / "model.safetensors").is_file()
    assert json.loads((out / "best" / "tokenizer.json").read_text())["truncation"] is None


def test_regression_from_a_config_file(pretrained, tmp_path):
    rng = random.Random(2)
    rows = []
    for _ in range(64):
        score = rng.choice([0, 2])  # 0 or 2 good words among fillers
        words = rng.choices(GOOD, k=score) + rng.choices(FILLER, k=4 - score)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "text_pair": rng.choice(FILLER), "label": float(score)})
    config = tmp_path / "options.yaml"
    config.write_text("regression: true\nepochs: 6\nbatch-size: 8\nlr: 3e-3\n")
    out, train, evals = run(pretrained, tmp_path, "classification", rows, rows[:16], "--config", str(config))
    assert len(evals) == 6 and {"pearson", "spearman", "mse"} <= evals[-1].keys()
    assert train[-1]["loss"] < train[0]["loss"]
    assert max(r["pearson"] for r in evals) > 0.5
    assert json.loads((out / "finetune_config.json").read_text())["regression"]
    model = BertForSequenceClassification.from_pretrained(out / "best")
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"


def test_token_classification(pretrained, tmp_path):
    rng = random.Random(3)
    rows = []
    for _ in range(64):
        words = rng.choices(FILLER, k=5)
        at = rng.randrange(4)
        words[at:at + 2] = [rng.choice(CITIES), rng.choice(CITIES)]
        tags = ["O"] * len(words)
        tags[at:at + 2] = ["B-LOC", "I-LOC"]
        rows.append({"tokens": words, "tags": tags})
    out, train, evals = run(pretrained, tmp_path, "token-classification", rows, rows[:16], "--epochs", "3",
                            "--batch-size", "8", "--lr", "3e-3")
    assert train[-1]["loss"] < train[0]["loss"]
    assert {"f1", "precision", "recall", "accuracy"} <= evals[-1].keys()
    assert max(r["accuracy"] for r in evals) > 0.8  # "O" everywhere would score 5/7
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForTokenClassification.from_pretrained(out / "best")
    assert set(model.config.id2label.values()) == {"B-LOC", "I-LOC", "O"}


def test_multiple_choice(pretrained, tmp_path):
    rng = random.Random(4)
    rows = []
    for _ in range(32):
        label = rng.randrange(3)
        choices = [" ".join(rng.choices(BAD, k=2)) for _ in range(3)]
        choices[label] = " ".join(rng.choices(GOOD, k=2))
        rows.append({"context": "this movie was", "choices": choices, "label": label})
    out, train, evals = run(pretrained, tmp_path, "multiple-choice", rows, rows[:12], "--epochs", "4",
                            "--batch-size", "8", "--lr", "3e-3", "--precision", "bf16")
    assert len(evals) == 4 and train[-1]["loss"] < train[0]["loss"]
    assert max(r["accuracy"] for r in evals) >= 0.75  # chance is 1/3
    transformers = pytest.importorskip("transformers")
    transformers.AutoModelForMultipleChoice.from_pretrained(out / "best")


def test_question_answering(pretrained, tmp_path):
    rng = random.Random(5)
    rows = []
    for _ in range(32):
        city = rng.choice(CITIES)
        before, after = rng.choices(FILLER, k=rng.randint(2, 30)), rng.choices(FILLER, k=3)
        context = " ".join(before) + " " + city + " " + " ".join(after)
        rows.append({"question": "which city", "context": context,
                     "answer": {"text": city, "start": len(" ".join(before)) + 1}})
    out, train, evals = run(pretrained, tmp_path, "question-answering", rows, rows[:12], "--epochs", "2",
                            "--batch-size", "8", "--lr", "3e-3")
    assert {"exact_match", "f1", "loss"} <= evals[-1].keys() and train[-1]["loss"] < train[0]["loss"]
    transformers = pytest.importorskip("transformers")
    transformers.AutoModelForQuestionAnswering.from_pretrained(out / "best")


def test_bad_input_exits_with_code_2(pretrained, tmp_path, capsys):
    train = write(tmp_path / "train.jsonl", [{"text": "good", "label": "pos"}])
    (tmp_path / "eval.jsonl").write_text('{"text": "bad", "label": "neg"}\n')
    code = main(["finetune", "--task", "classification", "--model", str(pretrained), "--train", train,
                 "--eval", str(tmp_path / "eval.jsonl"), "--output-dir", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    assert "eval.jsonl:1: label 'neg' does not occur in the training data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["finetune", "--task", "classification", "--model", str(pretrained), "--train", train])
    assert "missing required option(s): --eval" in capsys.readouterr().err


def predictions(out):
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_predictions_and_evaluating_a_fine_tuned_model(pretrained, tmp_path, capsys):
    rng = random.Random(6)
    evals_rows = sentiment(rng, 24)
    out, _, evals = run(pretrained, tmp_path, "classification", sentiment(rng, 64), evals_rows,
                        "--epochs", "2", "--batch-size", "8", "--lr", "3e-3")
    written = predictions(out)
    assert [p["label"] for p in written] == [r["label"] for r in evals_rows]
    assert {p["prediction"] for p in written} <= {"pos", "neg"}
    best = max(evals, key=lambda r: r["accuracy"])
    assert sum(p["prediction"] == p["label"] for p in written) / len(written) == pytest.approx(best["accuracy"])

    # The best model, evaluated again on the same data without training, scores what its epoch scored;
    # integer labels in a new file match the config's label names as strings.
    again = tmp_path / "again"
    code = main(["finetune", "--task", "classification", "--model", str(out / "best"), "--eval-only",
                 "--eval", str(tmp_path / "eval.jsonl"), "--output-dir", str(again), "--no-progress"])
    assert code == 0
    record = json.loads((again / "metrics.jsonl").read_text())
    assert record["accuracy"] == pytest.approx(best["accuracy"]) and record["loss"] == pytest.approx(best["loss"])
    assert predictions(again) == written
    assert not (again / "best").exists()

    # A checkpoint without the task's head is refused, not evaluated with a random head.
    code = main(["finetune", "--task", "classification", "--model", str(pretrained), "--eval-only",
                 "--eval", str(tmp_path / "eval.jsonl"), "--output-dir", str(tmp_path / "x"), "--no-progress"])
    assert code == 2
    assert "is not a fine-tuned classification model" in capsys.readouterr().err


def test_eval_only_names_labels_the_model_does_not_know(pretrained, tmp_path, capsys):
    rng = random.Random(7)
    out, _, _ = run(pretrained, tmp_path, "classification", sentiment(rng, 16), sentiment(rng, 8),
                    "--epochs", "1", "--batch-size", "8")
    data = write(tmp_path / "new.jsonl", [{"text": "good", "label": "pos"}, {"text": "meh", "label": "neutral"}])
    code = main(["finetune", "--task", "classification", "--model", str(out / "best"), "--eval-only",
                 "--eval", data, "--output-dir", str(tmp_path / "x"), "--no-progress"])
    assert code == 2
    assert "new.jsonl:2: label 'neutral' does not occur in the model's config" in capsys.readouterr().err


def test_gradient_accumulation_matches_one_big_batch(tmp_path, pretrained):
    # Without dropout, 2 accumulated batches of 4 are one batch of 8: same data order, same update.
    directory = tmp_path / "no-dropout"
    model = BertForPreTraining.from_pretrained(pretrained, hidden_dropout_prob=0.0,
                                               attention_probs_dropout_prob=0.0)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "vocab.txt"):
        if (pretrained / name).exists():
            (directory / name).write_bytes((pretrained / name).read_bytes())
    rng = random.Random(8)
    rows, evals_rows = sentiment(rng, 20), sentiment(rng, 8)
    weights = []
    for batch, accum in (("8", "1"), ("4", "2")):
        (tmp_path / f"b{batch}").mkdir()
        out, train, _ = run(directory, tmp_path / f"b{batch}", "classification", rows, evals_rows,
                            "--epochs", "1", "--batch-size", batch, "--grad-accum", accum, "--lr", "1e-3")
        assert [r["step"] for r in train] == [3]  # 20 examples, 8 per step
        weights.append(BertForSequenceClassification.from_pretrained(out / "last").state_dict())
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=0, atol=2e-5, msg=key)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(weights[0][key], model.state_dict()[key], atol=1e-4)  # the steps did train


def test_resume_after_an_interruption_ends_where_an_uninterrupted_run_does(pretrained, tmp_path, monkeypatch,
                                                                           capsys):
    from bertfast.finetune import Finetuner

    rng = random.Random(9)
    train = write(tmp_path / "train.jsonl", sentiment(rng, 24))
    evals = write(tmp_path / "eval.jsonl", sentiment(rng, 8))

    def finetune(out, *extra):
        return main(["finetune", "--task", "classification", "--model", str(pretrained), "--train", train,
                     "--eval", evals, "--output-dir", str(out), "--no-progress", "--seq-len", "32", "--epochs", "3",
                     "--batch-size", "8", "--lr", "3e-3", "--log-every", "1", *extra])

    assert finetune(tmp_path / "straight") == 0
    original = Finetuner.train_epoch

    def interrupted(self, epoch):
        if epoch == 3:
            raise KeyboardInterrupt
        original(self, epoch)

    monkeypatch.setattr(Finetuner, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune(tmp_path / "resumed")
    monkeypatch.undo()
    assert finetune(tmp_path / "resumed", "--resume") == 0
    assert "resuming after epoch 2 (step 6)" in capsys.readouterr().out

    def read(out):
        return ([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()],
                BertForSequenceClassification.from_pretrained(out / "last").state_dict())

    (records, weights), (records_resumed, weights_resumed) = read(tmp_path / "straight"), read(tmp_path / "resumed")
    assert records_resumed == records  # the same losses at every step, dropout included
    for key, value in weights.items():
        assert torch.equal(weights_resumed[key], value), key

    # A resumed run must keep the options that shape training, and needs a finished epoch to resume from.
    assert finetune(tmp_path / "resumed", "--resume", "--lr", "1e-3") == 2
    assert "cannot change --lr 0.001 (the run has 0.003)" in capsys.readouterr().err
    assert finetune(tmp_path / "nothing-yet", "--resume") == 2
    assert "has no finished epoch to resume from" in capsys.readouterr().err


def test_resume_from_a_damaged_trainer_state_names_the_file(pretrained, tmp_path, capsys):
    rng = random.Random(10)
    out, _, _ = run(pretrained, tmp_path, "classification", sentiment(rng, 8), sentiment(rng, 4), "--epochs", "1",
                    "--batch-size", "8")
    state = out / "last" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # a write cut short
    code = main(["finetune", "--task", "classification", "--model", str(pretrained), "--train",
                 str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "eval.jsonl"), "--output-dir", str(out),
                 "--no-progress", "--seq-len", "32", "--epochs", "1", "--batch-size", "8", "--resume"])
    assert code == 2
    assert f"cannot read the trainer state {state}" in capsys.readouterr().err


def test_a_csv_with_named_columns_bad_rows_skipped_and_eval_results(pretrained, tmp_path, capsys):
    rng = random.Random(11)
    rows = sentiment(rng, 24)
    train = tmp_path / "reviews.csv"
    train.write_text("Review,Verdict\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows[:16])
                     + "ragged row\n" + "fine film,meh\n")
    dev = tmp_path / "dev.csv"
    dev.write_text("Review,Verdict\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows[16:]))
    out = tmp_path / "run"
    args = ["finetune", "--task", "classification", "--model", str(pretrained), "--train", str(train), "--eval",
            str(dev), "--output-dir", str(out), "--no-progress", "--seq-len", "32", "--epochs", "1",
            "--text-column", "Review", "--label-column", "Verdict", "--label-names", "neg", "pos"]
    assert main(args) == 2
    assert f"{train}:18: 1 fields, but the header has 2 (Review, Verdict)" in capsys.readouterr().err
    assert main([*args, "--skip-bad-rows"]) == 0
    printed = capsys.readouterr().out
    assert f"skipped 2 bad row(s) (--skip-bad-rows):\n  {train}: 2, the first: {train}:18" in printed
    assert "16 train / 8 eval examples" in printed
    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    results = json.loads((out / "eval_results.json").read_text())
    assert results == {"epoch": 1, "eval_loss": record["loss"], "eval_accuracy": record["accuracy"],
                       "eval_f1_macro": record["f1_macro"], "eval_matthews_correlation": record["matthews"],
                       "eval_f1": record["f1"], "eval_samples": 8}

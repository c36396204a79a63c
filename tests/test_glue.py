"""``bertfast glue`` on small generated data in GLUE's layout: every task above its majority baseline."""

import json
import random
from collections import Counter

import pytest
from finetune_helpers import write_pretrained

from bertfast.cli import main
from bertfast.finetune.glue import TASKS, find_task, markdown_table

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = "good great fine nice happy".split()
BAD = "bad awful poor sad ugly".split()
NEUTRAL = "maybe perhaps often later sometimes".split()
FILLER = "the a movie film was is this it very quite man dog".split()
FILL = 1  # filler words beside the keyword: short sentences make the keyword easy to find
MNLI_TRAIN = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
              "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")
MNLI_DEV = MNLI_TRAIN.replace("label1\t", "label1\tlabel2\tlabel3\tlabel4\tlabel5\t")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    # Without dropout and with a wider init than BERT's, a random tiny BERT leaves its first plateau
    # within the few steps that keep this test short.
    return write_pretrained(tmp_path_factory.mktemp("pretrained"), GOOD + BAD + NEUTRAL + FILLER,
                            initializer_range=0.1, dropout=0.0)


def sentence(rng, keyword):
    words = rng.choices(FILLER, k=FILL) + [keyword]
    rng.shuffle(words)
    return " ".join(words)


def rows_for(task, rng, n, split):
    """(header or None, rows, gold labels) of one generated split; each label shows in a keyword.

    The classes take turns, so the majority baseline is 1/2 (MNLI: 1/3).
    """
    rows, labels = [], []
    for i in range(n):
        first = sentence(rng, rng.choice(FILLER))
        if task == "MNLI":
            label = ("entailment", "contradiction", "neutral")[i % 3]
            second = sentence(rng, rng.choice({"entailment": GOOD, "contradiction": BAD, "neutral": NEUTRAL}[label]))
        elif task == "STS-B":
            label = rng.randint(0, 3)
            words = rng.choices(GOOD, k=label) + rng.choices(FILLER, k=3 - label)
            rng.shuffle(words)
            second = " ".join(words)
            label = f"{label + rng.random() * 0.5:.3f}"
        else:
            positive = i % 2 == 0
            label = {"QNLI": ("not_entailment", "entailment"), "RTE": ("not_entailment", "entailment")}.get(
                task, ("0", "1"))[positive]
            second = sentence(rng, rng.choice(GOOD if positive else BAD))
        labels.append(label)
        if task == "CoLA":
            rows.append(f"src{i}\t{label}\t{'' if label == '1' else '*'}\t{second}")
        elif task == "SST-2":
            rows.append(f"{second}\t{label}")
        elif task == "MRPC":
            rows.append(f"{label}\t{i}\t{i + 1}\t{first}\t{second}")
        elif task == "QQP":
            rows.append(f"{i}\t{2 * i}\t{2 * i + 1}\t{first}\t{second}\t{label}")
        elif task == "STS-B":
            rows.append(f"{i}\tmain-news\tnews\t2012\t{i}\tnone\tnone\t{first}\t{second}\t{label}")
        elif task == "MNLI":
            parses = f"( {first} )\t( {second} )\t(ROOT {first})\t(ROOT {second})"
            extra = "\t".join([label] * (5 if split != "train" else 1))
            rows.append(f"{i}\t{i}\t{i}n\tfiction\t{parses}\t{first}\t{second}\t{extra}\t{label}")
        else:  # QNLI, RTE, WNLI
            rows.append(f"{i}\t{first}\t{second}\t{label}")
    headers = {"CoLA": None, "SST-2": "sentence\tlabel",
               "MRPC": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
               "QQP": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
               "STS-B": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
               "MNLI": MNLI_TRAIN if split == "train" else MNLI_DEV, "QNLI": "index\tquestion\tsentence\tlabel"}
    return headers.get(task, "index\tsentence1\tsentence2\tlabel"), rows, labels


def write_task(data_dir, task, rng, n_train=64, n_dev=24):
    folder = data_dir / task.name
    folder.mkdir(parents=True)
    gold = {}
    for split in ("train", *(f.removesuffix(".tsv") for f in task.eval_files)):
        header, rows, labels = rows_for(task.name, rng, n_train if split == "train" else n_dev, split)
        (folder / f"{split}.tsv").write_text("".join(line + "\n" for line in ([header] if header else []) + rows),
                                             encoding="utf-8")
        gold[split] = labels
    return gold


def majority_baseline(task, gold):
    """The score of always predicting the most frequent dev label (0 for the correlations)."""
    if task.name in ("CoLA", "STS-B"):
        return 0.0
    dev = gold[task.eval_files[0].removesuffix(".tsv")]
    label, count = Counter(dev).most_common(1)[0]
    accuracy = count / len(dev)
    if task.name == "MNLI":
        mismatched = Counter(gold["dev_mismatched"]).most_common(1)[0][1] / len(gold["dev_mismatched"])
        return (accuracy + mismatched) / 2
    if task.name in ("MRPC", "QQP"):  # F1 of class "1": 2p / (1 + p) when everything is predicted "1"
        f1 = 2 * accuracy / (1 + accuracy) if label == "1" else 0.0
        return (f1 + accuracy) / 2
    return accuracy


def test_glue_end_to_end_beats_each_majority_baseline(pretrained, tmp_path, capsys):
    rng = random.Random(1)
    data = tmp_path / "glue_data"
    gold = {task.name: write_task(data, task, rng) for task in TASKS}
    out = tmp_path / "glue"
    code = main(["glue", "--data-dir", str(data), "--model", str(pretrained), "--output-dir", str(out),
                 "--epochs", "4", "--batch-size", "4", "--lr", "3e-3", "--seq-len", "32", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    results = json.loads((out / "glue_results.json").read_text())
    assert list(results["tasks"]) == [t.name for t in TASKS] and results["errors"] == {}
    for task in TASKS:
        r = results["tasks"][task.name]
        baseline = majority_baseline(task, gold[task.name])
        assert r["score"] > baseline + 0.1, (task.name, r, baseline)
    cola, sts, mrpc, mnli = (results["tasks"][n] for n in ("CoLA", "STS-B", "MRPC", "MNLI"))
    assert mrpc["score"] == pytest.approx((mrpc["f1"] + mrpc["accuracy"]) / 2)
    assert sts["score"] == pytest.approx((sts["pearson"] + sts["spearmanr"]) / 2)
    assert mnli["score"] == pytest.approx((mnli["accuracy"] + mnli["accuracy_mm"]) / 2)
    assert mnli["eval_examples"] == {"dev_matched.tsv": 24, "dev_mismatched.tsv": 24}
    assert cola["score"] == cola["matthews_correlation"] and cola["train_examples"] == 64
    assert results["average"] == pytest.approx(sum(r["score"] for r in results["tasks"].values()) / len(TASKS))
    # Each task is a finetune run directory with transformers' metric names in eval_results.json.
    cola_results = json.loads((out / "CoLA" / "eval_results.json").read_text())
    assert cola_results["eval_matthews_correlation"] == cola["matthews_correlation"]
    assert cola_results["eval_samples"] == 24 and (out / "MNLI" / "dev_mismatched" / "eval_results.json").is_file()
    mnli_results = json.loads((out / "MNLI" / "eval_results.json").read_text())  # both, as run_glue.py writes them
    assert (mnli_results["eval_accuracy"], mnli_results["eval_accuracy_mm"]) == (mnli["accuracy"], mnli["accuracy_mm"])
    assert mnli_results["epoch"] == mnli["best_epoch"] and mnli_results["eval_samples_mm"] == 24
    table = (out / "glue_results.md").read_text()
    assert table == markdown_table(results) and table in printed
    assert f"| CoLA | Matthews {100 * cola['matthews_correlation']:.1f} |" in table
    assert f"**{100 * results['average']:.1f}**" in table
    assert (out / "glue_results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(table)  # the measured scores, with -s


def test_missing_and_malformed_task_folders_are_named_and_the_rest_still_run(pretrained, tmp_path, capsys):
    rng = random.Random(1)
    data = tmp_path / "glue_data"
    write_task(data, find_task("rte"), rng, n_train=16, n_dev=8)
    write_task(data, find_task("sst2"), rng, n_train=4, n_dev=4)
    (data / "SST-2" / "train.tsv").write_text("sentence\tgrade\nnice film\t1\n")
    write_task(data, find_task("QNLI"), rng, n_train=4, n_dev=4)
    (data / "QNLI" / "train.tsv").unlink()
    out = tmp_path / "glue"
    code = main(["glue", "--data-dir", str(data), "--model", str(pretrained), "--output-dir", str(out),
                 "--tasks", "sst-2", "QNLI", "RTE", "wnli", "--epochs", "1", "--set", "RTE.epochs=2",
                 "--batch-size", "8", "--seq-len", "32"])
    err = capsys.readouterr().err
    assert "GLUE: 100%" in err and "| 3/3 " in err  # one bar over the epochs of the tasks that could start
    assert code == 2
    results = json.loads((out / "glue_results.json").read_text())
    assert list(results["tasks"]) == ["RTE"] and results["tasks"]["RTE"]["best_epoch"] in (1, 2)
    errors = results["errors"]
    assert errors["SST-2"].endswith("train.tsv: no column 'label' (--label-column); the columns are 'sentence', "
                                    "'grade'")
    assert errors["QNLI"] == f"QNLI: {data / 'QNLI'} has no train.tsv"
    assert errors["WNLI"] == f"WNLI: no folder {data / 'WNLI'}"
    assert results["average"] == results["tasks"]["RTE"]["score"]
    assert "WNLI failed: WNLI: no folder" in err
    with pytest.raises(SystemExit):
        main(["glue", "--data-dir", str(data), "--model", str(pretrained), "--tasks", "XNLI"])
    assert "unknown GLUE task 'XNLI'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # before any training
        main(["glue", "--data-dir", str(data), "--model", str(pretrained), "--set", "rte.label-column=x"])
    assert "RTE: bertfast glue sets label_column itself" in capsys.readouterr().err


def test_the_output_directory_is_guarded_as_a_training_runs(pretrained, tmp_path, capsys):
    import os

    from bertfast.training.rundir import RunDirectory

    data, out = tmp_path / "glue_data", tmp_path / "glue"
    write_task(data, find_task("rte"), random.Random(2), n_train=8, n_dev=4)

    def glue(*extra):
        return main(["glue", "--data-dir", str(data), "--model", str(pretrained), "--output-dir", str(out),
                     "--epochs", "1", "--batch-size", "8", "--seq-len", "32", "--no-progress", *extra])

    assert glue() == 0
    first = (out / "glue_results.json").read_text()
    capsys.readouterr()
    assert glue() == 2  # a second run would mix into the first: refused before any training
    err = capsys.readouterr().err
    assert (f"--output-dir {out} holds another run (RTE, glue_results.json, glue_results.md, glue_results.png); "
            "pass --overwrite to replace it, or choose another --output-dir") in err
    assert "--resume" not in err and "GLUE RTE" not in err
    assert (out / "glue_results.json").read_text() == first

    holder = RunDirectory.open(out, [], resume=False, overwrite=False)
    try:
        assert glue("--overwrite") == 2  # a run in progress there: stopped by the lock, even with --overwrite
    finally:
        holder.release()
    assert f"--output-dir {out} is in use by another run (pid {os.getpid()} on " in capsys.readouterr().err
    assert (out / "glue_results.json").read_text() == first

    (out / "RTE" / "stale.txt").write_text("from the first run")
    assert glue("--overwrite") == 0
    assert not (out / "RTE" / "stale.txt").exists()  # the old run's task folder went first
    assert json.loads((out / "glue_results.json").read_text())["tasks"].keys() == {"RTE"}

"""Data formats: JSON lines, JSON, CSV/TSV (GLUE's real headers), CoNLL and SQuAD, good files and broken ones."""

import json

import pytest

from bertfast.finetune import DataError, make_task
from bertfast.finetune.data import (
    DataOptions,
    read_classification,
    read_question_answering,
    read_token_classification,
)
from bertfast.finetune.formats import RowErrors, detect_format, infer_columns

# The header lines GLUE's download script writes (MRPC's keeps the byte-order mark of Microsoft's file),
# and the (text, second text, label) columns each task is read from.
GLUE_HEADERS = {
    "SST-2": ("sentence\tlabel", ("sentence", None, "label")),
    "MRPC": ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String", ("#1 String", "#2 String", "Quality")),
    "QQP": ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", ("question1", "question2", "is_duplicate")),
    "STS-B": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
              ("sentence1", "sentence2", "score")),
    "MNLI train": ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                   "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label",
                   ("sentence1", "sentence2", "gold_label")),
    "MNLI dev": ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                 "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\t"
                 "gold_label", ("sentence1", "sentence2", "gold_label")),
    "QNLI": ("index\tquestion\tsentence\tlabel", ("question", "sentence", "label")),
    "RTE": ("index\tsentence1\tsentence2\tlabel", ("sentence1", "sentence2", "label")),
    "WNLI": ("index\tsentence1\tsentence2\tlabel", ("sentence1", "sentence2", "label")),
}


def lines(path, rows):
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def jsonl(path, rows):
    return lines(path, [json.dumps(r) for r in rows])


@pytest.mark.parametrize("task", sorted(GLUE_HEADERS))
def test_columns_are_inferred_from_each_glue_header(tmp_path, task):
    header, expected = GLUE_HEADERS[task]
    names = header.lstrip("\ufeff").split("\t")
    columns = infer_columns(names, "x.tsv")
    assert (columns.text, columns.text_pair, columns.label) == expected
    # ... and read from a file with that header: each field under its column, quotes taken literally.
    values = {name: f"v{i}" for i, name in enumerate(names)}
    values[expected[0]] = 'a "quoted word'
    values[expected[2]] = "1"
    path = lines(tmp_path / "dev.tsv", [header, "\t".join(values[n] for n in names)])
    example = read_classification(path, regression=task == "STS-B")[0]
    assert example.text == 'a "quoted word' and example.where == f"{path}:2"
    assert example.text_pair == (values[expected[1]] if expected[1] else None)
    assert example.label == (1.0 if task == "STS-B" else "1")


def test_headerless_tsv_takes_its_column_names_from_the_options(tmp_path):
    # CoLA: source, label, the original author's mark, sentence; no header line.
    path = lines(tmp_path / "train.tsv", ["gj04\t1\t\tOur friends won't buy this analysis.",
                                          "gj04\t0\t*\tThey drank the pub."])
    options = DataOptions(column_names=["source", "label", "original_label", "sentence"])
    examples = read_classification(path, options=options)
    assert [(e.text, e.label, e.where) for e in examples] == [
        ("Our friends won't buy this analysis.", "1", f"{path}:1"), ("They drank the pub.", "0", f"{path}:2")]


def test_jsonl_and_csv_in_the_common_dialects(tmp_path):
    sst = read_classification(jsonl(tmp_path / "a.jsonl", [{"sentence": "fine film", "label": 1, "idx": 0}]))
    assert (sst[0].text, sst[0].text_pair, sst[0].label) == ("fine film", None, 1)
    nli = read_classification(jsonl(tmp_path / "b.jsonl", [{"premise": "p", "hypothesis": "h", "label": 2}]))
    assert (nli[0].text, nli[0].text_pair) == ("p", "h")
    # A JSON array under .json, integer labels naming --label-names (as datasets exports class labels).
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"question": "q", "sentence": "s", "label": 1}]))
    options = DataOptions(label_names=["entailment", "not_entailment"])
    assert read_classification(path, options=options)[0].label == "not_entailment"
    # A line separator inside a string is no newline.
    odd = read_classification(lines(tmp_path / "u.jsonl", ['{"text": "a\u2028b", "label": 0}',
                                                           '{"text": "c", "label": 1}']))
    assert [(e.text, e.where.rsplit(":", 1)[1]) for e in odd] == [("a\u2028b", "1"), ("c", "2")]
    csv = lines(tmp_path / "d.csv", ["Review,Stars", '"good, really",5', "bad,1"])
    options = DataOptions(text_column="Review", label_column="stars")  # names match case-insensitively
    assert [(e.text, e.label) for e in read_classification(csv, options=options)] == [("good, really", "5"),
                                                                                      ("bad", "1")]
    quoted = read_classification(lines(tmp_path / "q.csv", ["text,label", '"two', 'lines",1', "next,0"]))
    assert [(e.text, e.where) for e in quoted] == [("two\nlines", f"{tmp_path / 'q.csv'}:2"),
                                                   ("next", f"{tmp_path / 'q.csv'}:4")]
    with pytest.raises(DataError, match=r"d\.csv: cannot tell which columns hold the text \(columns: 'Review', "
                                        r"'Stars'\); set --text-column"):
        read_classification(csv)
    with pytest.raises(DataError, match=r"d\.csv: no column 'Rating' \(--label-column\); the columns are "
                                        r"'Review', 'Stars'"):
        read_classification(csv, options=DataOptions(text_column="review", label_column="Rating"))
    with pytest.raises(DataError, match=r"e\.tsv: cannot tell which column holds the label"):
        read_classification(lines(tmp_path / "e.tsv", ["sentence\tgrade", "x\t1"]))
    # Prediction reads files without labels.
    unlabelled = read_classification(lines(tmp_path / "test.tsv", ["index\tsentence", "0\tnice"]),
                                     options=DataOptions(labelled=False))
    assert (unlabelled[0].text, unlabelled[0].label) == ("nice", None)


def test_bad_rows_name_file_and_line_or_are_skipped(tmp_path):
    path = lines(tmp_path / "train.tsv", ["sentence\tlabel", "good\t1", "ragged", "bad\t0\textra", "ok\t0"])
    with pytest.raises(DataError, match=r"train\.tsv:3: 1 fields, but the header has 2 \(sentence, label\)"):
        read_classification(path)
    errors = RowErrors(skip=True)
    assert [e.text for e in read_classification(path, errors=errors)] == ["good", "ok"]
    report = errors.report()
    assert "skipped 2 bad row(s)" in report and f"{path}: 2, the first: {path}:3: 1 fields" in report
    with pytest.raises(DataError, match=r"e\.tsv:3: field 'label' is empty"):
        read_classification(lines(tmp_path / "e.tsv", ["sentence\tlabel", "good\t1", "unsure\t "]))
    with pytest.raises(DataError, match=r"r\.jsonl:1: field 'label' must be a number"):
        read_classification(jsonl(tmp_path / "r.jsonl", [{"text": "a", "label": "high"}]), regression=True)
    with pytest.raises(DataError, match=r"s\.jsonl:2: missing field 'sentence'"):
        read_classification(jsonl(tmp_path / "s.jsonl", [{"sentence": "a", "label": 0}, {"label": 1}]))
    with pytest.raises(DataError, match=r"i\.jsonl:1: label 3 is not an index into the 2 --label-names"):
        read_classification(jsonl(tmp_path / "i.jsonl", [{"text": "a", "label": 3}]),
                            options=DataOptions(label_names=["no", "yes"]))
    with pytest.raises(DataError, match="holds no examples"):
        read_classification(lines(tmp_path / "h.tsv", ["sentence\tlabel"]))
    with pytest.raises(DataError, match=r"l\.json: item 1: expected a JSON object, got int"):
        read_classification(lines(tmp_path / "l.json", ['[{"text": "a", "label": 0}, 7]']))


def test_an_unknown_label_at_eval_time_is_a_bad_row(tmp_path):
    task = make_task("classification")
    task.label_config(read_classification(jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "pos"},
                                                                       {"text": "b", "label": "neg"}])))
    evals = jsonl(tmp_path / "e.jsonl", [{"text": "c", "label": "pos"}, {"text": "d", "label": "meh"}])
    with pytest.raises(DataError, match=r"e\.jsonl:2: label 'meh' does not occur in the training data"):
        task.read(evals)
    task.errors = RowErrors(skip=True)
    assert [e.text for e in task.read(evals)] == ["c"] and sum(task.errors.skipped.values()) == 1
    fixed = make_task("classification", options=DataOptions(label_names=["0", "1"]))
    with pytest.raises(DataError, match=r"f\.tsv:2: label '2' does not occur in --label-names"):
        fixed.read(lines(tmp_path / "f.tsv", ["sentence\tlabel", "x\t2"]))


CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""


def test_conll_files(tmp_path):
    path = tmp_path / "eng.train"
    path.write_text(CONLL)
    assert detect_format(path) == "conll"
    examples = read_token_classification(path)
    assert [(e.tokens, e.tags, e.where) for e in examples] == [
        (["EU", "rejects", "German"], ["B-ORG", "O", "B-MISC"], f"{path}:3"),
        (["Peter", "Blackburn"], ["B-PER", "I-PER"], f"{path}:7")]
    tabbed = lines(tmp_path / "wnut.txt", ["@paul\tO", "New York\tB-loc", "", "hi\tO"])  # a token with a space
    assert read_token_classification(tabbed)[0].tokens == ["@paul", "New York"]
    ragged = lines(tmp_path / "bad.conll", ["EU NNP B-ORG", "rejects O", "", "Peter NNP B-PER", "Smith", "",
                                            "Ann NNP B-PER"])
    with pytest.raises(DataError, match=r"bad\.conll:2: 2 columns, but line 1 has 3 \(a ragged line\)"):
        read_token_classification(ragged)
    errors = RowErrors(skip=True)
    assert [e.tokens for e in read_token_classification(ragged, errors=errors)] == [["Ann"]]
    assert f"{ragged}: 2, the first: {ragged}:2: 2 columns" in errors.report()
    with pytest.raises(DataError, match=r"one\.conll:2: expected a token and its tag, got 'Smith'"):
        read_token_classification(lines(tmp_path / "one.conll", ["Peter B-PER", "Smith"]))


def test_token_jsonl_with_integer_tags(tmp_path):
    path = jsonl(tmp_path / "conll.jsonl", [{"id": "0", "tokens": ["Peter", "ran"], "ner_tags": [1, 0]}])
    examples = read_token_classification(path, DataOptions(label_names=["O", "B-PER", "I-PER"]))
    assert examples[0].tags == ["B-PER", "O"]
    with pytest.raises(DataError, match=r"conll\.jsonl:1: field 'ner_tags' must be a non-empty list of tag names "
                                        r"\(integer tags need --label-names\)"):
        read_token_classification(path)
    task = make_task("token-classification", options=DataOptions(label_names=["O", "B-PER", "I-PER"]))
    assert task.label_config(task.read(path))["id2label"] == {0: "O", 1: "B-PER", 2: "I-PER"}


def squad(path, qas, version="v2.0", context="Paris is the capital of France."):
    path.write_text(json.dumps({"version": version, "data": [{"title": "t", "paragraphs": [
        {"context": context, "qas": qas}]}]}))
    return path


def test_squad_files_v1_v2_and_flat(tmp_path):
    v1 = squad(tmp_path / "train-v1.1.json", [
        {"id": "a", "question": "capital?", "answers": [{"text": "Paris", "answer_start": 0},
                                                        {"text": "Paris", "answer_start": 0}]}], "1.1")
    assert detect_format(v1) == "squad"
    (e,) = read_question_answering(v1)
    assert (e.id, e.answer_text, e.answer_start, e.answers, e.impossible) == ("a", "Paris", 0, ["Paris"] * 2, False)
    v2 = squad(tmp_path / "dev-v2.0.json", [
        {"id": "b", "question": "of?", "answers": [{"text": "France", "answer_start": 24}], "is_impossible": False},
        {"id": "c", "question": "king?", "answers": [], "is_impossible": True,
         "plausible_answers": [{"text": "Paris", "answer_start": 0}]}])
    answerable, impossible = read_question_answering(v2)
    assert answerable.answers == ["France"] and impossible.impossible and impossible.answers == []
    flat = jsonl(tmp_path / "squad_v2.jsonl", [
        {"id": "d", "title": "t", "context": "in Rome", "question": "where?",
         "answers": {"text": ["Rome"], "answer_start": [3]}},
        {"id": "e", "title": "t", "context": "in Rome", "question": "who?",
         "answers": {"text": [], "answer_start": []}}])
    assert [(q.answer_text, q.impossible) for q in read_question_answering(flat)] == [("Rome", False), ("", True)]


def test_broken_squad_files(tmp_path):
    bad = squad(tmp_path / "bad.json", [
        {"id": "x1", "question": "q", "answers": [{"text": "Paris", "answer_start": 3}]},
        {"id": "x2", "question": "q", "answers": [{"text": "Paris", "answer_start": 0}], "is_impossible": True},
        {"id": "x3", "question": "q", "answers": [{"text": "Paris", "answer_start": 0}]}])
    with pytest.raises(DataError, match=r"bad\.json: question 'x1' \(data\[0\]\.paragraphs\[0\]\.qas\[0\]\): "
                                        r"the answer 'Paris' is not at character 3"):
        read_question_answering(bad)
    errors = RowErrors(skip=True)
    assert [q.id for q in read_question_answering(bad, errors=errors)] == ["x3"]
    assert errors.skipped[str(bad)] == 2 and "question 'x1'" in errors.first[str(bad)]
    with pytest.raises(DataError, match=r"question 'y' \(data\[0\]\.paragraphs\[0\]\.qas\[0\]\): is_impossible "
                                        r"is true but the question has 1 answer"):
        read_question_answering(squad(tmp_path / "c.json", [
            {"id": "y", "question": "q", "answers": [{"text": "Paris", "answer_start": 0}], "is_impossible": True}]))
    (tmp_path / "not-squad.json").write_text('{"data": 3}')
    with pytest.raises(DataError, match=r"not-squad\.json: expected a SQuAD file"):
        read_question_answering(tmp_path / "not-squad.json", DataOptions(format="squad"))
    with pytest.raises(DataError, match=r"t\.tsv: tsv is not a question-answering format"):
        read_question_answering(lines(tmp_path / "t.tsv", ["question\tcontext", "a\tb"]))

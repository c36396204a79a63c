"""The ``bertfast`` command: ``pretrain``, ``finetune``, ``glue``, ``predict``, ``tokenizer train``, ``bench`` and
``export``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from bertfast.bench import cli as bench_cli
from bertfast.io import CheckpointError, WriteError, write_error

PRETRAIN_EPILOG = """\
Options can also come from --config FILE (YAML or JSON; keys are the option names with - or _);
options given on the command line override the file.

The default run trains the tiny preset on the built-in corpus (CPython's reference manual, no
download) for a few minutes on a CPU and writes, in OUTPUT_DIR: metrics.jsonl (train and
"split": "eval" records), metrics.png, checkpoint-STEP/ directories (model in transformers'
format + tokenizer + trainer_state.pt) and final/ (the trained model and tokenizer).

Several processes: torchrun --nproc_per_node N -m bertfast pretrain ... trains with
DistributedDataParallel (NCCL on GPUs, gloo on CPU); each process reads its own share of the
batches and only rank 0 writes files.

OUTPUT_DIR holds one run: a second run there is refused unless --resume continues it or
--overwrite replaces it, and a run in progress holds a lock that stops any other.

Exit codes: 0 done (or stopped by SIGTERM after saving a checkpoint), 130 stopped by SIGINT
(Ctrl-C) after saving a checkpoint (a second Ctrl-C aborts at once), 1 stopped after too many
non-finite losses, a stalled process (--dist-timeout) or a failed write, 2 bad options or input.
Signals may go to the whole process group: DataLoader workers ignore them. Continue a stopped run
with --resume latest: options not given are the checkpoint's; --preset, --optimizer,
--weight-decay, the tokenizer and the corpus cannot change, --max-steps, --warmup-steps and --lr
are applied to a recomputed schedule (docs/pretraining.md: Stopping and resuming).
"""


def _training_parser(subparsers: Any, command: str) -> argparse.ArgumentParser:
    """``bertfast pretrain`` or ``finetune``: one flag per option of its config dataclass."""
    from bertfast.finetune.config import FinetuneConfig
    from bertfast.training.config import PretrainConfig, option_fields

    summary, description, epilog, config_class = {
        "pretrain": ("pretrain a BERT (MLM + NSP) on a corpus",
                     "Pretrain a BERT with masked-LM and next-sentence prediction.", PRETRAIN_EPILOG, PretrainConfig),
        "finetune": ("fine-tune a pretrained BERT on a classification, tagging, multiple-choice or QA task",
                     "Fine-tune a pretrained BERT (from bertfast pretrain, or a transformers BERT directory) "
                     "and evaluate it each epoch.", FINETUNE_EPILOG, FinetuneConfig),
    }[command]
    parser = subparsers.add_parser(command, help=summary, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_options(parser, option_fields(config_class))
    return parser


def _add_options(parser: argparse.ArgumentParser, options: list[tuple[str, Any, dict[str, Any]]]) -> None:
    """One flag per config field; unset flags stay out of the namespace so a --config file can set them."""
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of options")
    for name, default, meta in options:
        flag = "--" + name.replace("_", "-")
        shown = f" (default: {' '.join(default) if isinstance(default, list) else default})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS,
                                  "help": meta["help"] + (shown if default is not None else "")}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list) or meta.get("many"):
            kwargs.update(action="extend", nargs="+", metavar=meta.get("metavar", "PATH"))
        else:
            kwargs["type"] = type(default) if default is not None else str
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
            else:
                kwargs["metavar"] = meta.get("metavar") or {int: "N", float: "X"}.get(type(default), "PATH")
        parser.add_argument(flag, **kwargs)


FINETUNE_EPILOG = """\
Options can also come from --config FILE (YAML or JSON; keys are the option names with - or _);
options given on the command line override the file.

Data (--data-format auto tells the format from the file's name and content):
  classification            JSON lines (.jsonl), a JSON array, CSV or TSV with a header (TSV fields are
                            literal, as GLUE writes them; --column-names for a file without a header).
                            The columns are found by name as transformers' run_glue.py does: sentence;
                            sentence1/sentence2; premise/hypothesis; question/sentence; question1/question2;
                            text/text_pair; the label in label/labels/score/gold_label/... ; or set them with
                            --text-column, --text-pair-column, --label-column. Labels are names or integers
                            (stored in the model's config as id2label; --label-names fixes the set and order,
                            integer JSON labels then index it), or numbers with --regression
  token-classification      CoNLL files (token first, tag last on each line, a blank line between sentences,
                            -DOCSTART- skipped), or JSON lines {"tokens": [...], "tags" or "ner_tags": [...]}
                            (integer tags index --label-names)
  multiple-choice           JSON lines {"context": ..., "choices": [...], "label": index of the right choice}
  question-answering        SQuAD v1.1/v2.0 JSON, datasets' JSON lines {"question", "context", "answers":
                            {"text": [...], "answer_start": [...]}} (empty lists: unanswerable), or
                            {"question", "context", "answer": {"text": ..., "start": char offset}}
A bad row (a missing column, an unknown label in --eval, an answer not at its offset, a ragged CoNLL
line) is an error naming its file and line; --skip-bad-rows skips such rows and reports the count.

Metrics (each epoch, on --eval): classification accuracy, macro F1, Matthews correlation (and F1 of
label 1 with two labels); regression Pearson, Spearman, MSE; token classification span-level
precision/recall/F1 and word accuracy; multiple choice accuracy; question answering SQuAD v1.1 exact
match and F1, or with unanswerable questions SQuAD v2.0's exact, f1, HasAns_*, NoAns_* and best_exact/
best_f1 with their no-answer thresholds. The best epoch is chosen by accuracy, Pearson, span F1,
accuracy, F1 (v2.0: best_f1) respectively, or by --best-metric.

OUTPUT_DIR gets metrics.jsonl ("split": "train" and "eval" records), eval_results.json (the best
evaluation under transformers' names: eval_accuracy, eval_f1, eval_exact_match, ...), finetune_config.json,
best/ and last/ (the model in transformers' format plus tokenizer files: load with transformers'
AutoModelFor... or bertfast's classes; a v2.0 QA model's config carries its tuned
null_score_diff_threshold), and predictions.jsonl: the best model's prediction for each --eval example
next to its label. --eval-only --model OUTPUT_DIR/best evaluates a fine-tuned model on new data without
training; bertfast predict writes its predictions for unlabelled data. Several processes: torchrun
--nproc_per_node N -m bertfast finetune ... (each trains on its share of every epoch; the first
evaluates and writes). A step whose loss or gradient norm is not finite is skipped;
--max-nonfinite-steps in a row stop the run. A model with non-finite weights or evaluation scores is
never saved. Exit codes: 0 done, 1 stopped on non-finite values, 2 bad options or input.
"""


GLUE_EPILOG = """\
DATA_DIR is laid out as GLUE's download script writes it: CoLA/ SST-2/ MRPC/ STS-B/ QQP/ MNLI/ QNLI/
RTE/ WNLI/, each with train.tsv and dev.tsv (MNLI: dev_matched.tsv and dev_mismatched.tsv). Every task
present runs (or those of --tasks), from the same --model, into OUTPUT_DIR/TASK (a bertfast finetune run
directory: metrics.jsonl, eval_results.json, best/, last/). Defaults per task: 3 epochs (CoLA, MRPC,
STS-B, RTE, WNLI: 5), batch 32, lr 2e-5, seq-len 128, warmup 0.1; the options below override them for
every task, --set TASK.OPTION=VALUE (any bertfast finetune option) for one.

Metrics on each dev set: CoLA Matthews correlation; STS-B Pearson and Spearman; MRPC and QQP F1 and
accuracy; MNLI matched and mismatched accuracy; SST-2, QNLI, RTE, WNLI accuracy. A task's score is the
mean of its metrics, the GLUE score the mean of the task scores. OUTPUT_DIR gets glue_results.json
(per-task metrics, "average", "errors"), glue_results.md (a table) and glue_results.png (a bar chart).
A missing or malformed task folder is reported and the other tasks still run. OUTPUT_DIR is guarded as
bertfast finetune's: a run holds a lock on it (.bertfast.lock) that stops any other, and a directory that
holds a GLUE run is refused unless --overwrite replaces it. Exit codes: 0 every task scored, 2 a task
failed, bad options or an output directory refused.
"""


def _glue_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "glue", help="fine-tune and score every GLUE task of a download",
        description="Fine-tune a pretrained BERT on each GLUE task, score it on the dev set and average the "
                    "scores into the GLUE score.",
        epilog=GLUE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data-dir", required=True, metavar="DIR", help="the GLUE download (one folder per task)")
    parser.add_argument("--model", required=True, metavar="DIR", help="the pretrained model to fine-tune")
    parser.add_argument("--output-dir", default="runs/glue", metavar="DIR", help="where to write (default: runs/glue)")
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help="the tasks to run (default: every one present)")
    per_task = ("epochs", "batch-size", "lr", "warmup-ratio", "seq-len")
    for flag, kind in (("epochs", int), ("batch-size", int), ("grad-accum", int), ("lr", float),
                       ("warmup-ratio", float), ("weight-decay", float), ("seq-len", int), ("seed", int)):
        parser.add_argument(f"--{flag}", type=kind, default=argparse.SUPPRESS, metavar="N" if kind is int else "X",
                            help="as bertfast finetune, for every task (default: "
                                 + ("per task, below)" if flag in per_task else "bertfast finetune's)"))
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=argparse.SUPPRESS,
                        help="as bertfast finetune (default: auto)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=argparse.SUPPRESS,
                        help="as bertfast finetune (default: auto)")
    parser.add_argument("--skip-bad-rows", action="store_true", default=argparse.SUPPRESS,
                        help="skip rows that break their format (counted and reported per task)")
    parser.add_argument("--set", action="append", default=[], metavar="TASK.OPTION=VALUE",
                        help="an option for one task, e.g. --set RTE.epochs=10 (repeatable)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show a progress bar over tasks and epochs (default: true)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the GLUE run in OUTPUT_DIR (its results and task folders are deleted first); "
                             "without it a directory holding one is refused")
    return parser


def _run_glue(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from bertfast.finetune import DataError
    from bertfast.finetune.glue import find_task, markdown_table, run_glue
    from bertfast.training.rundir import RunDirectoryError

    shared = {k: v for k, v in vars(args).items()
              if k not in ("command", "data_dir", "model", "output_dir", "tasks", "set", "progress", "overwrite")}
    per_task: dict[str, dict[str, Any]] = {}
    try:
        for item in args.set:
            target, equals, value = item.partition("=")
            name, dot, option = target.partition(".")
            if not (equals and dot and option):
                raise ValueError(f"--set {item!r}: expected TASK.OPTION=VALUE")
            per_task.setdefault(find_task(name).name, {})[option] = value
        results = run_glue(args.data_dir, args.model, args.output_dir, args.tasks, shared, per_task, args.progress,
                           args.overwrite)
    except ValueError as e:
        if isinstance(e, (DataError, RunDirectoryError)):
            return _error("glue", e, 2)
        parser.error(str(e))
    print(markdown_table(results), end="")
    for name, error in results["errors"].items():
        print(f"bertfast glue: {name} failed: {error}", file=sys.stderr)
    return 2 if results["errors"] else 0


PREDICT_EPILOG = """\
The task, labels and (QA v2.0) no-answer threshold come from the model. INPUT is any format its task
reads (labels, if any, are ignored); OUTPUT gets one JSON line per example, with "where" (file:line):
  classification            "label" and "probabilities" (label -> probability); regression "score"
  token-classification      "tokens" and their "tags"
  multiple-choice           "choice" and "probabilities"
  question-answering        "id", "answer" and its "score" ("" when there is none, for a model trained
                            with unanswerable questions), "null_score_diff"; an OUTPUT ending in .json
                            is SQuAD's {id: answer} prediction file instead
OUTPUT is written atomically. An existing OUTPUT is refused unless --overwrite replaces it, and the
directory it goes to is locked (.bertfast.lock) while the predictions are made: a training run or
another prediction in progress there refuses this one. Exit codes: 0 done, 2 bad options or input,
or an OUTPUT refused.
"""


def _predict_parser(subparsers: Any) -> argparse.ArgumentParser:
    from bertfast.finetune.config import TASKS
    from bertfast.finetune.formats import FORMATS

    parser = subparsers.add_parser(
        "predict", help="predict with a fine-tuned model",
        description="Write a fine-tuned model's predictions for each example of a data file.",
        epilog=PREDICT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="a fine-tuned model, e.g. runs/finetune/best")
    parser.add_argument("--input", required=True, metavar="FILE", help="the examples")
    parser.add_argument("--output", required=True, metavar="FILE", help="where to write the predictions")
    parser.add_argument("--task", choices=TASKS, help="the model's task (default: from its config)")
    parser.add_argument("--data-format", choices=FORMATS, default="auto",
                        help="format of INPUT (default: auto, from its name and content)")
    parser.add_argument("--text-column", metavar="NAME", help="column of the text (default: inferred)")
    parser.add_argument("--text-pair-column", metavar="NAME", help="column of the second text of a pair")
    parser.add_argument("--column-names", nargs="+", metavar="NAME",
                        help="the columns of a CSV/TSV file without a header line, in order")
    parser.add_argument("--seq-len", type=int, default=128, metavar="N",
                        help="maximum sequence length in tokens (default: 128, at most the model's positions)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="examples per batch (default: 32)")
    parser.add_argument("--max-answer-length", type=int, default=30, metavar="N",
                        help="question answering: longest answer, in tokens (default: 30)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run (default: auto)")
    parser.add_argument("--skip-bad-rows", action="store_true", help="skip rows that break their format")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (without it, an "
                        "existing OUTPUT is refused)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show a progress bar (default: true)")
    return parser


def _run_predict(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from bertfast.finetune import DataError
    from bertfast.finetune.data import DataOptions
    from bertfast.finetune.predict import predict
    from bertfast.training.rundir import RunDirectoryError

    if args.seq_len < 8 or args.batch_size <= 0 or args.max_answer_length <= 0:
        parser.error("--seq-len must be at least 8, --batch-size and --max-answer-length positive")
    options = DataOptions(args.data_format, args.text_column, args.text_pair_column, None, args.column_names)
    try:
        records = predict(args.model, args.input, args.output, args.task, options, args.seq_len, args.batch_size,
                          args.max_answer_length, args.device, args.skip_bad_rows, args.progress, args.overwrite)
    except (DataError, FileNotFoundError, CheckpointError, RunDirectoryError) as e:
        return _error("predict", e, 2)
    print(f"wrote {len(records)} predictions to {args.output}")
    return 0


def _tokenizer_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("tokenizer", help="tokenizer tools")
    commands = parser.add_subparsers(dest="tokenizer_command", required=True)
    train = commands.add_parser(
        "train", help="train a WordPiece vocabulary",
        description="Train a BERT WordPiece vocabulary ([PAD]=0, [UNK], [CLS], [SEP], [MASK] first) and "
                    "write tokenizer.json, vocab.txt and transformers' tokenizer config to OUTPUT.",
    )
    train.add_argument("--corpus", action="extend", nargs="+", metavar="PATH",
                       help="corpus files, directories or globs, or 'builtin' (default: builtin)")
    train.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size (default: 8000)")
    train.add_argument("--min-frequency", type=int, default=2,
                       help="least count of a merged piece (default: 2)")
    train.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=True,
                       help="lowercase the text (default: true)")
    train.add_argument("--output", required=True, metavar="DIR", help="directory to write")
    return parser


def _run_training(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``bertfast pretrain`` and ``bertfast finetune``: options, then the run; errors become exit codes 2 and 1."""
    from bertfast.data import CorpusError
    from bertfast.finetune import DataError, FinetuneConfig, finetune
    from bertfast.training import PretrainConfig, load_config_file, pretrain
    from bertfast.training.distributed import DeviceError, DistributedStall
    from bertfast.training.guard import NonFiniteError
    from bertfast.training.resume import FINETUNE, PRETRAIN, resumed_options
    from bertfast.training.rundir import RunDirectoryError

    policy, config_class, run = {"pretrain": (PRETRAIN, PretrainConfig, pretrain),
                                 "finetune": (FINETUNE, FinetuneConfig, finetune)}[args.command]
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        values = load_config_file(args.config) if args.config else {}
    except (OSError, ValueError) as e:
        parser.error(str(e))
    try:
        config = config_class.from_dict(resumed_options(policy, config_class, {**values, **given}))
    except (FileNotFoundError, CheckpointError) as e:  # the checkpoint --resume names
        return _error(args.command, e, 2)
    except ValueError as e:
        parser.error(str(e))
    try:
        return run(config)
    except (CorpusError, DataError, FileNotFoundError, CheckpointError, RunDirectoryError, DeviceError) as e:
        return _error(args.command, e, 2)
    except (NonFiniteError, DistributedStall, WriteError) as e:
        return _error(args.command, e, 1)


def _error(command: str, error: BaseException, code: int) -> int:
    print(f"bertfast {command}: error: {error}", file=sys.stderr)
    return code


def _run_tokenizer_train(args: argparse.Namespace) -> int:
    from bertfast.data import CorpusStats, EmptyCorpusError, read_documents, resolve_paths, train_tokenizer

    stats = CorpusStats()
    try:
        paths = resolve_paths(args.corpus or ["builtin"])
        sentences = (s for doc in read_documents(paths, stats) for s in doc)
        tokenizer = train_tokenizer(sentences, args.vocab_size, lowercase=args.lowercase,
                                    min_frequency=args.min_frequency)
        if stats.sentences == 0:
            raise EmptyCorpusError(f"the corpus yields no text ({stats.summary()})")
    except (EmptyCorpusError, FileNotFoundError) as e:
        print(f"bertfast tokenizer train: error: {e}", file=sys.stderr)
        return 2
    try:
        tokenizer.save(args.output)
    except OSError as e:  # a WriteError names the file; a directory that cannot be made is named here
        print(f"bertfast tokenizer train: error: {e if isinstance(e, WriteError) else write_error(args.output, e)}",
              file=sys.stderr)
        return 1
    print(f"corpus: {stats.summary()}")
    print(f"wrote a {tokenizer.vocab_size}-token WordPiece vocabulary to {args.output} "
          "(tokenizer.json, vocab.txt)")
    return 0


EXPORT_EPILOG = """\
The package runs the model's inference forward (bertfast's packed encoder, compiled ahead of time by
AOTInductor for this machine's CPU) with no bertfast model code: it takes int64 (batch, seq_len) tensors
input_ids, attention_mask and token_type_ids, any batch size and 1 <= seq_len <= --max-tokens (ragged batches
are packed inside), and returns last_hidden_state and pooler_output (a base model or a pretraining checkpoint),
or logits (a BertForSequenceClassification checkpoint). To run it:

  import bertfast.export                 # torch and this module only, none of bertfast's model code
  runner = bertfast.export.load("model.pt2")
  out = runner(input_ids, attention_mask, token_type_ids)   # {"last_hidden_state": ..., ...}

or with torch alone: torch.ops.load_library(path of bertfast/_C.so), then
torch._inductor.aoti_load_package("model.pt2"). Compiling takes about a minute for a small model.

Exit codes: 0 written, 2 bad options or a model that cannot be exported.
"""


def _export_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export", help="compile a model into one .pt2 package (torch.export + AOTInductor)",
        description="Compile a BERT checkpoint's inference forward into an AOTInductor package that runs "
                    "without bertfast's model code.",
        epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="a BERT checkpoint directory (config.json + weights); its architectures entry "
                             "picks the task: BertForSequenceClassification exports the classifier, anything "
                             "else the encoder (BertModel)")
    parser.add_argument("--output", required=True, metavar="FILE", help="the package to write, e.g. model.pt2")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="weights and activations (default: fp32; bf16 needs AVX512-BF16 or AMX)")
    parser.add_argument("--max-tokens", type=int, metavar="N",
                        help="the longest sequence the package takes (default: the model's "
                             "max_position_embeddings)")
    return parser


def _run_export(args: argparse.Namespace) -> int:
    from bertfast.export import ExportError, export_checkpoint

    try:
        path = export_checkpoint(args.model, args.output, precision=args.precision, max_tokens=args.max_tokens)
    except (ExportError, CheckpointError) as e:
        print(f"bertfast export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``bertfast`` parser with every command's (the CLI reference in docs/ is generated from it)."""
    parser = argparse.ArgumentParser(prog="bertfast", description="bertfast command-line tools")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _training_parser(subparsers, "pretrain")
    _training_parser(subparsers, "finetune")
    _glue_parser(subparsers)
    _predict_parser(subparsers)
    _tokenizer_parser(subparsers)
    bench_cli.add_parser(subparsers)
    _export_parser(subparsers)
    return parser


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-parser of each command of ``parser``, by name, in the order they were added."""
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = commands(parser).get(args.command)
    if args.command in ("pretrain", "finetune"):
        return _run_training(args, command)
    if args.command == "glue":
        return _run_glue(args, command)
    if args.command == "predict":
        return _run_predict(args, command)
    if args.command == "export":
        return _run_export(args)
    if args.command == "bench":
        try:
            return bench_cli.run(args)
        except ValueError as e:
            print(f"bertfast bench: error: {e}", file=sys.stderr)
            return 2
    return _run_tokenizer_train(args)

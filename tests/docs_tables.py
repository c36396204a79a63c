"""The tables of docs/ that come from the code: generated here, never typed.

Each generated table sits in its page between two markers::

    <!-- generated:NAME -->
    ...
    <!-- /generated:NAME -->

``tests/test_docs.py`` fails when what is between the markers differs from what the code gives today;
``python tests/docs_tables.py`` rewrites every generated table in place (then review the diff).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _cell(text: str) -> str:
    """Text for one Markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def families() -> str:
    """The drop-in's registry, ``bertfast.dropin.FAMILIES``."""
    from bertfast.dropin import FAMILIES

    rows = []
    for model_type, family in FAMILIES.items():
        encoder = family.encoder
        if encoder is None:
            tree = "BERT's (`bertfast.modules`)"
        else:
            tree = f"`{encoder.__name__}`"
        checks = [f"`{name}`" for name in ("unsupported", "fallback")
                  if encoder is not None and hasattr(encoder, name)]
        positions = "after `padding_idx` (RoBERTa's)" if family.positions_after_padding else "from 0"
        rows.append((f"`{model_type}`", f"`{family.base_class}`", f"`{family.layer_class}`", tree, positions,
                     ", ".join(checks) or "BERT's"))
    return _table(("`model_type`", "base class (and every head)", "layer class", "module tree", "position ids",
                   "refusal / fallback checks"), rows)


def ops() -> str:
    """The front ops, ``bertfast.ops.dispatch.OPS``, and the backends registered for each on this build."""
    import bertfast.ops
    from bertfast.ops import dispatch

    rows = []
    for op in dispatch.OPS:
        summary = (getattr(bertfast.ops, op).__doc__ or "").strip().splitlines()[0]
        backends = ", ".join(f"`{b}`" for b in dispatch.backends_of(op)) or "none yet"
        rows.append((f"`bertfast.ops.{op}`", summary, backends))
    return _table(("front function", "computes", "backends besides the reference (`torch`)"), rows)


def _flags(names: tuple[str, ...]) -> list[str]:
    return [f"`--{n.replace('_', '-')}`" for n in names]


def resume_policy(command: str) -> str:
    """What ``--resume`` does with an option given again: ``bertfast.training.resume.PRETRAIN`` / ``FINETUNE``."""
    from bertfast.training import resume

    policy = {"pretrain": resume.PRETRAIN, "finetune": resume.FINETUNE}[command]
    processes = ["the number of processes"]
    fixed = _flags(policy.fixed) + (processes if policy.processes_fixed else [])
    warned = _flags(policy.warned) + ([] if policy.processes_fixed else processes)
    rows = [(", ".join(fixed), "refused with exit code 2 before any work, naming each option with both values"),
            (", ".join(_flags(policy.applied)), "applied and logged")]
    if warned:
        rows.append((", ".join(warned),
                     "applied with a warning: the run goes on, but its data stream is not the original run's"))
    return _table(("options", "given again with another value on `--resume`"), rows)


def _invocation(action: argparse.Action) -> str:
    if not action.option_strings:
        return action.metavar or action.dest
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    if action.choices is not None and action.metavar is None:
        argument = "{" + ",".join(str(c) for c in action.choices) + "}"
    else:
        argument = action.metavar or action.dest.upper()
    if action.nargs in ("+", "*"):
        argument = f"{argument} [{argument} ...]"
    return f"{', '.join(action.option_strings)} {argument}"


def _text(text: str) -> str:
    """Help text as Markdown shows it literally: ``<device>`` is not an HTML tag, ``*`` not emphasis."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace("*", "\\*")


def _parser_section(title: str, parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        help_text = _text(action.help or "")
        if action.required and action.option_strings:
            help_text += " (required)"
        rows.append((f"`{_invocation(action)}`", help_text))
    lines = [f"## {title}", "", _cell(_text(parser.description or "")), ""]
    if rows:
        lines.append(_table(("option", "meaning"), rows))
    return lines


def cli() -> str:
    """Every command's options, from ``bertfast.cli.build_parser``."""
    from bertfast.cli import build_parser, commands

    lines: list[str] = []
    for name, parser in commands(build_parser()).items():
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            for sub, subparser in nested[0].choices.items():
                lines += _parser_section(f"bertfast {name} {sub}", subparser) + [""]
        else:
            lines += _parser_section(f"bertfast {name}", parser) + [""]
    return "\n".join(lines).rstrip()


# (page, table name) -> generator
GENERATED: dict[tuple[str, str], Callable[[], str]] = {
    ("dropin.md", "families"): families,
    ("backends.md", "ops"): ops,
    ("pretraining.md", "resume-policy"): lambda: resume_policy("pretrain"),
    ("finetuning.md", "resume-policy"): lambda: resume_policy("finetune"),
    ("reference/cli.md", "cli"): cli,
}


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- generated:{re.escape(name)} -->\n)(.*?)(<!-- /generated:{re.escape(name)} -->)",
                      re.DOTALL)


def current(page: str, name: str) -> str:
    """What the page holds between the table's markers (AssertionError when the markers are missing)."""
    match = _pattern(name).search((DOCS / page).read_text(encoding="utf-8"))
    assert match is not None, f"docs/{page} has no <!-- generated:{name} --> ... <!-- /generated:{name} --> block"
    return match.group(2).strip()


def write(page: str, name: str, table: str) -> bool:
    """Put ``table`` between the markers; whether the page changed."""
    path = DOCS / page
    text = path.read_text(encoding="utf-8")
    updated = _pattern(name).sub(lambda m: f"{m.group(1)}\n{table}\n\n{m.group(3)}", text, count=1)
    if updated != text:
        path.write_text(updated, encoding="utf-8")
    return updated != text


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    for (page, name), generate in GENERATED.items():
        if write(page, name, generate()):
            print(f"docs/{page}: {name} updated")

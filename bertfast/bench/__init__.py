"""bertfast's benchmark suite: ``bertfast bench [FAMILY ...]``.

Each family (``bertfast.bench.families``) lists groups of cases, each a kernel at one shape with
its named baselines; ``bertfast.bench.suite`` times them, ``bertfast.bench.report`` writes the run's
JSON, a Markdown report and a plot per family, and compares runs.
"""

FAMILIES = ("layernorm-family", "attention", "mlm-head", "model", "pretrain", "inference", "st-train")

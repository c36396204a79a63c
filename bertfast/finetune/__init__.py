"""Fine-tuning a pretrained BERT: data readers, the four tasks, the training loop behind ``bertfast finetune``.

Also ``bertfast glue`` (:mod:`bertfast.finetune.glue`) and ``bertfast predict`` (:mod:`bertfast.finetune.predict`).
"""

from __future__ import annotations

from bertfast._lazy import lazy_exports

# Public names and their modules, imported on first use: the command line reads the options
# (bertfast.finetune.config) without loading torch or the models.
_EXPORTS = {
    "TASKS": "bertfast.finetune.config",
    "FinetuneConfig": "bertfast.finetune.config",
    "DataError": "bertfast.finetune.data",
    "DataOptions": "bertfast.finetune.data",
    "RowErrors": "bertfast.finetune.data",
    "make_task": "bertfast.finetune.tasks",
    "Finetuner": "bertfast.finetune.trainer",
    "finetune": "bertfast.finetune.trainer",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)

"""Fine-tuning a pretrained BERT: data readers, the four tasks, the training loop behind ``bertfast finetune``.

Also ``bertfast glue`` (:mod:`bertfast.finetune.glue`) and ``bertfast predict`` (:mod:`bertfast.finetune.predict`).
"""

from bertfast.finetune.config import FinetuneConfig
from bertfast.finetune.data import DataError, DataOptions, RowErrors
from bertfast.finetune.tasks import TASKS, make_task
from bertfast.finetune.trainer import Finetuner, finetune

__all__ = ["TASKS", "DataError", "DataOptions", "FinetuneConfig", "Finetuner", "RowErrors", "finetune", "make_task"]

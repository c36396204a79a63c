"""bertfast: a BERT engine for PyTorch whose hot paths are fused kernels.

The model classes carry transformers' names, constructors and outputs, so that
switching ``from transformers import BertModel`` to ``from bertfast import
BertModel`` is the whole migration.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names and the modules that define them; imported on first use so that
# ``import bertfast.ops`` (or the kernels) does not pull in every model.
_EXPORTS = {
    "BertConfig": "bertfast.config",
    "BertModel": "bertfast.models",
    "BertPreTrainedModel": "bertfast.models",
    "BertForPreTraining": "bertfast.models",
    "BertForMaskedLM": "bertfast.models",
    "BertForNextSentencePrediction": "bertfast.models",
    "BertForSequenceClassification": "bertfast.models",
    "BertForTokenClassification": "bertfast.models",
    "BertForQuestionAnswering": "bertfast.models",
    "BertForMultipleChoice": "bertfast.models",
    "from_transformers": "bertfast.models",
    "accelerate": "bertfast.dropin",
    "for_cpu_inference": "bertfast.inference",
    "patch_transformers": "bertfast.dropin",
    "unpatch_transformers": "bertfast.dropin",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bertfast' has no attribute {name!r}")

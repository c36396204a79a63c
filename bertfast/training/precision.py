"""The compute precision of a training run: one resolution of ``--precision`` for pretraining and fine-tuning."""

from __future__ import annotations

import torch

AMP_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(choice: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    """(precision name, autocast dtype or None for fp32); ``auto`` is bf16 on a GPU that has it, else fp32."""
    if choice == "auto":
        choice = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if choice not in AMP_DTYPES:
        raise ValueError(f"precision must be one of auto, {', '.join(AMP_DTYPES)}, got {choice!r}")
    return choice, AMP_DTYPES[choice]

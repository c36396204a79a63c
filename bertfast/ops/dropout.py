"""The dropout seed and keep rule shared by every backend (the policy is described in ``bertfast.ops``)."""

from __future__ import annotations

import torch
from torch import Tensor

SEED_BITS = 62  # seeds are drawn in [0, 2**62): any backend's integer type holds them


def draw_seed(device: torch.device) -> Tensor:
    """One dropout seed, a 0-dim int64 tensor drawn from torch's generator of ``device`` and kept there.

    Called in the (traced) op wrappers: ``torch.compile`` records the draw, checkpointing replays it
    (it restores the generator's state), and no host sync happens, so CUDA graphs can capture it.
    """
    return torch.randint(0, 2**SEED_BITS, (), device=device, dtype=torch.int64)


def check_probability(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


def scale(p: float) -> float:
    """What kept values are multiplied by; p == 1 drops everything (like F.dropout)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)

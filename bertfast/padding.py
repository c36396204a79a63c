"""Turning a padded batch into packed tokens once, and back at the API boundary.

The encoder never sees padding: the attention mask becomes a list of kept token
indices plus ``cu_seqlens`` (the offsets of each sequence among the packed
tokens), and every layer runs on ``(total_tokens, hidden)`` tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Packing:
    """Where the kept tokens of a (batch, seqlen) batch live among the packed tokens."""

    indices: Tensor  # (T,) int64 positions in the flattened (batch * seqlen) batch
    cu_seqlens: Tensor  # (batch + 1,) int32 offsets of each sequence among the T tokens
    max_seqlen: int  # longest sequence, in tokens
    batch: int
    seqlen: int

    @property
    def total(self) -> int:
        return self.indices.numel()

    @classmethod
    def from_mask(cls, attention_mask: Tensor) -> Packing:
        """Pack the positions where ``attention_mask`` (batch, seqlen) is nonzero."""
        batch, seqlen = attention_mask.shape
        keep = attention_mask.bool()
        lengths = keep.sum(dim=1, dtype=torch.int32)
        cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32, device=attention_mask.device)
        cu_seqlens[1:] = torch.cumsum(lengths, 0)
        indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
        max_seqlen = int(lengths.max()) if batch else 0
        return cls(indices, cu_seqlens, max_seqlen, batch, seqlen)

    def pack(self, x: Tensor) -> Tensor:
        """(batch, seqlen, ...) -> (T, ...), keeping only real tokens."""
        return x.reshape(self.batch * self.seqlen, *x.shape[2:]).index_select(0, self.indices)

    def unpack(self, x: Tensor, fill: float = 0.0) -> Tensor:
        """(T, ...) -> (batch, seqlen, ...), with ``fill`` at padded positions."""
        out = x.new_full((self.batch * self.seqlen, *x.shape[1:]), fill)
        out = out.index_copy(0, self.indices, x)
        return out.view(self.batch, self.seqlen, *x.shape[1:])

    def first_token_rows(self) -> Tensor:
        """Row in the packed tokens of each sequence's first kept token (its [CLS]); empty rows clamp."""
        starts = self.cu_seqlens[:-1].long()
        return starts.clamp(max=max(self.total - 1, 0))

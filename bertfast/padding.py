"""Turning a padded batch into packed tokens once, and back at the API boundary.

The encoder never sees padding: the attention mask becomes a list of kept token
indices plus ``cu_seqlens`` (the offsets of each sequence among the packed
tokens), and every layer runs on ``(total_tokens, hidden)`` tensors.

Packing costs no host synchronisation of its own: ``max_seqlen`` is the padded
width, an upper bound that every attention backend accepts, rather than the
longest real length (which would have to be read back from the device). Under
``torch.compile`` the packed token count is an unbacked symbolic size: it comes
from :func:`kept_positions`, a custom op whose output length is declared
data-dependent, so the compiler traces through packing without a graph break and
without ``capture_dynamic_output_shape_ops``; nothing here branches on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.library.custom_op("bertfast::kept_positions", mutates_args=())
def kept_positions(keep: Tensor) -> Tensor:
    """Flat int64 indices of the True entries of a bool tensor (``torch.nonzero`` of it, flattened)."""
    return torch.nonzero(keep.flatten(), as_tuple=False).flatten()


@kept_positions.register_fake
def _kept_positions_fake(keep: Tensor) -> Tensor:
    ctx = torch.library.get_ctx()
    bound = keep.numel() if isinstance(keep.numel(), int) else None  # a symbolic size cannot bound a range
    shape_env = getattr(ctx, "_shape_env", None)
    if shape_env is not None and not shape_env.allow_dynamic_output_shape_ops:
        # torch.compile without fullgraph=True refuses data-dependent sizes by default and would break
        # the graph here. The count is a bounded size, so it is made directly, as torch's own
        # device-mesh ops do, and packing stays inside the graph either way.
        from torch.fx.experimental.symbolic_shapes import _constrain_range_for_size

        count = shape_env.create_unbacked_symint()
        _constrain_range_for_size(count, min=0, max=bound)
    else:
        count = ctx.new_dynamic_size(min=0, max=bound)
    return keep.new_empty(count, dtype=torch.int64)


@dataclass(frozen=True)
class Packing:
    """Where the kept tokens of a (batch, seqlen) batch live among the packed tokens."""

    indices: Tensor | None  # (T,) int64 positions in the flattened batch; None = every position is kept
    cu_seqlens: Tensor  # (batch + 1,) int32 offsets of each sequence among the T tokens
    lengths: Tensor  # (batch,) int32 real tokens per sequence
    max_seqlen: int  # an upper bound of the longest sequence: the padded width
    batch: int
    seqlen: int

    @property
    def total(self) -> int:
        return self.batch * self.seqlen if self.indices is None else self.indices.numel()

    @classmethod
    def from_mask(cls, attention_mask: Tensor | None, shape: tuple[int, int] | None = None,
                  device: torch.device | None = None) -> Packing:
        """Pack the positions where ``attention_mask`` (batch, seqlen) is nonzero.

        With no mask (pass ``shape`` and ``device``) every position is kept and packing is a reshape.
        """
        if attention_mask is None:
            batch, seqlen = shape
            lengths = torch.full((batch,), seqlen, dtype=torch.int32, device=device)
            return cls(None, _offsets(lengths), lengths, seqlen, batch, seqlen)
        batch, seqlen = attention_mask.shape
        keep = attention_mask.bool()
        lengths = keep.sum(dim=1, dtype=torch.int32)
        indices = kept_positions(keep)
        return cls(indices, _offsets(lengths), lengths, seqlen, batch, seqlen)

    def pack(self, x: Tensor) -> Tensor:
        """(batch, seqlen, ...) -> (T, ...), keeping only real tokens."""
        flat = x.reshape(self.batch * self.seqlen, *x.shape[2:])
        return flat if self.indices is None else flat.index_select(0, self.indices)

    def unpack(self, x: Tensor, fill: float = 0.0) -> Tensor:
        """(T, ...) -> (batch, seqlen, ...), with ``fill`` at padded positions."""
        if self.indices is None:
            return x.view(self.batch, self.seqlen, *x.shape[1:])
        out = x.new_full((self.batch * self.seqlen, *x.shape[1:]), fill)
        out = out.index_copy(0, self.indices, x)
        return out.view(self.batch, self.seqlen, *x.shape[1:])

    def first_token_rows(self) -> Tensor:
        """(batch,) row among the packed tokens of each sequence's first kept token (its [CLS]).

        An empty sequence gets the row ``T``, one past the end: :func:`gather_rows` reads zeros there.
        """
        starts = self.cu_seqlens[:-1].long()
        return torch.where(self.lengths > 0, starts, self.cu_seqlens[-1].long())


def _offsets(lengths: Tensor) -> Tensor:
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def gather_rows(x: Tensor, rows: Tensor) -> Tensor:
    """``x[rows]`` where ``rows`` may be ``len(x)``, which reads a row of zeros (no branch on sizes)."""
    return torch.cat([x, x.new_zeros(1, *x.shape[1:])]).index_select(0, rows)

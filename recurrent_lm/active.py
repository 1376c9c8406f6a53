"""The positions still running at a core step, packed, so that a position that has exited costs nothing more.

Once adaptive exit has stopped some positions, a core step runs on the others only: their states are gathered
into one packed sequence (1, N, d), the linear layers, norms and MLPs run on those N tokens, and attention puts
each packed query back in its own batch row (a (batch, width, ...) layout, width = the most positions any row still
runs) to attend over that row's keys. Keys and values of the positions that exited are their latest computed ones:
the cache keeps them (recurrent_lm.cache), which is the same KV sharing a later token meets when it reads an
earlier token that exited. Gathering and scattering cost a copy of the running rows, far less than a block on
them (../notes measured 0.4-1 ms against hundreds on a 2-core CPU).
"""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ActiveSet:
    """Which of a forward call's (batch, seq) positions run this step: (batch[n], position[n]) for packed index n,
    in row-major order (so causal order within a row), and slot[n], n's place among its row's running positions."""

    batch: Tensor  # (N,) row of each running position
    position: Tensor  # (N,) its index among the call's positions
    slot: Tensor  # (N,) its index among its row's running positions
    width: int  # the most positions any row runs
    rows: int  # the batch size
    seq: int  # the call's positions per row
    mask: Tensor  # (rows, 1, width, keys) bool SDPA mask of the queries laid out by row: True = may attend

    @classmethod
    def of(cls, running: Tensor, mask: Tensor | None, past_len: int) -> "ActiveSet":
        """The positions where `running` (batch, seq) is True, with the call's attention mask (None: plain causal
        over past_len cached tokens and the call's own)."""
        rows, seq = running.shape
        batch, position = running.nonzero(as_tuple=True)
        counts = running.sum(1)
        starts = counts.cumsum(0) - counts
        slot = torch.arange(len(batch), device=running.device) - starts[batch]
        if mask is None:
            keys = torch.arange(past_len + seq, device=running.device)
            allowed = keys[None, :] <= past_len + position[:, None]  # (N, keys)
        else:
            allowed = mask.expand(rows, -1, -1, -1)[batch, 0, position]  # a mask shared by the rows has batch 1
        width = int(counts.max())
        laid_out = allowed.new_ones((rows * width,) + allowed.shape[1:])  # an empty slot may see every key (no NaN)
        laid_out[batch * width + slot] = allowed
        return cls(batch, position, slot, width, rows, seq, laid_out.view(rows, 1, width, -1))

    def __len__(self) -> int:
        return len(self.batch)

    def pack(self, x: Tensor | None) -> Tensor | None:
        """(batch, seq, ...) -> (1, N, ...): the running positions as one sequence. None stays None."""
        return None if x is None else x[self.batch, self.position][None]

    def pack_rope(self, rope: Tensor | None) -> Tensor | None:
        """The rotary angles (batch, 1, seq, ...) of the running positions, shaped for a packed sequence."""
        return None if rope is None else rope[self.batch, 0, self.position][None, None]

    def scatter(self, full: Tensor, packed: Tensor) -> Tensor:
        """`full` (batch, seq, ...) with the running positions replaced by `packed` (1, N, ...) (out of place, so
        that autograd and the caller's earlier states are left alone)."""
        return full.index_put((self.batch, self.position), packed[0])

    def spread(self, packed: Tensor, fill) -> Tensor:
        """(1, N) -> (batch, seq): the running positions' values in place, `fill` everywhere else."""
        return torch.full((self.rows, self.seq), fill, dtype=packed.dtype, device=packed.device).index_put(
            (self.batch, self.position), packed[0])

    def to_rows(self, packed: Tensor) -> Tensor:
        """(N, ...) -> (rows, width, ...): each running position in its row, zeros in the empty slots."""
        laid_out = packed.new_zeros((self.rows * self.width,) + packed.shape[1:])
        laid_out[self.batch * self.width + self.slot] = packed
        return laid_out.view(self.rows, self.width, *packed.shape[1:])

    def from_rows(self, laid_out: Tensor) -> Tensor:
        """(rows, width, ...) -> (N, ...): the inverse of to_rows."""
        return laid_out.flatten(0, 1)[self.batch * self.width + self.slot]

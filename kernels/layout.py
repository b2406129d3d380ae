"""Host-side facts about a steer bank that the gather kernel's launch shape depends on, known when
the bank is built (from its entries, no device read) so that a step never synchronises."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class GatherLayout:
    """num_steers: N (rows of `cols`); max_cols: the largest K*r of a steer (columns of `down` one
    steer spans); max_dims: the largest K; start_align: the largest power of two up to 16 dividing
    every steer's down_start (how far its columns are aligned); dense: some steer is stored dense
    (up_start = -1, only off CUDA)."""

    num_steers: int
    max_cols: int
    max_dims: int
    start_align: int
    dense: bool

    @classmethod
    def of(cls, cols: Iterable[Iterable[int]]) -> GatherLayout:
        """From the rows (down_start, K, r, up_start) of a bank's `cols`, as host integers."""
        rows = [tuple(int(x) for x in row) for row in cols]
        return cls(num_steers=len(rows), max_cols=max((k * r for _, k, r, _ in rows), default=0),
                   max_dims=max((k for _, k, _, _ in rows), default=0),
                   start_align=pow2_divisor(*(down_start for down_start, *_ in rows)),
                   dense=any(up_start < 0 for *_, up_start in rows))


def pow2_divisor(*xs: int, cap: int = 16) -> int:
    """The largest power of two up to `cap` that divides every x."""
    align = cap
    while align > 1 and any(x % align for x in xs):
        align //= 2
    return align

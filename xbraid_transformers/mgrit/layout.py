"""Which process of a distributed solve owns which steps on every level of the hierarchy.

The processes of a solve are numbered by *position* in solve order (the adjoint runs the ranks
backwards). Position i owns the fine steps ``fine_ranges[i] = [lo, hi)``: any contiguous split of
``0..num_steps`` in solve order, one step per process at the least. A step of level l covers
``spacing_l`` fine steps and is evaluated where its data lives: by the owner of one fine step of
its interval, the ``anchor`` (``"first"``: the interval's first fine step; ``"last"``: its last,
which is what the adjoint of a forward solve anchored at ``"first"`` needs, since its steps run
backwards through the same intervals). So every level is split into contiguous ranges of steps,
one per position, empty on the positions that own no anchor of that level: a coarse level lives
on the processes that own its points, however few, and the coarsest level may have fewer points
than there are processes.

Level l has ``num_steps // spacing_l`` steps; fine steps after the last whole interval are
F-points of every level they belong to. Point p > 0 of a level is *produced* (computed and held
authoritatively) by the owner of step p - 1; point 0, the initial value, by position 0. A
position with steps ``[a, b)`` of a level holds its points ``a..b``: point a is a copy of the
previous active position's last point (the ghost), refreshed before it is read.
"""
from __future__ import annotations

import bisect
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

__all__ = ["StepRange", "Layout", "layout", "mirrored"]

StepRange = Tuple[int, int]


class Layout:
    """Step ranges of every position on every level (``ranges[l][i] = (a, b)``)."""

    def __init__(self, num_steps: int, fine_ranges: Sequence[StepRange], cfactors: Sequence[int],
                 anchor: str = "first"):
        if anchor not in ("first", "last"):
            raise ValueError(f"anchor must be 'first' or 'last', got {anchor!r}")
        fine_ranges = [tuple(int(v) for v in b) for b in fine_ranges]
        lo = 0
        for a, b in fine_ranges:
            if a != lo or b <= a:
                raise ValueError(f"the fine step ranges {fine_ranges} must split 0..{num_steps} into contiguous, "
                                 "non-empty ranges in solve order")
            lo = b
        if lo != num_steps:
            raise ValueError(f"the fine step ranges {fine_ranges} must end at {num_steps}")
        self.num_steps, self.fine_ranges, self.anchor = num_steps, fine_ranges, anchor
        self.cfactors = tuple(cfactors)
        self.counts: List[int] = []      # steps per level: a last partial interval is F-points
        self.ranges: List[List[StepRange]] = []
        self._active: List[List[int]] = []
        self._starts: List[List[int]] = []
        spacing = 1
        for l in range(len(self.cfactors) + 1):
            count = num_steps // spacing
            self.counts.append(count)
            ranges = [(min(self._first_step(lo, spacing), count), min(self._first_step(hi, spacing), count))
                      for lo, hi in fine_ranges]
            self.ranges.append(ranges)
            active = [i for i, (a, b) in enumerate(ranges) if b > a]
            self._active.append(active)
            self._starts.append([ranges[i][0] for i in active])
            if l < len(self.cfactors):
                spacing *= self.cfactors[l]

    def _first_step(self, fine: int, spacing: int) -> int:
        """The first step of a level (of this spacing) anchored at fine step ``fine`` or later."""
        if self.anchor == "first":
            return -(-fine // spacing)
        return fine // spacing      # anchored at the last fine step (j + 1) * spacing - 1

    @property
    def size(self) -> int:
        return len(self.fine_ranges)

    def steps(self, level: int, position: int) -> StepRange:
        return self.ranges[level][position]

    def owner(self, level: int, step: int) -> int:
        """The position that evaluates step ``step`` of ``level``."""
        starts = self._starts[level]
        return self._active[level][bisect.bisect_right(starts, step) - 1]

    def producer(self, level: int, point: int) -> int:
        """The position that computes point ``point`` of ``level`` (position 0 for point 0)."""
        return 0 if point == 0 else self.owner(level, point - 1)

    def previous(self, level: int, position: int) -> Optional[int]:
        """The active position before ``position`` on ``level`` (None for the first)."""
        active = self._active[level]
        i = bisect.bisect_left(active, position)
        return active[i - 1] if i > 0 else None

    def next(self, level: int, position: int) -> Optional[int]:
        active = self._active[level]
        i = bisect.bisect_right(active, position)
        return active[i] if i < len(active) else None

    def active(self, level: int) -> List[int]:
        """The positions that own steps of ``level``, in solve order."""
        return list(self._active[level])


@lru_cache(maxsize=256)
def _cached(num_steps: int, fine_ranges: Tuple[StepRange, ...], cfactors: Tuple[int, ...], anchor: str) -> Layout:
    return Layout(num_steps, fine_ranges, cfactors, anchor)


def layout(num_steps: int, fine_ranges: Sequence[StepRange], cfactors: Sequence[int],
           anchor: str = "first") -> Layout:
    """A ``Layout``, built once per distinct argument set (solves repeat them every call)."""
    return _cached(num_steps, tuple(tuple(b) for b in fine_ranges), tuple(cfactors), anchor)


def mirrored(num_steps: int, fine_ranges: Sequence[StepRange]) -> List[StepRange]:
    """The fine step ranges in the reversed solve order (the adjoint's): position i becomes size - 1 - i."""
    return [(num_steps - hi, num_steps - lo) for lo, hi in reversed(list(fine_ranges))]

"""The levels of an MGRIT solve held by one process, and the sweeps on one level: relaxation
and sequential propagation, with the ghost exchanges they need (``mgrit.layout``)."""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from .comm import Communicator
from .config import MGRITConfig
from .layout import Layout

__all__ = ["Step", "Level", "LevelSweeps"]

Step = Callable[[torch.Tensor, int, float], torch.Tensor]


class Level:
    """The points ``a..b`` of one level held by this process (``a``: the ghost), its steps
    ``[a, b)``; ``a == b`` on a level where this process owns no step."""

    def __init__(self, index: int, spacing: int, dt: float, steps, cfactor: Optional[int], sweeps: int):
        self.index, self.spacing, self.dt = index, spacing, dt
        self.a, self.b = steps
        self.m = cfactor  # None on the coarsest level
        self.sweeps = sweeps
        self.u: List[torch.Tensor] = []
        self.g: List[Optional[torch.Tensor]] = []  # FAS right-hand side, None means zero
        self.restricted: List[torch.Tensor] = []  # injected values, for the FAS correction

    @property
    def active(self) -> bool:
        return self.b > self.a

    def produced_c_points(self):
        """The C-points this process computes: those in ``(a, b]``."""
        return range((self.a // self.m + 1) * self.m, self.b + 1, self.m)

    def f_chains(self):
        """The runs of F-steps ``[start, stop)`` in ``[a, b)``, one per C-interval."""
        m, chains = self.m, []
        for c in range((self.a // m) * m, self.b, m):
            start, stop = max(self.a, c), min(self.b, c + m - 1)
            if stop > start:
                chains.append((start, stop))
        return chains


class LevelSweeps:
    """One process's share of a solve: its points on every level, the messages to the
    neighbouring positions, and the sweeps on one level (F- and C-relaxation, sequential
    propagation)."""

    def __init__(self, step: Step, u0: torch.Tensor, num_steps, step_size, config: MGRITConfig,
                 comm: Communicator, layout: Layout, final_step: Optional[Step]):
        self.step, self.final_step, self.u0 = step, final_step, u0
        self.config, self.comm, self.layout = config, comm, layout
        self.me = comm.position
        self.num_steps = num_steps
        self.levels: List[Level] = []
        spacing = 1
        for l in range(config.levels):
            coarsest = l == config.levels - 1
            m = None if coarsest else config.cfactors[l]
            sweeps = 0 if coarsest else config.cf_sweeps[l]
            self.levels.append(Level(l, spacing, spacing * step_size, layout.steps(l, self.me), m, sweeps))
            if not coarsest:
                spacing *= m

    # ----------------------------------------------------------------- messages
    def _send(self, value: torch.Tensor, position: int) -> None:
        self.comm.isend(value, self.comm.rank_at(position))

    def _recv(self, like: torch.Tensor, position: int) -> torch.Tensor:
        return self.comm.recv(like, self.comm.rank_at(position))

    def _send_last(self, level: Level) -> None:
        nxt = self.layout.next(level.index, self.me)
        if nxt is not None:
            self._send(level.u[-1], nxt)

    def _recv_ghost(self, level: Level) -> None:
        prev = self.layout.previous(level.index, self.me)
        if prev is not None:
            level.u[0] = self._recv(level.u[0], prev)

    # ----------------------------------------------------------------- basic operations
    def _phi(self, level: Level, j: int, u: torch.Tensor, step: Optional[Step] = None) -> torch.Tensor:
        """Propagate level point j to j+1, plus the FAS right-hand side at j+1."""
        out = (step or self.step)(u, j * level.spacing, level.dt)
        g = level.g[j + 1 - level.a]
        return out if g is None else out + g

    def _propagate(self, level: Level, start: int, stop: int, step: Optional[Step]) -> None:
        u, a = level.u, level.a
        for j in range(start, stop):
            u[j + 1 - a] = self._phi(level, j, u[j - a], step)

    def f_relax(self, level: Level, step: Optional[Step] = None):
        """F-relaxation. An F-interval may run over several processes: the last point goes to
        the next process as soon as it is final (at once when it is a C-point, which the sweep
        does not change), and the run that starts at the ghost comes last, so that a process
        waits for its predecessor only after the work that does not need it."""
        if not level.active:
            return
        m, a, b = level.m, level.a, level.b
        last_is_c = b % m == 0
        if last_is_c:
            self._send_last(level)
        chains = level.f_chains()
        head = chains[0] if chains and chains[0][0] == a else None
        tail = chains[-1] if chains and chains[-1][1] == b else None
        if tail is not None and tail is not head:
            self._propagate(level, *tail, step)
        if not last_is_c and tail is not head:
            self._send_last(level)
        for chain in chains:
            if chain is not head and chain is not tail:
                self._propagate(level, *chain, step)
        self._recv_ghost(level)
        if head is not None:
            self._propagate(level, *head, step)
        if not last_is_c and tail is head:
            self._send_last(level)

    def c_relax(self, level: Level, step: Optional[Step] = None):
        if not level.active:
            return
        u, a = level.u, level.a
        for c in level.produced_c_points():
            u[c - a] = self._phi(level, c - 1, u[c - 1 - a], step)

    def relax(self, level: Level):
        self.f_relax(level)
        for _ in range(level.sweeps):
            self.c_relax(level)
            self.f_relax(level)

    def serial_solve(self, level: Level, step: Optional[Step] = None):
        """Sequential propagation over the level, relayed along the processes that own it."""
        if not level.active:
            return
        self._recv_ghost(level)
        self._propagate(level, level.a, level.b, step)
        self._send_last(level)

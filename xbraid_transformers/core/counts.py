"""Step evaluations per rank (the solver's work, counted where it is spent) and the
diagnostics of a stack's last solves."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import List

__all__ = ["StepCounts", "SolveStats"]


@dataclass
class StepCounts:
    """Step evaluations of one rank: fine (one layer, step h) and coarse (step m^l h)."""

    forward_fine: int = 0
    forward_coarse: int = 0
    adjoint_fine: int = 0
    adjoint_coarse: int = 0

    def count(self, kind: str, fine: bool) -> None:
        name = f"{kind}_{'fine' if fine else 'coarse'}"
        setattr(self, name, getattr(self, name) + 1)

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)


@dataclass
class SolveStats:
    """Diagnostics of the last forward and backward solve (empty lists in serial mode)."""

    mode: str = "parallel"
    fwd_iters: int = 0
    bwd_iters: int = 0
    fwd_residuals: List[float] = field(default_factory=list)
    bwd_residuals: List[float] = field(default_factory=list)

    @property
    def fwd_factors(self) -> List[float]:
        return _factors(self.fwd_residuals)

    @property
    def bwd_factors(self) -> List[float]:
        return _factors(self.bwd_residuals)


def _factors(r):
    return [r[i + 1] / r[i] if r[i] > 0 else float("nan") for i in range(len(r) - 1)]

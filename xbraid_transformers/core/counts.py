"""Step evaluations per rank: the solver's work, counted where it is spent."""
from __future__ import annotations

from dataclasses import dataclass, fields


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

"""Configuration dataclasses, each validated in one place (``__post_init__``)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

import torch

__all__ = ["InitialGuess", "MGRITConfig"]

InitialGuess = Union[str, Callable[[int, torch.Tensor], torch.Tensor]]

_RELAX_PATTERN = re.compile(r"^F(CF)*$")


@dataclass
class MGRITConfig:
    """Options of one MGRIT solve (forward and adjoint share them).

    levels: number of grid levels; 1 is plain serial propagation.
    cfactor: coarsening factor, one int for all levels or one per level transition
        (``cfactor[l]`` coarsens level l to level l+1; length ``levels - 1``).
    relax: relaxation on each non-coarsest level: ``"F"`` (F-relaxation), ``"FCF"``, or more
        CF-sweeps such as ``"FCFCF"``; a string for all levels or a list of length ``levels - 1``.
    cycle: ``"V"`` or ``"F"`` (F-cycle: after the correction from level l+1, one more V-cycle
        from level l+1).
    skip_first_downcycle: the first iteration does no relaxation on the way down (XBraid's skip).
    fwd_iters / bwd_iters: maximum MGRIT iterations of the forward and the adjoint solve.
    tol / rtol: stop early once the residual norm is <= tol, or <= rtol times the first residual
        norm (0 disables each).
    initial_guess: value of the states at t > 0 before the first iteration: ``"zeros"``,
        ``"input"`` (a copy of u0), or a callable ``(n, u0) -> tensor`` for fine point n.
    warm_start: layer-parallel modules start each solve from the previous solve's states
        (with only u0 replaced; the first down-cycle is then never skipped).
    """

    levels: int = 2
    cfactor: Union[int, Sequence[int]] = 4
    relax: Union[str, Sequence[str]] = "FCF"
    cycle: str = "V"
    skip_first_downcycle: bool = True
    fwd_iters: int = 2
    bwd_iters: int = 1
    tol: float = 0.0
    rtol: float = 0.0
    initial_guess: InitialGuess = "input"
    warm_start: bool = False
    cfactors: tuple = field(init=False, repr=False)
    cf_sweeps: tuple = field(init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.levels, int) or self.levels < 1:
            raise ValueError(f"levels must be an integer >= 1, got {self.levels!r}")
        n = self.levels - 1
        self.cfactors = _per_level("cfactor", self.cfactor, n)
        for m in self.cfactors:
            if not isinstance(m, int) or isinstance(m, bool) or m < 2:
                raise ValueError(f"cfactor must be an integer >= 2, got {m!r}")
        relax = _per_level("relax", self.relax, n)
        for r in relax:
            if not isinstance(r, str) or not _RELAX_PATTERN.match(r):
                raise ValueError(f"relax must be 'F', 'FCF', 'FCFCF', ..., got {r!r}")
        self.cf_sweeps = tuple((len(r) - 1) // 2 for r in relax)
        if self.cycle not in ("V", "F"):
            raise ValueError(f"cycle must be 'V' or 'F', got {self.cycle!r}")
        for name in ("fwd_iters", "bwd_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("tol", "rtol"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not callable(self.initial_guess) and self.initial_guess not in ("zeros", "input"):
            raise ValueError(
                f"initial_guess must be 'zeros', 'input' or a callable, got {self.initial_guess!r}")

    @property
    def coarsest_spacing(self) -> int:
        """Fine steps per interval of the coarsest level."""
        spacing = 1
        for m in self.cfactors:
            spacing *= m
        return spacing


def _per_level(name, value, n):
    if isinstance(value, (str, int)):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name} given per level needs levels - 1 = {n} entries, got {len(value)}")
    return value

"""FAS MGRIT over an arbitrary step function, XBraid's algorithm.

The solver knows nothing about transformers. A problem is a step function
``step(u, n, dt) -> u_next`` (n: fine index of the interval start, dt: step size of the level
that asks) and an initial value u0. Level l of the hierarchy has points at the fine indices
``j * spacing_l``; its C-points are every ``cfactor[l]``-th point (0 included), the others are
F-points. The coarse propagator of level l reuses the fine step at the interval start with the
larger step size (parameter injection).

Tensors are never modified in place: every update binds a new tensor, so restricted values and
states handed to callbacks stay valid.

Distribution: the caller may own only a block ``[lo, hi]`` of fine points (``lo`` and ``hi``
multiples of the coarsest spacing, unless ``hi`` is the last point). Point ``lo`` is then a ghost
copy of the previous block's last point, refreshed through ``comm`` before each F-relaxation;
the coarsest level is relayed along the blocks and residual norms are summed over them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from .config import MGRITConfig
from .comm import SERIAL, Communicator

Step = Callable[[torch.Tensor, int, float], torch.Tensor]


class MGRITDivergenceError(FloatingPointError):
    """The MGRIT iteration produced a non-finite residual or state."""


@dataclass
class MGRITResult:
    """What one solve returns.

    states: the fine states u_lo..u_hi after the final sweep (u_0..u_N on a single process).
    residuals: fine-level residual norm of each iteration that computed one (XBraid's
        convention: C-points excluding t=0, after relaxation and before the coarse correction,
        sqrt of the summed squared Frobenius norms).
    factors: ratios of consecutive residual norms (the convergence factors).
    iterations: MGRIT iterations done.
    converged: whether a tolerance was met (False when none was given).
    """

    states: List[torch.Tensor]
    residuals: List[float] = field(default_factory=list)
    iterations: int = 0
    converged: bool = False

    @property
    def factors(self) -> List[float]:
        r = self.residuals
        return [r[i + 1] / r[i] if r[i] > 0 else math.nan for i in range(len(r) - 1)]


class _Level:
    """Points ``lo..hi`` of one level (local numbering of that level)."""

    def __init__(self, spacing: int, dt: float, lo: int, hi: int, cfactor: Optional[int], sweeps: int):
        self.spacing, self.dt, self.lo, self.hi = spacing, dt, lo, hi
        self.m = cfactor  # None on the coarsest level
        self.sweeps = sweeps
        self.u: List[torch.Tensor] = []
        self.g: List[Optional[torch.Tensor]] = []  # FAS right-hand side, None means zero
        self.restricted: List[torch.Tensor] = []  # injected values, for the FAS correction

    def c_points(self, include_lo: bool):
        first = self.lo if include_lo else self.lo + self.m
        return range(first, self.hi + 1, self.m)


class _Solver:
    def __init__(self, step: Step, num_steps, step_size, config: MGRITConfig, comm: Communicator,
                 block, final_step: Optional[Step]):
        self.step, self.final_step = step, final_step
        self.config, self.comm = config, comm
        lo, hi = block if block is not None else (0, num_steps)
        self.num_steps = num_steps
        self.first_block = lo == 0
        self.levels: List[_Level] = []
        spacing = 1
        for l in range(config.levels):
            coarsest = l == config.levels - 1
            m = None if coarsest else config.cfactors[l]
            sweeps = 0 if coarsest else config.cf_sweeps[l]
            self.levels.append(_Level(spacing, spacing * step_size, lo // spacing, hi // spacing, m, sweeps))
            if not coarsest:
                spacing *= m

    # ----------------------------------------------------------------- basic operations
    def _phi(self, level: _Level, j: int, u: torch.Tensor, step: Optional[Step] = None) -> torch.Tensor:
        """Propagate level point j to j+1, plus the FAS right-hand side at j+1."""
        out = (step or self.step)(u, j * level.spacing, level.dt)
        g = level.g[j + 1 - level.lo]
        return out if g is None else out + g

    def _refresh_ghost(self, level: _Level):
        ghost = self.comm.exchange(level.u[-1])
        if ghost is not None:
            level.u[0] = ghost

    def f_relax(self, level: _Level, step: Optional[Step] = None):
        self._refresh_ghost(level)
        u, lo = level.u, level.lo
        for c in level.c_points(include_lo=True):
            for i in range(c + 1, min(c + level.m, level.hi + 1)):
                u[i - lo] = self._phi(level, i - 1, u[i - 1 - lo], step)

    def c_relax(self, level: _Level, step: Optional[Step] = None):
        u, lo = level.u, level.lo
        for c in level.c_points(include_lo=False):
            u[c - lo] = self._phi(level, c - 1, u[c - 1 - lo], step)

    def relax(self, level: _Level):
        self.f_relax(level)
        for _ in range(level.sweeps):
            self.c_relax(level)
            self.f_relax(level)

    def serial_solve(self, level: _Level, step: Optional[Step] = None):
        """Sequential propagation over the level, relayed along the blocks."""
        if not self.first_block:
            level.u[0] = self.comm.recv_prev(level.u[0])
        u, lo = level.u, level.lo
        for j in range(lo + 1, level.hi + 1):
            u[j - lo] = self._phi(level, j - 1, u[j - 1 - lo], step)
        self.comm.send_next(u[-1])

    def restrict(self, l: int, fas: bool) -> float:
        """Inject C-points into level l+1 and, with ``fas``, form its FAS right-hand side.

        Returns the local sum of squared residual norms at the C-points of the finest level
        (0 without ``fas`` and on coarser levels, whose norms are never reported: one host
        synchronisation per iteration, not one per C-point).
        """
        fine, coarse = self.levels[l], self.levels[l + 1]
        lo = fine.lo
        coarse.u = [fine.u[c - lo] for c in fine.c_points(include_lo=True)]
        coarse.restricted = list(coarse.u)
        coarse.g = [None] * len(coarse.u)
        sq = []
        if not fas:
            return 0.0
        for c in fine.c_points(include_lo=False):
            j = c // fine.m - coarse.lo
            propagated = self._phi(fine, c - 1, fine.u[c - 1 - lo])
            if l == 0:
                sq.append(torch.linalg.vector_norm(propagated - fine.u[c - lo]).square())
            coarse_start = (j - 1 + coarse.lo) * coarse.spacing
            coarse.g[j] = propagated - self.step(coarse.restricted[j - 1], coarse_start, coarse.dt)
        return float(torch.stack(sq).double().sum()) if sq else 0.0

    def correct(self, l: int):
        fine, coarse = self.levels[l], self.levels[l + 1]
        for c in fine.c_points(include_lo=False):
            j = c // fine.m - coarse.lo
            fine.u[c - fine.lo] = fine.u[c - fine.lo] + (coarse.u[j] - coarse.restricted[j])

    # ----------------------------------------------------------------- cycles
    def cycle(self, l: int, kind: str, skip: bool, on_residual) -> None:
        """One cycle from level l; the fine-level residual norm goes to ``on_residual``.

        It returns level l with corrected C-points and stale F-points. As in XBraid, the
        F-relaxation that renews them belongs to whoever reads them next: the interpolation
        to level l-1 (``interpolate``), or the next relaxation or final sweep, which start with
        one. F-relaxing here as well would spend a sweep whose values are recomputed from the
        same C-points before anyone reads them.
        """
        level = self.levels[l]
        if l == len(self.levels) - 1:
            self.serial_solve(level)
            return
        if not skip:
            self.relax(level)
        sq = self.restrict(l, fas=not skip)
        if l == 0 and not skip:
            on_residual(math.sqrt(self.comm.allreduce_sum(sq)))
        self.cycle(l + 1, kind, skip, on_residual)
        if kind == "F":
            self.cycle(l + 1, "V", False, on_residual)
        self.interpolate(l)

    def interpolate(self, l: int) -> None:
        """XBraid's up-cycle step from level l+1 to level l: F-relax level l+1, whose points
        are level l's C-points, then correct those C-points. The coarsest level needs no
        F-relaxation (its serial solve set every point)."""
        coarse = self.levels[l + 1]
        if coarse.m is not None:
            self.f_relax(coarse)
        self.correct(l)

    def final_sweep(self):
        """XBraid's final F-then-C sweep on the finest level: it renews the F-points the last
        cycle left stale and evaluates every fine step exactly once (with ``final_step``)."""
        level = self.levels[0]
        if len(self.levels) == 1:
            self.serial_solve(level, self.final_step)
        else:
            self.f_relax(level, self.final_step)
            self.c_relax(level, self.final_step)


def _initial_states(u0, lo, hi, guess, initial_states):
    if initial_states is not None:
        if len(initial_states) != hi - lo + 1:
            raise ValueError(f"initial_states needs {hi - lo + 1} states, got {len(initial_states)}")
        return [u0] + list(initial_states[1:])
    if guess == "zeros":
        rest = [torch.zeros_like(u0)] * (hi - lo)
    elif guess == "input":
        rest = [u0] * (hi - lo)
    else:
        rest = []
        for n in range(lo + 1, hi + 1):
            value = torch.as_tensor(guess(n, u0), dtype=u0.dtype, device=u0.device)
            if value.shape != u0.shape:
                raise ValueError(f"initial_guess returned shape {tuple(value.shape)} at point {n}, "
                                 f"expected {tuple(u0.shape)}")
            rest.append(value)
    return [u0] + rest


def solve(step: Step, u0: torch.Tensor, num_steps: int, step_size: float, config: MGRITConfig, *,
          max_iters: Optional[int] = None, initial_states=None, callback=None,
          final_step: Optional[Step] = None, comm: Optional[Communicator] = None,
          block=None) -> MGRITResult:
    """Solve u_{n+1} = step(u_n, n, step_size), n = 0..num_steps-1, with FAS MGRIT.

    step: ``step(u, n, dt) -> u_next``; n is the fine index of the interval start and dt the
        step size of the level (``step_size`` times the level's spacing).
    max_iters: iterations at most (default ``config.fwd_iters``); fewer when a residual is below
        ``config.tol`` or ``config.rtol`` times the first residual (strict, as in XBraid; the
        iteration that meets it still completes its cycle).
    initial_states: the states to start from (warm start); their first entry is replaced by u0.
        A warm start never skips the first down-cycle (that would discard the C-point values).
    callback: ``callback(k, states)`` after iteration k with the fine states (before the final
        sweep), their F-points relaxed from the C-points: one more fine F-sweep per iteration,
        with a ghost exchange, so under ``comm`` every rank must pass a callback or none.
    final_step: step function for the final F-then-C sweep on the finest level (default
        ``step``); every fine step is evaluated exactly once in that sweep.
    comm, block: distribution (see the module docstring); by default a single process owns
        every point.
    """
    comm = comm or SERIAL
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    spacing = config.coarsest_spacing
    if num_steps < spacing:
        raise ValueError(
            f"{config.levels} levels with cfactors {config.cfactors} need at least {spacing} steps "
            f"(one interval on the coarsest level), got {num_steps}")
    lo, hi = block if block is not None else (0, num_steps)
    if lo % spacing or (hi % spacing and hi != num_steps) or not 0 <= lo < hi <= num_steps:
        raise ValueError(f"block {block} must lie in [0, {num_steps}] on coarsest-level boundaries "
                         f"(multiples of {spacing})")
    if not torch.isfinite(u0).all():
        raise MGRITDivergenceError("the initial value u0 contains NaN or Inf")
    max_iters = config.fwd_iters if max_iters is None else max_iters

    solver = _Solver(step, num_steps, step_size, config, comm, (lo, hi), final_step)
    fine = solver.levels[0]
    fine.u = _initial_states(u0, lo, hi, config.initial_guess, initial_states)
    fine.g = [None] * len(fine.u)
    result = MGRITResult(states=fine.u)

    def on_residual(norm: float) -> None:
        if not math.isfinite(norm):
            raise MGRITDivergenceError(
                f"MGRIT residual norm became {norm} at iteration {result.iterations + 1}: the "
                "solve diverged (step size too large for the coarse levels, or NaN/Inf produced "
                "by a step)")
        result.residuals.append(norm)
        tol = max(config.tol, config.rtol * result.residuals[0])
        result.converged = norm < tol  # XBraid's strict test; tol = 0 never stops

    if config.levels > 1:
        for k in range(max_iters):
            skip = k == 0 and config.skip_first_downcycle and initial_states is None
            # Like XBraid, an iteration whose residual meets the tolerance still completes
            # its cycle (coarse correction included) before the solve stops.
            solver.cycle(0, config.cycle, skip, on_residual)
            result.iterations = k + 1
            if callback is not None:
                # The cycle leaves the fine F-points stale; the caller sees them F-relaxed from
                # the current C-points, at the price of one fine F-sweep per iteration (what
                # XBraid spends for its per-iteration access). Nothing else changes: the next
                # relaxation or the final sweep recomputes the same values.
                solver.f_relax(fine)
                callback(k + 1, list(fine.u))
            if result.converged:
                break
    solver.final_sweep()
    result.states = fine.u
    finite = bool(torch.isfinite(fine.u[-1]).all())
    if comm.size > 1:   # decided together, so that no rank raises while the others go on
        finite = comm.allreduce_sum(0.0 if finite else 1.0) == 0.0
    if not finite:
        raise MGRITDivergenceError(
            f"MGRIT produced NaN or Inf in the final state after {result.iterations} iterations "
            f"(residuals {result.residuals})")
    return result

"""FAS MGRIT over an arbitrary step function, XBraid's algorithm.

The solver knows nothing about transformers. A problem is a step function
``step(u, n, dt) -> u_next`` (n: fine index of the interval start, dt: step size of the level
that asks) and an initial value u0. Level l of the hierarchy has points at the fine indices
``j * spacing_l``; its C-points are every ``cfactor[l]``-th point (0 included), the others are
F-points. The coarse propagator of level l reuses the fine step at the interval start with the
larger step size (parameter injection).

Tensors are never modified in place: every update binds a new tensor, so restricted values and
states handed to callbacks stay valid.

Distribution (``mgrit.layout``): each process owns a contiguous range of fine steps, any size;
a step of a coarse level is evaluated by the process that owns its anchor fine step, so a level
lives on the processes that own its points, however few. A process holds the points of its
steps plus a ghost copy of the point before them, refreshed through ``comm`` before it is
read; F-intervals, restriction and correction that straddle two processes exchange the values
they share; the coarsest level is relayed along the processes that own it and residual norms
are summed over all. Every value is computed by the same operations as on one process, so the
result is bit-identical to it.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from .config import MGRITConfig
from .comm import SERIAL, Communicator
from ._levels import LevelSweeps, Step
from .layout import StepRange, layout

__all__ = ["MGRITDivergenceError", "MGRITResult", "solve"]

class MGRITDivergenceError(FloatingPointError):
    """The MGRIT iteration produced a non-finite residual or state."""


@dataclass
class MGRITResult:
    """What one solve returns.

    states: the fine states u_a..u_b of this process's steps [a, b) after the final sweep
        (u_0..u_N on a single process; u_a is the ghost copy of the point before them).
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


class _Solver(LevelSweeps):
    """FAS cycles over the levels: restriction, coarse-grid correction, the V- and F-cycles,
    interpolation for nested iteration (``LevelSweeps``: the sweeps on one level)."""

    def restrict(self, l: int, fas: bool) -> float:
        """Inject C-points into level l+1 and, with ``fas``, form its FAS right-hand side.

        A C-point of level l and its coarse point may be computed by different processes (an
        interval of level l+1 that starts on one process and ends on the next): the fine one
        then sends the value (and the propagated value the right-hand side needs), and so does
        the producer of a coarse ghost that the receiving process does not hold on level l.

        Returns the local sum of squared residual norms at the C-points of the finest level
        (0 without ``fas`` and on coarser levels, whose norms are never reported: one host
        synchronisation per iteration, not one per C-point).
        """
        fine, coarse = self.levels[l], self.levels[l + 1]
        layout, me, m = self.layout, self.me, fine.m
        sq, mine = [], {}
        first = layout.owner(l + 1, 0)     # point 0 (the initial value) comes from position 0
        if me == 0 and first != me and layout.steps(l, first)[0] > 0:
            self._send(self.u0, first)
        for c in fine.produced_c_points() if fine.active else ():
            q = c // m
            propagated = self._phi(fine, c - 1, fine.u[c - 1 - fine.a]) if fas else None
            if fas and l == 0:
                sq.append(torch.linalg.vector_norm(propagated - fine.u[c - fine.a]).square())
            mine[q] = (fine.u[c - fine.a], propagated)
            maker = layout.owner(l + 1, q - 1)          # who computes coarse point q
            if maker != me:
                self._send(fine.u[c - fine.a], maker)
                if fas:
                    self._send(propagated, maker)
            if q < layout.counts[l + 1]:
                holder = layout.owner(l + 1, q)        # whose coarse ghost q is
                if holder not in (me, maker) and layout.steps(l, holder)[0] > c:
                    self._send(fine.u[c - fine.a], holder)
        if coarse.active:
            like = fine.u[0]
            ghost = coarse.a * m
            if fine.a <= ghost <= fine.b:
                values = [fine.u[ghost - fine.a]]
            else:
                values = [self._recv(like, layout.producer(l, ghost))]
            propagated = [None]
            for q in range(coarse.a + 1, coarse.b + 1):
                if q in mine:
                    value, prop = mine[q]
                else:
                    source = layout.producer(l, q * m)
                    value = self._recv(like, source)
                    prop = self._recv(like, source) if fas else None
                values.append(value)
                propagated.append(prop)
            coarse.u = values
            coarse.restricted = list(values)
            coarse.g = [None] * len(values)
            if fas:
                for i in range(1, len(values)):
                    start = (coarse.a + i - 1) * coarse.spacing
                    coarse.g[i] = propagated[i] - self.step(coarse.restricted[i - 1], start, coarse.dt)
        return float(torch.stack(sq).double().sum()) if sq else 0.0

    def correct(self, l: int):
        """C-points of level l += (coarse value - injected value); the coarse point's maker
        sends the difference where the fine C-point is computed elsewhere."""
        fine, coarse = self.levels[l], self.levels[l + 1]
        layout, me, m = self.layout, self.me, fine.m
        for q in range(coarse.a + 1, coarse.b + 1) if coarse.active else ():
            i = q - coarse.a
            target = layout.producer(l, q * m)
            if target != me:
                self._send(coarse.u[i] - coarse.restricted[i], target)
        if not fine.active:
            return
        for c in fine.produced_c_points():
            q = c // m
            maker = layout.owner(l + 1, q - 1)
            if maker == me:
                i = q - coarse.a
                difference = coarse.u[i] - coarse.restricted[i]
            else:
                difference = self._recv(fine.u[0], maker)
            fine.u[c - fine.a] = fine.u[c - fine.a] + difference

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
          ranges: Optional[Sequence[StepRange]] = None, anchor: str = "first",
          blocks: Optional[Sequence[StepRange]] = None) -> MGRITResult:
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
    comm, ranges, anchor: distribution (see the module docstring and ``mgrit.layout``): the
        fine steps ``[lo, hi)`` of every process in solve order (``comm.position`` indexes
        them), and which fine step of a coarse interval decides its owner; by default a single
        process owns every step. ``blocks`` is the deprecated name of ``ranges``.
    """
    if blocks is not None:
        warnings.warn("solve(blocks=...) is now solve(ranges=...)", DeprecationWarning, stacklevel=2)
        ranges = blocks if ranges is None else ranges
    comm = comm or SERIAL
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    spacing = config.coarsest_spacing
    if num_steps < spacing:
        raise ValueError(
            f"{config.levels} levels with cfactors {config.cfactors} need at least {spacing} steps "
            f"(one interval on the coarsest level), got {num_steps}")
    ranges = [(0, num_steps)] if ranges is None else ranges
    if len(ranges) != comm.size:
        raise ValueError(f"the step ranges {list(ranges)} name {len(ranges)} processes, the "
                         f"communicator has {comm.size}")
    plan = layout(num_steps, ranges, config.cfactors, anchor)
    lo, hi = plan.fine_ranges[comm.position]
    if not torch.isfinite(u0).all():
        raise MGRITDivergenceError("the initial value u0 contains NaN or Inf")
    max_iters = config.fwd_iters if max_iters is None else max_iters

    solver = _Solver(step, u0, num_steps, step_size, config, comm, plan, final_step)
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

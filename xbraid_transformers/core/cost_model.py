"""The MGRIT cost model: the step evaluations of every rank, and the critical path of one
training step (a forward solve and its adjoint)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

from ..mgrit.config import MGRITConfig
from ..mgrit.layout import Layout, layout, mirrored
from .counts import StepCounts
from .ownership import Partition, partition_layers

__all__ = ["cost_model"]

# A sweep of one solve: (phase, level, points), points being which points of the level it
# evaluates: "F" (the F-points), "C" (the C-points but the block's first), "all" (every point
# but the block's first) or "chain" (every point, relayed along the ranks: the serial solve).
_Sweep = Tuple[str, int, str]


def _solve_sweeps(config: MGRITConfig, iterations: int, skip_first: bool) -> List[_Sweep]:
    """The sweeps of one ``mgrit.solve`` with a fixed number of iterations (tol = 0), in the
    solver's order; the phases are those of XBraid's cycle."""
    coarsest = config.levels - 1
    sweeps: List[_Sweep] = []

    def cycle(l: int, kind: str, skip: bool) -> None:
        if l == coarsest:
            sweeps.append(("coarsest", l, "chain"))
            return
        if not skip:
            sweeps.append(("relax", l, "F"))
            for _ in range(config.cf_sweeps[l]):
                sweeps.extend([("relax", l, "C"), ("relax", l, "F")])
            # FAS: the level's step at its C-points (the residual), the coarse step at every
            # point of level l+1 (the right-hand side)
            sweeps.extend([("residual", l, "C"), ("residual", l + 1, "all")])
        cycle(l + 1, kind, skip)
        if kind == "F":
            cycle(l + 1, "V", False)
        # The interpolation F-relaxes level l+1 (its points are level l's C-points); level l's
        # own F-points wait for its next relaxation, its interpolation or the final sweep.
        if l + 1 < coarsest:
            sweeps.append(("interpolate", l + 1, "F"))

    if config.levels == 1:
        return [("final", 0, "chain")]
    for k in range(iterations):
        cycle(0, config.cycle, skip_first and k == 0)
    sweeps.extend([("final", 0, "F"), ("final", 0, "C")])
    return sweeps


def _evaluations(points: str, steps: Tuple[int, int], cfactor: Optional[int]) -> int:
    """Evaluations of a sweep by a process owning the steps ``[a, b)`` of a level (``cfactor``
    None on the coarsest level, which has neither F- nor C-points). A step into a C-point is a
    C-step; every C-point after ``a`` in ``(a, b]`` is one."""
    a, b = steps
    if points in ("all", "chain"):
        return b - a
    c_steps = b // cfactor - a // cfactor
    return c_steps if points == "C" else (b - a) - c_steps


def _f_sweep_time(layout: Layout, level: int, cfactor: int, hop_cost: float) -> float:
    """Steps on the critical path of one F-relaxation of ``level``, in the solver's order: an
    F-interval that runs over several processes is a chain through them (the last point goes
    on as soon as it is final, the run from the ghost comes last)."""
    finish, sent = 0.0, None
    for position in layout.active(level):
        a, b = layout.steps(level, position)
        runs = [(max(a, c), min(b, c + cfactor - 1)) for c in range((a // cfactor) * cfactor, b, cfactor)]
        runs = [r for r in runs if r[1] > r[0]]
        head = runs[0] if runs and runs[0][0] == a else None
        tail = runs[-1] if runs and runs[-1][1] == b else None
        t, send = 0.0, 0.0 if b % cfactor == 0 else None
        if tail is not None and tail is not head:
            t += tail[1] - tail[0]
            send = t if send is None else send
        t += sum(r[1] - r[0] for r in runs if r is not head and r is not tail)
        if sent is not None:                      # the ghost from the previous process
            t = max(t, sent + hop_cost)
        if head is not None:
            t += head[1] - head[0]
        sent = t if send is None else send
        finish = max(finish, t)
    return finish


def cost_model(num_layers: int, nprocs: int, levels: int, cfactor: Union[int, Sequence[int]],
               fwd_iters: int, bwd_iters: int, relax: Union[str, Sequence[str]] = "FCF",
               skip_first_downcycle: bool = True, cycle: str = "V", backward_cost: float = 2.0,
               hop_cost: float = 0.0, partition: Partition = None,
               step_costs: Optional[Dict[str, float]] = None) -> dict:
    """Step evaluations of one layer-parallel training step of ``num_layers`` layers on
    ``nprocs`` ranks (fixed iterations, no tolerance), counted sweep by sweep as the solver
    spends them (``_solve_sweeps``), on the layout the solver uses (``mgrit.layout``: balanced
    fine blocks, each coarse interval on the rank of its first layer).

    step_costs: the price of one step of each kind, in any unit: ``forward``,
        ``forward_final`` (the forward's final sweep, which also records each layer's graph),
        ``adjoint``, ``adjoint_final`` (which also forms the parameter gradients) and
        ``serial`` (one layer's forward and backward through autograd). By default a forward
        step costs 1, an adjoint step ``backward_cost`` and a serial layer 1 + backward_cost;
        a coarse step costs as much as a fine one. ``hop_cost`` is in the same unit.

    Returns a dict:
      per_rank: one ``StepCounts`` per rank (its block from ``partition``, as LayerParallel
        splits it): exactly what ``LayerParallel.counts`` measures on that rank.
      parallel: the critical path, sweep by sweep (the ranks meet at every sweep through their
        ghost points): the most loaded rank's evaluations of each sweep; an F-relaxation whose
        intervals run over several ranks as the chain through them; for each visit of the
        coarsest level its whole serial chain (all its steps, and a hop of ``hop_cost`` between
        each two ranks that own some of them).
      phases: ``parallel`` split by solve and phase ("forward relax", "adjoint coarsest", ...;
        the phases: relax, residual, coarsest, interpolate, final).
      serial: ``num_layers`` serial layers, forward and backward.
      speedup: serial / parallel.
    """
    costs = dict(forward=1.0, forward_final=1.0, adjoint=backward_cost,
                 adjoint_final=backward_cost, serial=1.0 + backward_cost)
    costs.update(step_costs or {})
    config = MGRITConfig(levels=levels, cfactor=cfactor, relax=relax, cycle=cycle)
    blocks = partition_layers(num_layers, config.coarsest_spacing, nprocs, partition)
    cfactors = list(config.cfactors) + [None]
    # the adjoint runs the ranks backwards: position i of its layout is rank nprocs - 1 - i
    layouts = {"forward": (layout(num_layers, blocks, config.cfactors, "first"), False),
               "adjoint": (layout(num_layers, mirrored(num_layers, blocks), config.cfactors, "last"), True)}
    ledgers = {"forward": _solve_sweeps(config, fwd_iters, skip_first_downcycle),
               "adjoint": _solve_sweeps(config, bwd_iters, skip_first_downcycle)}

    per_rank = [StepCounts() for _ in blocks]
    phases: Dict[str, float] = {}
    for kind, ledger in ledgers.items():
        plan, backwards = layouts[kind]
        for phase, level, points in ledger:
            evaluations = [_evaluations(points, plan.steps(level, i), cfactors[level])
                           for i in range(nprocs)]
            name = f"{kind}_{'fine' if level == 0 else 'coarse'}"
            for i, count in enumerate(evaluations):
                counts = per_rank[nprocs - 1 - i if backwards else i]
                setattr(counts, name, getattr(counts, name) + count)
            price = costs[f"{kind}_final" if phase == "final" else kind]
            if points == "chain":
                steps = price * sum(evaluations) + (len(plan.active(level)) - 1) * hop_cost
            elif points == "F":
                steps = price * _f_sweep_time(plan, level, cfactors[level], hop_cost / price)
            else:
                steps = price * max(evaluations)
            phases[f"{kind} {phase}"] = phases.get(f"{kind} {phase}", 0.0) + steps
    parallel = sum(phases.values())
    serial = costs["serial"] * num_layers
    return dict(per_rank=per_rank, parallel=parallel, phases=phases, serial=serial,
                speedup=serial / parallel)

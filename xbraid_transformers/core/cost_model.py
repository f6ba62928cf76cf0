"""The MGRIT cost model: the step evaluations of every rank, and the critical path of one
training step (a forward solve and its adjoint)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

from ..mgrit.config import MGRITConfig
from .counts import StepCounts
from .ownership import Partition, partition_layers

# A sweep of one solve: (phase, level, points), points being which points of the level it
# evaluates: "F" (the F-points), "C" (the C-points but the block's first), "all" (every point
# but the block's first) or "chain" (every point, relayed along the ranks: the serial solve).
Sweep = Tuple[str, int, str]


def solve_sweeps(config: MGRITConfig, iterations: int, skip_first: bool) -> List[Sweep]:
    """The sweeps of one ``mgrit.solve`` with a fixed number of iterations (tol = 0), in the
    solver's order; the phases are those of XBraid's cycle."""
    coarsest = config.levels - 1
    sweeps: List[Sweep] = []

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


def _evaluations(points: str, intervals: int, cfactor: Optional[int]) -> int:
    """Evaluations of a sweep over ``intervals`` intervals of one level (``cfactor`` None on
    the coarsest level, which has neither F- nor C-points)."""
    if points in ("all", "chain"):
        return intervals
    c_points = intervals // cfactor
    return c_points if points == "C" else intervals - c_points


def cost_model(num_layers: int, nprocs: int, levels: int, cfactor: Union[int, Sequence[int]],
               fwd_iters: int, bwd_iters: int, relax: Union[str, Sequence[str]] = "FCF",
               skip_first_downcycle: bool = True, cycle: str = "V", backward_cost: float = 2.0,
               hop_cost: float = 0.0, partition: Partition = None,
               step_costs: Optional[Dict[str, float]] = None) -> dict:
    """Step evaluations of one layer-parallel training step of ``num_layers`` layers on
    ``nprocs`` ranks (fixed iterations, no tolerance), counted sweep by sweep as the solver
    spends them (``solve_sweeps``).

    step_costs: the price of one step of each kind, in any unit: ``forward``,
        ``forward_final`` (the forward's final sweep, which also records each layer's graph),
        ``adjoint``, ``adjoint_final`` (which also forms the parameter gradients) and
        ``serial`` (one layer's forward and backward through autograd). By default a forward
        step costs 1, an adjoint step ``backward_cost`` and a serial layer 1 + backward_cost;
        a coarse step costs as much as a fine one. ``hop_cost`` is in the same unit.

    Returns a dict:
      per_rank: one ``StepCounts`` per rank (its block from ``partition``, as LayerParallel
        splits it): exactly what ``LayerParallel.counts`` measures on that rank.
      parallel: the critical path: the most loaded rank's sweeps plus, for each visit of the
        coarsest level, its whole serial chain (``N / spacing`` steps and ``nprocs - 1`` hops
        of ``hop_cost``).
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
    spacings = [1]
    for m in config.cfactors:
        spacings.append(spacings[-1] * m)
    cfactors = list(config.cfactors) + [None]

    def evaluations(sweep: Sweep, steps: int) -> int:
        _, l, points = sweep
        return _evaluations(points, steps // spacings[l], cfactors[l])

    ledgers = {"forward": solve_sweeps(config, fwd_iters, skip_first_downcycle),
               "adjoint": solve_sweeps(config, bwd_iters, skip_first_downcycle)}

    per_rank = []
    for lo, hi in blocks:
        counts = StepCounts()
        for kind, ledger in ledgers.items():
            for sweep in ledger:
                name = f"{kind}_{'fine' if sweep[1] == 0 else 'coarse'}"
                setattr(counts, name, getattr(counts, name) + evaluations(sweep, hi - lo))
        per_rank.append(counts)

    largest = max(hi - lo for lo, hi in blocks)
    phases: Dict[str, float] = {}
    for kind, ledger in ledgers.items():
        for phase, level, points in ledger:
            price = costs[f"{kind}_final" if phase == "final" else kind]
            if points == "chain":
                cost = price * evaluations((phase, level, points), num_layers) + (nprocs - 1) * hop_cost
            else:
                cost = price * evaluations((phase, level, points), largest)
            phases[f"{kind} {phase}"] = phases.get(f"{kind} {phase}", 0.0) + cost
    parallel = sum(phases.values())
    serial = costs["serial"] * num_layers
    return dict(per_rank=per_rank, parallel=parallel, phases=phases, serial=serial,
                speedup=serial / parallel)

"""The MGRIT cost model: step evaluations on the critical path of one training step."""
from __future__ import annotations

import math


def cost_model(num_layers: int, nprocs: int, levels: int, cfactor: int, fwd_iters: int,
               bwd_iters: int, relax: str = "FCF", skip_first_downcycle: bool = True,
               backward_cost: float = 2.0, hop_cost: float = 0.0) -> dict:
    """Step evaluations on the critical path (unit: one forward layer step) of one training
    step, layer-parallel and serial, for any number of levels (docs/algorithm.md, "Cost model
    and virtual time").

    Per V-cycle on level l (N_l points, N_l / P per rank): relaxation (F: (m-1)/m, each CF
    sweep one more N_l/P), FAS residual and coarse right-hand side (2 N_l / (m P)), the
    correction's F-relaxation ((m-1)/m N_l/P); the coarsest level is a serial chain of N_L steps
    plus P-1 hops. The final sweep adds N/P. An adjoint step costs ``backward_cost``."""
    spacing = cfactor ** (levels - 1)
    per_rank = math.ceil(num_layers // spacing / nprocs) * spacing   # the largest block
    sweeps = (len(relax) - 1) // 2
    m = cfactor

    def cycle(l, skip):
        points, mine = num_layers / m ** l, per_rank / m ** l
        if l == levels - 1:
            return points + (nprocs - 1) * hop_cost
        cost = 0.0 if skip else mine * ((m - 1) / m + sweeps) + 2 * mine / m
        return cost + cycle(l + 1, skip) + mine * (m - 1) / m

    def solve(iters):
        if levels == 1:
            return num_layers + (nprocs - 1) * hop_cost
        return sum(cycle(0, skip_first_downcycle and k == 0) for k in range(iters)) + per_rank

    parallel = solve(fwd_iters) + backward_cost * solve(bwd_iters)
    serial = (1 + backward_cost) * num_layers
    return dict(parallel=parallel, serial=serial, speedup=serial / parallel)

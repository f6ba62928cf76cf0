"""The cost model counts the sweeps the solver spends, rank by rank.

Oracles: XBraid's evaluation counts (``tests/data/xbraid_counts.json``, see
``test_solver_counts.py``) for one rank, and the counts the solver itself measures
(``LayerParallel.counts``) on 1-16 emulated ranks, blocks of equal and unequal size, more ranks
than coarsest intervals included; critical paths derived by hand.
"""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import xbraid_transformers as xbt
from xbraid_transformers.perf import cost_model, emulate

TABLE = json.loads((Path(__file__).parent / "data" / "xbraid_counts.json").read_text())


def as_tuple(counts):
    return (counts.forward_fine, counts.forward_coarse, counts.adjoint_fine, counts.adjoint_coarse)


@pytest.mark.parametrize("row", TABLE["rows"])
def test_one_rank_counts_are_xbraids(row):
    model = cost_model(32, 1, row["levels"], row["cfactor"], row["iterations"], row["iterations"],
                       relax=row["relax"], skip_first_downcycle=row["skip"])
    (counts,) = model["per_rank"]
    assert as_tuple(counts) == (row["fine"], row["coarse"], row["fine"], row["coarse"])


def measured_counts(comm, num_layers, options):
    torch.manual_seed(0)
    stack = xbt.LayerParallel([nn.Linear(3, 3) for _ in range(num_layers)],
                              rhs=lambda layer, x: torch.tanh(layer(x)),
                              mgrit=xbt.MGRITConfig(**options), comm=comm)
    # the ranks are threads sharing torch's global generator: a generator of its own gives every
    # rank the same input (LayerParallel checks that they agree)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    stack(x).square().sum().backward()
    return as_tuple(stack.counts)


# (layers, ranks, options): equal and unequal blocks, 2-4 levels, V- and F-cycles, per-level
# cfactors and relaxations, skip on and off, different forward and adjoint iterations
GRID = [
    (32, 1, dict(levels=2, cfactor=4, relax="FCF")),
    (32, 2, dict(levels=2, cfactor=4, relax="FCF", fwd_iters=1, bwd_iters=1)),
    (32, 8, dict(levels=2, cfactor=4, relax="FCF", fwd_iters=1, bwd_iters=1)),
    (48, 5, dict(levels=2, cfactor=4, relax="F", skip_first_downcycle=False, fwd_iters=2)),
    (48, 7, dict(levels=2, cfactor=2, relax="FCFCF", fwd_iters=3, bwd_iters=1)),
    (64, 3, dict(levels=3, cfactor=2, relax="FCF", cycle="F", fwd_iters=2, bwd_iters=2)),
    (64, 4, dict(levels=3, cfactor=4, relax="F", skip_first_downcycle=False, bwd_iters=2)),
    (64, 6, dict(levels=3, cfactor=[2, 4], relax=["FCF", "F"], fwd_iters=2, bwd_iters=1)),
    (32, 2, dict(levels=4, cfactor=2, relax="F", cycle="F", fwd_iters=2, bwd_iters=1)),
    (24, 3, dict(levels=1)),
    # more ranks than coarsest intervals: coarse levels on some of the ranks, blocks that cut
    # coarse intervals, F-intervals that run over several ranks
    (16, 4, dict(levels=3, cfactor=4, relax="FCF", fwd_iters=2, bwd_iters=1)),
    (16, 4, dict(levels=2, cfactor=8, relax="F", fwd_iters=2, bwd_iters=2)),
    (8, 3, dict(levels=2, cfactor=4, relax="F", skip_first_downcycle=False, fwd_iters=1)),
    (24, 5, dict(levels=3, cfactor=[2, 3], relax=["F", "FCF"], cycle="F", fwd_iters=2, bwd_iters=2)),
    (32, 12, dict(levels=3, cfactor=4, relax="FCF", fwd_iters=2, bwd_iters=2)),
    (16, 16, dict(levels=4, cfactor=2, relax="FCF", fwd_iters=2, bwd_iters=1)),
]


@pytest.mark.parametrize("num_layers, nprocs, options", GRID)
def test_model_counts_are_the_measured_counts_of_every_rank(num_layers, nprocs, options):
    config = xbt.MGRITConfig(**options)
    measured = emulate(measured_counts, nprocs, num_layers, options)
    model = cost_model(num_layers, nprocs, config.levels, config.cfactor, config.fwd_iters,
                       config.bwd_iters, relax=config.relax,
                       skip_first_downcycle=config.skip_first_downcycle, cycle=config.cycle)
    assert [as_tuple(c) for c in model["per_rank"]] == measured


def test_critical_path_adds_the_whole_coarsest_chain_to_the_busiest_rank():
    """64 layers on 3 ranks, 2 levels, cfactor 4, F-relaxation, no skip, one iteration each
    way: blocks of 24, 20 and 20 layers (``partition``; 6, 5, 5 coarse intervals). The busiest
    rank spends
    per solve 18 F-points + 6 residuals (fine) + 6 right-hand sides (coarse) before the
    coarsest level, then waits for the whole chain of 16 coarse steps and 2 hops, then the final
    sweep of 24: 18 + 6 + 6 + 16 + 24 = 70 steps and 2 hops. Adjoint steps cost 2, hops 0.5."""
    model = cost_model(64, 3, 2, 4, 1, 1, relax="F", skip_first_downcycle=False, hop_cost=0.5,
                       partition=[24, 20, 20])
    assert model["parallel"] == pytest.approx(3 * 70 + 2 * 2 * 0.5)
    assert model["phases"]["adjoint coarsest"] == pytest.approx(2 * 16 + 2 * 0.5)
    assert model["serial"] == pytest.approx(3 * 64)


def test_step_costs_price_every_phase_of_the_critical_path():
    """The case above with measured-style prices: forward 1, its final sweep 3 (recording),
    adjoint 5, its final sweep 7, serial layer 10. Forward: 18 + 6 + 6 + 16 at 1, 24 at 3
    = 118; adjoint: 46 at 5 + 24 at 7 = 398; serial 640."""
    costs = dict(forward=1.0, forward_final=3.0, adjoint=5.0, adjoint_final=7.0, serial=10.0)
    model = cost_model(64, 3, 2, 4, 1, 1, relax="F", skip_first_downcycle=False, step_costs=costs,
                       partition=[24, 20, 20])
    assert model["phases"]["forward final"] == pytest.approx(72)
    assert model["phases"]["adjoint final"] == pytest.approx(168)
    assert model["parallel"] == pytest.approx(118 + 398)
    assert model["speedup"] == pytest.approx(640 / 516)


def test_f_intervals_across_ranks_are_chains_on_the_critical_path():
    """8 layers on 3 ranks (blocks 0-3, 3-6, 6-8), 2 levels, cfactor 4, F-relaxation, no skip,
    one iteration each way, hops of 0.5. Forward: the F-interval 0-3 lies on rank 0 (3 steps);
    rank 1 F-relaxes 4-6 (2 steps), then waits for rank 0's point 3 (3 + hop); rank 2 waits
    for rank 1's point 6 (sent at 2, arrives 2 + hop) and relaxes 6-7: the sweep ends at
    3 + hop. Residual at the C-points: 1 (ranks 1 and 2 one each), coarse right-hand sides 1
    (the coarse intervals start at layers 0 and 4: ranks 0 and 1), the coarsest chain 2 steps
    and 1 hop, the final sweep 3 + hop and 1: 11 + 3 hops. The adjoint (blocks 0-2, 2-5, 5-8
    in its own order; coarse intervals on the ranks of their first layer, 4 and 0: ranks 1
    and 0, its positions 1 and 2) gives the same: 2 x 11 + 3 hops. Total 33 + 6 x 0.5. Per
    rank, each way: rank 0 relaxes 3 F-points twice, rank 1 2 F- and 1 C-point twice, rank 2
    1 and 1; ranks 0 and 1 each own one coarse interval (a right-hand side and a chain step)."""
    model = cost_model(8, 3, 2, 4, 1, 1, relax="F", skip_first_downcycle=False, hop_cost=0.5)
    assert model["phases"]["forward relax"] == pytest.approx(3.5)
    assert model["phases"]["forward coarsest"] == pytest.approx(2.5)
    assert model["phases"]["adjoint relax"] == pytest.approx(6.5)
    assert model["parallel"] == pytest.approx(36.0)
    assert [as_tuple(c) for c in model["per_rank"]] == [(6, 2, 6, 2), (6, 2, 6, 2), (4, 0, 4, 0)]

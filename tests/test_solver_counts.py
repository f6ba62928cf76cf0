"""The solver spends exactly XBraid's layer evaluations, forward and adjoint.

Oracle: ``tests/data/xbraid_counts.json``, XBraid's own forward evaluation counts on 32 layers
(C core, one rank, tol 0, zero initial guess, final F-then-C sweep included) for 48 settings,
as given in issue 14; it was not produced by this project's code. A fine evaluation has the
step h, a coarse one a larger step (all coarser levels together).
"""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import xbraid_transformers as xbt

TABLE = json.loads((Path(__file__).parent / "data" / "xbraid_counts.json").read_text())
ROWS = TABLE["rows"]


def row_id(row):
    skip = "skip" if row["skip"] else "noskip"
    return f"L{row['levels']}-m{row['cfactor']}-{row['relax']}-{skip}-it{row['iterations']}"


def tanh_rhs(layer, x):
    return torch.tanh(layer(x))


def training_step_counts(num_layers, config):
    """Counts of one forward and backward through a layer-parallel stack on one process."""
    torch.manual_seed(0)
    stack = xbt.LayerParallel([nn.Linear(4, 4) for _ in range(num_layers)], rhs=tanh_rhs,
                              mgrit=config)
    x = torch.randn(2, 4, requires_grad=True)
    stack(x).square().sum().backward()
    return stack.counts


def test_the_table_is_xbraids_48_settings():
    assert TABLE["problem"]["num_steps"] == 32
    assert len(ROWS) == 48
    assert len({row_id(r) for r in ROWS}) == 48


@pytest.mark.parametrize("row", ROWS, ids=[row_id(r) for r in ROWS])
def test_forward_and_adjoint_spend_xbraids_evaluations(row):
    config = xbt.MGRITConfig(levels=row["levels"], cfactor=row["cfactor"], relax=row["relax"],
                             skip_first_downcycle=row["skip"], fwd_iters=row["iterations"],
                             bwd_iters=row["iterations"], tol=0.0, initial_guess="zeros")
    counts = training_step_counts(TABLE["problem"]["num_steps"], config)
    assert (counts.forward_fine, counts.forward_coarse) == (row["fine"], row["coarse"])
    assert (counts.adjoint_fine, counts.adjoint_coarse) == (row["fine"], row["coarse"])


def test_f_cycle_relaxes_each_intermediate_level_once_per_interpolation():
    """F-cycles are ours (XBraid's FMG is another cycle), so the oracle is derived by hand.
    32 layers, 3 levels, cfactor 2, F-relaxation, no skip, one iteration (levels have 32, 16
    and 8 intervals):
      level 0: relax 16 fine; residual 16 fine + right-hand side 16 coarse
      F-cycle from level 1: relax 8, residual 8 + 8, coarsest chain 8, one more coarsest
        V-cycle 8 (the coarsest level is never F-relaxed): 40 coarse
      V-cycle from level 1: relax 8, residual 8 + 8, chain 8: 32 coarse
      interpolation to level 0: F-relax level 1 once: 8 coarse
      final F-then-C sweep: 32 fine
    fine 16 + 16 + 32 = 64, coarse 16 + 40 + 32 + 8 = 96."""
    config = xbt.MGRITConfig(levels=3, cfactor=2, relax="F", cycle="F", skip_first_downcycle=False,
                             fwd_iters=1, bwd_iters=1, initial_guess="zeros")
    counts = training_step_counts(32, config)
    assert (counts.forward_fine, counts.forward_coarse) == (64, 96)
    assert (counts.adjoint_fine, counts.adjoint_coarse) == (64, 96)

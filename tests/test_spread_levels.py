"""Coarse levels spread over the ranks as XBraid spreads them: any hierarchy that fits the
layers runs on any number of ranks up to the number of layers, with balanced fine blocks, and
gives bit-identical outputs and gradients to one process.

Oracle: the same stack run on one process (itself checked against autograd in
test_layer_parallel.py). Ranks are threads (``emulate``) for a grid of layouts, and gloo
processes for the settings that needed at least one coarsest interval per rank before
(16 layers, 3 levels, cfactor 4 on 4 processes; 2 levels, cfactor 8 on 4 processes).
"""
import dist_utils as du
import pytest
import torch
from torch import nn

import xbraid_transformers as xbt
from xbraid_transformers.distributed import spawn
from xbraid_transformers.mgrit.layout import Layout
from xbraid_transformers.perf import emulate


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # the workers use one thread: the same reduction order
    yield
    torch.set_num_threads(threads)


def assert_identical(results, reference, num_layers, balanced=True):
    owned = []
    for rank, got in enumerate(results):
        assert torch.equal(got["out"], reference["out"]), f"output of rank {rank}"
        assert torch.equal(got["dx"], reference["dx"]), f"input gradient of rank {rank}"
        assert set(got["grads"]) <= set(reference["grads"])
        for name, grad in got["grads"].items():
            assert torch.equal(grad, reference["grads"][name]), f"{name} on rank {rank}"
        owned += got["owned"]
    assert owned == list(range(num_layers))          # every layer on exactly one rank
    if balanced:
        assert max(len(r["owned"]) for r in results) == -(-num_layers // len(results))


# (layers, ranks, options); the coarsest level has fewer intervals than there are ranks in all
# but the first, blocks cut coarse intervals, F-intervals run over several ranks
GRID = [
    (12, 4, dict(levels=2, cfactor=2, fwd_iters=2, bwd_iters=1)),
    (16, 4, dict(levels=3, cfactor=4, fwd_iters=2, bwd_iters=2)),
    (16, 4, dict(levels=2, cfactor=8, fwd_iters=2, bwd_iters=2, relax="F")),
    (16, 7, dict(levels=3, cfactor=2, fwd_iters=3, bwd_iters=2, cycle="F")),
    (16, 16, dict(levels=3, cfactor=4, fwd_iters=2, bwd_iters=1)),
    (24, 5, dict(levels=3, cfactor=[2, 3], relax=["F", "FCFCF"], fwd_iters=2, bwd_iters=2,
                 skip_first_downcycle=False)),
    (32, 6, dict(levels=4, cfactor=2, fwd_iters=2, bwd_iters=2, initial_guess="zeros")),
    (8, 3, dict(levels=2, cfactor=8, fwd_iters=8, bwd_iters=8)),
]


@pytest.mark.parametrize("num_layers, nprocs, options", GRID)
def test_emulated_ranks_equal_one_process(num_layers, nprocs, options):
    reference = du.spread_worker(None, num_layers, options)
    results = emulate(du.spread_worker, nprocs, num_layers, options, timeout=60.0)
    assert_identical(results, reference, num_layers)


@pytest.mark.parametrize("partition", [[1, 6, 1], [5, 2, 1], [2, 1, 5]])
def test_any_partition_in_layers_equals_one_process(partition):
    """The user's own block sizes, in multiples of one layer: a rank with a single layer, a
    rank that owns no coarse interval, coarse intervals cut on both sides."""
    options = dict(levels=3, cfactor=2, fwd_iters=2, bwd_iters=2, relax="F")
    reference = du.spread_worker(None, 8, options)
    results = emulate(du.spread_worker, 3, 8, options, partition, timeout=60.0)
    assert [len(r["owned"]) for r in results] == partition
    assert_identical(results, reference, 8, balanced=False)


def test_converged_spread_solve_is_the_serial_network():
    """8 iterations of 2 levels with cfactor 8 on 8 layers are exact: the spread solve on 3
    ranks gives the serial pass through autograd to round-off, not only the one-process solve."""
    options = dict(levels=2, cfactor=8, fwd_iters=8, bwd_iters=8)
    results = emulate(du.spread_worker, 3, 8, options, timeout=60.0)
    serial = du.spread_worker(None, 8, dict(levels=1))
    torch.testing.assert_close(results[0]["out"], serial["out"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0]["dx"], serial["dx"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options", [dict(levels=3, cfactor=4, fwd_iters=2, bwd_iters=1),
                                     dict(levels=2, cfactor=8, fwd_iters=1, bwd_iters=1)])
def test_settings_that_needed_a_coarsest_interval_per_rank_run_over_gloo(options):
    """16 layers on 4 gloo processes: 1 coarsest interval (3 levels, cfactor 4) or 2 (cfactor
    8); both were a ValueError when every rank had to own whole coarsest intervals."""
    reference = du.spread_worker(None, 16, options)
    results = spawn(du.spread_worker, 4, 16, options, timeout=30.0)
    assert_identical(results, reference, 16)


def test_layout_puts_each_coarse_interval_on_the_rank_of_its_anchor_layer():
    """16 layers on 3 ranks (blocks 0-6, 6-11, 11-16), cfactor 4, 3 levels."""
    blocks = [(0, 6), (6, 11), (11, 16)]
    forward = Layout(16, blocks, (4, 4), "first")
    # level 1: intervals starting at layers 0, 4 (rank 0), 8 (rank 1), 12 (rank 2)
    assert forward.ranges[1] == [(0, 2), (2, 3), (3, 4)]
    assert forward.ranges[2] == [(0, 1), (1, 1), (1, 1)]       # one interval, on rank 0
    assert forward.active(2) == [0] and forward.producer(1, 4) == 2 and forward.producer(0, 0) == 0
    # the adjoint's positions run the ranks backwards; an interval belongs to its last fine
    # step in that order, the same layer: layers 12, 8, 4, 0 are positions 0, 1, 1, 2
    adjoint = Layout(16, [(0, 5), (5, 10), (10, 16)], (4, 4), "last")
    assert adjoint.ranges[1] == [(0, 1), (1, 2), (2, 4)]
    assert adjoint.ranges[2] == [(0, 0), (0, 0), (0, 1)]
    assert (adjoint.previous(1, 2), adjoint.next(1, 0), adjoint.next(2, 2)) == (1, 1, None)
    with pytest.raises(ValueError, match="contiguous"):
        Layout(16, [(0, 6), (7, 16)], (4,))


def _walks_of_other_layers(comm):
    """A call on a rank of 4 (16 layers): how often the call visits the layers of other ranks
    (their placeholders' parameters) and its own."""
    torch.manual_seed(du.SEED)
    stack = xbt.LayerParallel([nn.Linear(4, 4) for _ in range(16)],
                              mgrit=xbt.MGRITConfig(levels=2, cfactor=4), comm=comm)
    visits = {"own": 0, "other": 0}
    for n, layer in enumerate(stack.layers):
        kind = "own" if n in stack.owned_layers else "other"
        walk = layer.parameters

        def counted(*args, _walk=walk, _kind=kind, **kwargs):
            visits[_kind] += 1
            return _walk(*args, **kwargs)
        layer.parameters = counted
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
    stack(x).sum().backward()
    return visits


def test_a_call_visits_only_the_layers_of_its_own_rank():
    """The per-call setup is O(N / P): no rank walks the placeholders of the others' layers."""
    for visits in emulate(_walks_of_other_layers, 4, timeout=60.0):
        assert visits["other"] == 0 and visits["own"] == 4

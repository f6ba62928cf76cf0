"""Performance accounting, in one public place: step counts, virtual clocks, the cost model.

``attach_clock`` puts a model's layer-parallel stacks on one virtual clock per process; the
pieces it uses live where they belong (the clock beside the communicators in ``mgrit``, the
counts and the cost model in ``core``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .core.cost_model import cost_model
from .core.counts import StepCounts
from .core.layer_parallel import find_stacks
from .mgrit.clock import INFINIBAND, NVLINK, ClockedComm, LinkModel, VirtualClock, emulate

__all__ = ["StepCounts", "VirtualClock", "LinkModel", "NVLINK", "INFINIBAND", "ClockedComm",
           "attach_clock", "emulate", "cost_model"]


def attach_clock(model: torch.nn.Module, link: LinkModel = NVLINK,
                 clock: Optional[VirtualClock] = None) -> VirtualClock:
    """Measure ``model``'s virtual time in a real run: every LayerParallel stack split over
    several ranks talks through a ``ClockedComm`` that shares one clock per process, so that
    this rank's clock is its own CPU time plus waits for messages under the ``link`` model
    (the time the run would take with a core or device per rank). ``clock.tick()`` brings
    the clock up to date; ``sync_clock`` makes it the latest over the ranks. CPU runs only:
    CUDA kernels run asynchronously to the CPU clock."""
    clock = clock or VirtualClock()

    def clocked(comm):
        if isinstance(comm, ClockedComm):      # an emulated rank: keep its compute gate
            return ClockedComm(comm.inner, link, gate=comm.gate, clock=clock)
        return ClockedComm(comm, link, clock=clock)

    for stack in find_stacks(model):
        if stack.comm.size > 1:
            stack.wrap_comm(clocked)
    return clock

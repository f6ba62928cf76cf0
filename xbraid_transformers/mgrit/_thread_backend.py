"""The thread backend: ranks as threads of one process (emulation, benchmarks)."""
from __future__ import annotations

import queue
import threading
from typing import List, Optional

import torch

from .comm import Communicator, default_timeout, wait_failure

__all__ = ["ThreadWorld", "ThreadComm"]


class ThreadWorld:
    """Shared state of ``size`` ranks run as threads of one process (emulation, benchmarks)."""

    def __init__(self, size: int, timeout: Optional[float] = None):
        self.size = size
        self.timeout = default_timeout(timeout)
        self.queues = {(s, d): queue.Queue() for s in range(size) for d in range(size)}
        self.barrier = threading.Barrier(size)
        self.slots: List[Optional[torch.Tensor]] = [None] * size

    def comm(self, rank: int) -> "ThreadComm":
        return ThreadComm(self, rank)


class ThreadComm(Communicator):
    """Rank ``rank`` of a ``ThreadWorld``; collectives reduce in rank order (deterministic)."""

    def __init__(self, world: ThreadWorld, rank: int):
        self.world, self.rank, self.size, self.timeout = world, rank, world.size, world.timeout

    def isend(self, tensor, dst):
        self.world.queues[(self.rank, dst)].put(tensor.detach().clone())

    def recv(self, like, src):
        try:
            return self.world.queues[(src, self.rank)].get(timeout=self.timeout)
        except queue.Empty:
            raise wait_failure(self, "a receive", src) from None

    def _gather(self, tensor, what) -> List[torch.Tensor]:
        world = self.world
        try:
            world.slots[self.rank] = tensor.detach().clone()
            world.barrier.wait(self.timeout)
            out = list(world.slots)
            world.barrier.wait(self.timeout)
        except threading.BrokenBarrierError:
            raise wait_failure(self, what, None) from None
        return out

    def allreduce(self, tensor, op="sum"):
        parts = self._gather(tensor, "an all-reduce")
        out = parts[0].clone()
        for p in parts[1:]:
            out = out + p if op == "sum" else torch.maximum(out, p)
        return out

    def broadcast(self, tensor, root):
        return self._gather(tensor, "a broadcast")[root].clone()

    def allgather(self, tensor):
        return [t.clone() for t in self._gather(tensor, "an all-gather")]

    def flush(self):
        """Queues deliver at once: no send is pending."""

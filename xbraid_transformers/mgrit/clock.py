"""Virtual time: per-rank clocks, a link model for messages, and ranks emulated as threads.

A ``ClockedComm`` wraps any communicator; it needs nothing above the solver, so the emulator
runs the real layer-parallel code with one thread per rank and measures the time a run would
take with a core or device per rank (see docs/algorithm.md, "Cost model and virtual time").
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

from .comm import Communicator
from .comm_backends import ThreadWorld

__all__ = ["LinkModel", "NVLINK", "INFINIBAND", "VirtualClock", "ClockedComm", "RANK_THREAD",
           "emulate"]


@dataclass
class LinkModel:
    """Point-to-point cost of a message: ``latency + bytes / bandwidth`` seconds.

    Defaults are NVLink-class (GPUs of one node, NCCL p2p: ~5 us, ~150 GB/s effective);
    ``INFINIBAND`` is an HDR link between nodes (~10 us, ~23 GB/s effective)."""

    latency: float = 5e-6
    bandwidth: float = 150e9

    def cost(self, nbytes: int, hops: int = 1) -> float:
        return hops * self.latency + nbytes / self.bandwidth


NVLINK = LinkModel()
INFINIBAND = LinkModel(latency=10e-6, bandwidth=23e9)


class VirtualClock:
    """Virtual time of one rank: its CPU time between communications, plus message arrival
    times from the senders' clocks. ``timer``: ``time.thread_time`` (default) for a rank with
    one torch thread, ``time.process_time`` for a process with several."""

    def __init__(self, timer: Callable[[], float] = time.thread_time):
        self.timer = timer
        self.time = 0.0
        self.compute = 0.0
        self.messages = 0
        self.bytes = 0
        self._mark = timer()

    def tick(self) -> None:
        now = self.timer()
        self.time += now - self._mark
        self.compute += now - self._mark
        self._mark = now

    def resume(self) -> None:
        self._mark = self.timer()

    def reset(self) -> None:
        self.time = self.compute = 0.0
        self.messages = self.bytes = 0
        self._mark = self.timer()


class ClockedComm(Communicator):
    """Wraps a communicator: every message carries the sender's virtual time; a receive sets
    ``clock = max(own, sender + latency + bytes / bandwidth)``; collectives take the latest
    clock plus a tree of ``ceil(log2 P)`` hops.

    ``gate``: a lock that a rank holds while it computes and releases while it waits for
    others, so that emulated ranks compute one at a time: with more busy threads than cores
    (and the GIL between torch calls), thread CPU times were measured up to twice too large."""

    def __init__(self, inner: Communicator, link: LinkModel = NVLINK, gate=None,
                 clock: Optional[VirtualClock] = None):
        self.inner, self.link, self.clock = inner, link, clock or VirtualClock()
        self.gate = gate
        self.rank, self.size, self.timeout, self.device = inner.rank, inner.size, inner.timeout, inner.device
        self._hops = max(1, math.ceil(math.log2(max(self.size, 2))))

    def _stamp(self, *values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64, device=self.device)

    def isend(self, tensor, dst):
        self.clock.tick()
        nbytes = tensor.numel() * tensor.element_size()
        self.inner.isend(tensor, dst)
        self.inner.isend(self._stamp(self.clock.time, nbytes), dst)
        self.clock.messages += 1
        self.clock.bytes += nbytes
        self.clock.resume()

    @contextlib.contextmanager
    def _waiting(self):
        """Around a blocking call: the compute gate is free meanwhile."""
        if self.gate is None:
            yield
            return
        self.gate.release()
        try:
            yield
        finally:
            self.gate.acquire()

    def recv(self, like, src):
        self.clock.tick()
        with self._waiting():
            value = self.inner.recv(like, src)
            sent, nbytes = self.inner.recv(self._stamp(0.0, 0.0), src).tolist()
        self.clock.time = max(self.clock.time, sent + self.link.cost(int(nbytes)))
        self.clock.resume()
        return value

    def _collective(self, nbytes: int) -> None:
        with self._waiting():
            latest = float(self.inner.allreduce(self._stamp(self.clock.time), "max")[0])
        self.clock.time = max(self.clock.time, latest + self.link.cost(nbytes, 2 * self._hops))

    def allreduce(self, tensor, op="sum"):
        self.clock.tick()
        with self._waiting():
            out = self.inner.allreduce(tensor, op)
        self._collective(tensor.numel() * tensor.element_size())
        self.clock.resume()
        return out

    def allgather(self, tensor):
        self.clock.tick()
        with self._waiting():
            out = self.inner.allgather(tensor)
        self._collective(self.size * tensor.numel() * tensor.element_size())
        self.clock.resume()
        return out

    def broadcast(self, tensor, root):
        self.clock.tick()
        with self._waiting():
            sent = float(self.inner.broadcast(self._stamp(self.clock.time), root)[0])
            out = self.inner.broadcast(tensor, root)
        if self.rank != root:
            nbytes = tensor.numel() * tensor.element_size()
            self.clock.time = max(self.clock.time, sent + self.link.cost(nbytes, self._hops))
        self.clock.resume()
        return out

    def flush(self):
        with self._waiting():
            self.inner.flush()

    def describe(self) -> str:
        return self.inner.describe()


#: emulated rank r runs in the thread named RANK_THREAD + str(r)
RANK_THREAD = "xbt-rank-"


class _RankGate:
    """The lock that lets one emulated rank compute at a time. Each rank also keeps its own
    state of torch's global random generator across the hand-overs (saved when it releases the
    gate, restored when it takes it back), so that threads behave like processes: a rank that
    seeds and draws is not disturbed by the draws of the ranks that ran while it waited."""

    def __init__(self):
        self._lock = threading.Lock()
        self._states: Dict[int, torch.Tensor] = {}

    def acquire(self) -> None:
        self._lock.acquire()
        state = self._states.pop(threading.get_ident(), None)
        if state is not None:
            torch.set_rng_state(state)

    def release(self) -> None:
        self._states[threading.get_ident()] = torch.get_rng_state()
        self._lock.release()


def emulate(fn: Callable[..., Any], nprocs: int, *args, link: LinkModel = NVLINK,
            timeout: float = 600.0) -> List[Any]:
    """Run ``fn(comm, *args)`` for ``nprocs`` ranks as threads of this process, each with a
    ``ClockedComm`` (``comm.clock`` is its virtual clock). Use ``torch.set_num_threads(1)``.
    Ranks compute one at a time (a ``_RankGate``, released while a rank waits for messages), so
    each rank's CPU time is measured as if it had a core to itself, and each rank keeps its own
    global random state, as a process would."""
    world = ThreadWorld(nprocs, timeout=timeout)
    results: List[Any] = [None] * nprocs
    errors: List[BaseException] = []

    gate = _RankGate()

    def run(rank):
        gate.acquire()
        try:
            results[rank] = fn(ClockedComm(world.comm(rank), link, gate), *args)
        except BaseException as error:   # re-raised in the caller below
            errors.append(error)
            world.barrier.abort()
        finally:
            gate.release()

    threads = [threading.Thread(target=run, args=(r,), name=f"{RANK_THREAD}{r}", daemon=True)
               for r in range(nprocs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results

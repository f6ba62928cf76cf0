"""Communicator backends: torch.distributed, mpi4py, and threads of one process.

All waits are bounded by the communicator's ``timeout``; a peer that died, hangs or runs a
different code path turns into ``CommunicationError`` on every rank that waits for it.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from datetime import timedelta
from typing import Callable, List, Optional, Tuple

import torch

from .comm import DEFAULT_TIMEOUT, CommunicationError, Communicator


def default_timeout(timeout: Optional[float] = None) -> float:
    """``timeout`` in seconds, else the environment variable ``XBT_TIMEOUT``, else the default;
    a value that is not a positive number is a ``ValueError`` naming where it came from."""
    if timeout is not None:
        source, text = "the communication timeout", timeout
    else:
        source, text = "the environment variable XBT_TIMEOUT", os.environ.get("XBT_TIMEOUT", DEFAULT_TIMEOUT)
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = None
    if value is None or not 0 < value < float("inf"):     # also rejects nan
        raise ValueError(f"{source} must be a positive, finite number of seconds, got {text!r}")
    return value


def _failure(comm: Communicator, what: str, peer, cause: Optional[BaseException] = None,
             started: Optional[float] = None):
    """The error of a failed wait. With a ``cause`` (the backend gave up: a peer's connection
    closed, its process died) the message says how long the wait lasted, not the timeout."""
    who = "" if peer is None else f" with rank {peer}"
    if cause is None:
        outcome = f"did not complete within {comm.timeout:g} s"
    else:
        waited = "" if started is None else f" after {time.monotonic() - started:.1f} s"
        outcome = f"failed{waited} ({cause})"
    return CommunicationError(
        f"{comm.describe()}: {what}{who} {outcome}; a process of the layer-parallel group died, "
        f"stopped answering, or runs a different operation (mismatched code path or configuration)")


# ---------------------------------------------------------------------- torch.distributed
class TorchComm(Communicator):
    """A torch.distributed process group (the default group, or a sub-group).

    Group ranks are mapped to global ranks for the point-to-point operations. With NCCL, tensors
    live on the current CUDA device.
    """

    def __init__(self, group=None, timeout: Optional[float] = None):
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call xbt.init_distributed() "
                               "(or torch.distributed.init_process_group) first")
        self.dist, self.group = dist, group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        if self.rank < 0:
            raise ValueError("this process is not a member of the process group given as comm")
        self.global_ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
        self.timeout = default_timeout(timeout)
        self.backend = dist.get_backend(group)
        if self.backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._pending: list = []

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size} (global rank {self.global_ranks[self.rank]})"

    def _wait(self, work, what: str, peer=None) -> None:
        started = time.monotonic()
        try:
            done = work.wait(timeout=timedelta(seconds=self.timeout))
        except Exception as error:   # gloo/NCCL raise RuntimeError or DistBackendError
            raise _failure(self, what, peer, error, started) from error
        if done is False:
            raise _failure(self, what, peer)

    def isend(self, tensor, dst):
        tensor = tensor.detach().contiguous()
        work = self.dist.isend(tensor, dst=self.global_ranks[dst], group=self.group)
        self._pending.append((work, tensor, dst))

    def recv(self, like, src):
        buf = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        self._wait(self.dist.irecv(buf, src=self.global_ranks[src], group=self.group), "a receive", src)
        self._pending = [p for p in self._pending if not p[0].is_completed()]
        return buf

    def flush(self):
        pending, self._pending = self._pending, []
        for work, _, dst in pending:
            self._wait(work, "a send", dst)

    def allreduce(self, tensor, op="sum"):
        out = tensor.detach().clone()
        ops = {"sum": self.dist.ReduceOp.SUM, "max": self.dist.ReduceOp.MAX}
        self._wait(self.dist.all_reduce(out, op=ops[op], group=self.group, async_op=True),
                   "an all-reduce")
        return out

    def broadcast(self, tensor, root):
        out = tensor.detach().contiguous().clone()
        self._wait(self.dist.broadcast(out, src=self.global_ranks[root], group=self.group,
                                       async_op=True), "a broadcast", root)
        return out

    def allgather(self, tensor):
        tensor = tensor.detach().contiguous()
        outs = [torch.empty_like(tensor) for _ in range(self.size)]
        self._wait(self.dist.all_gather(outs, tensor, group=self.group, async_op=True),
                   "an all-gather")
        return outs


# ---------------------------------------------------------------------- mpi4py
def _bytes(t: torch.Tensor):
    """A contiguous CPU copy of ``t`` and a uint8 numpy view of its memory (no pickling)."""
    t = t.detach().to("cpu", copy=True).contiguous()
    return t, t.reshape(-1).view(torch.uint8).numpy()


class MPIComm(Communicator):
    """An mpi4py communicator (``MPI.COMM_WORLD`` by default). Tensors travel as raw buffers;
    GPU tensors are staged through host memory. Waits poll with a deadline."""

    def __init__(self, comm=None, timeout: Optional[float] = None):
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = default_timeout(timeout)
        self._pending: list = []

    def _wait(self, request, what, peer=None):
        started = time.monotonic()
        deadline, delay = started + self.timeout, 0.0
        try:
            while not request.Test():
                if time.monotonic() > deadline:
                    raise _failure(self, what, peer)
                time.sleep(delay)
                delay = min(max(2 * delay, 1e-5), 1e-3)
        except self.MPI.Exception as error:
            raise _failure(self, what, peer, error, started) from error

    def isend(self, tensor, dst):
        keep, buf = _bytes(tensor)
        self._pending.append((self.comm.Isend(buf, dest=dst), keep, dst))

    def recv(self, like, src):
        out = torch.empty(like.shape, dtype=like.dtype)
        self._wait(self.comm.Irecv(out.reshape(-1).view(torch.uint8).numpy(), source=src),
                   "a receive", src)
        self._pending = [p for p in self._pending if not p[0].Test()]
        return out.to(like.device)

    def flush(self):
        pending, self._pending = self._pending, []
        for request, _, dst in pending:
            self._wait(request, "a send", dst)

    def allreduce(self, tensor, op="sum"):
        src = tensor.detach().to("cpu", copy=True).contiguous()
        out = torch.empty_like(src)
        ops = {"sum": self.MPI.SUM, "max": self.MPI.MAX}
        self._wait(self.comm.Iallreduce(src.numpy(), out.numpy(), op=ops[op]), "an all-reduce")
        return out.to(tensor.device)

    def broadcast(self, tensor, root):
        out, buf = _bytes(tensor)
        self._wait(self.comm.Ibcast(buf, root=root), "a broadcast", root)
        return out.to(tensor.device)

    def allgather(self, tensor):
        _, buf = _bytes(tensor)
        out = torch.empty((self.size,) + tuple(tensor.shape), dtype=tensor.dtype)
        self._wait(self.comm.Iallgather(buf, out.reshape(-1).view(torch.uint8).numpy()),
                   "an all-gather")
        return [t.to(tensor.device) for t in out.unbind(0)]


# ---------------------------------------------------------------------- threads
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
            raise _failure(self, "a receive", src) from None

    def _gather(self, tensor, what) -> List[torch.Tensor]:
        world = self.world
        try:
            world.slots[self.rank] = tensor.detach().clone()
            world.barrier.wait(self.timeout)
            out = list(world.slots)
            world.barrier.wait(self.timeout)
        except threading.BrokenBarrierError:
            raise _failure(self, what, None) from None
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


# How a communicator of another library becomes a Communicator: (name, accepts(obj) -> bool,
# wrap(obj) -> Communicator), tried in order by as_communicator; register_backend adds one.
BACKENDS: List[Tuple[str, Callable[[object], bool], Callable[[object], Communicator]]] = []


def register_backend(name: str, accepts: Callable[[object], bool],
                     wrap: Callable[[object], Communicator]) -> None:
    """Let ``comm=`` take the communicators ``accepts`` recognises, wrapped by ``wrap`` (a
    ``Communicator`` subclass implementing every primitive)."""
    BACKENDS.append((name, accepts, wrap))


def _is_process_group(comm) -> bool:
    import torch.distributed as dist
    return dist.is_available() and isinstance(comm, dist.ProcessGroup)


register_backend("torch.distributed", _is_process_group, TorchComm)
register_backend("mpi4py", lambda comm: type(comm).__module__.startswith("mpi4py"), MPIComm)


def as_communicator(comm) -> Communicator:
    """None (one process), a ``Communicator``, or a communicator of a registered backend (a
    torch.distributed process group, an mpi4py communicator, ...), as a ``Communicator``."""
    from .comm import SERIAL
    if comm is None:
        return SERIAL
    if isinstance(comm, Communicator):
        return comm
    for _, accepts, wrap in BACKENDS:
        if accepts(comm):
            return wrap(comm)
    raise TypeError(f"comm must be None, an xbt Communicator or a communicator of a registered "
                    f"backend ({', '.join(name for name, _, _ in BACKENDS)}), got "
                    f"{type(comm).__name__}")

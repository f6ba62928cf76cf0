"""The mpi4py backend: ``MPIComm`` over an MPI communicator, and what a job started by mpiexec
or srun needs (an unhandled error aborts the whole job; the rendezvous of torch.distributed
agreed through MPI)."""
from __future__ import annotations

import os
import socket
import sys
import time
from typing import Optional

import torch

from .comm import Communicator, default_timeout, wait_failure

__all__ = ["MPIComm", "start_mpi", "abort_on_unhandled_error", "torch_env_from_mpi"]


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
                    raise wait_failure(self, what, peer)
                time.sleep(delay)
                delay = min(max(2 * delay, 1e-5), 1e-3)
        except self.MPI.Exception as error:
            raise wait_failure(self, what, peer, error, started) from error

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


def start_mpi(choice: Optional[str], launcher: str, timeout: float) -> MPIComm:
    """The world of an mpiexec/srun launch as an mpi4py communicator (``MPI.COMM_WORLD``)."""
    try:
        comm = MPIComm(timeout=timeout)
    except ImportError as error:
        raise RuntimeError("started by mpiexec/srun but mpi4py is not installed: "
                           "pip install mpi4py (or launch with torchrun)") from error
    abort_on_unhandled_error()
    return comm


_ABORT = {"installed": False}


def abort_on_unhandled_error() -> None:
    """Make an unhandled exception abort the whole MPI job (as ``python -m mpi4py`` does).

    Otherwise the failing rank prints its error and then blocks in ``MPI_Finalize`` at exit,
    waiting for ranks that may never get there (one that hangs), and mpiexec never ends. The
    traceback is printed first; ``MPI_Abort`` then ends every rank with a non-zero code."""
    if _ABORT["installed"]:
        return
    from mpi4py import MPI
    previous = sys.excepthook

    def abort(kind, value, tb):
        try:
            previous(kind, value, tb)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            MPI.COMM_WORLD.Abort(1)
    sys.excepthook = abort
    _ABORT["installed"] = True


def torch_env_from_mpi() -> None:
    """The environment of ``torch.distributed.init_process_group`` (rank, world size and a
    rendezvous address that rank 0 chooses) agreed through MPI."""
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    address = None
    if world.Get_rank() == 0:
        address = (socket.gethostname(), _free_port())
    host, port = world.bcast(address, root=0)
    os.environ.update(RANK=str(world.Get_rank()), WORLD_SIZE=str(world.Get_size()),
                      MASTER_ADDR=os.environ.get("MASTER_ADDR", host),
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""Communication among the processes that share one layer-parallel solve.

The solver talks to its neighbours in *solve order* through four operations (``exchange``,
``recv_prev``, ``send_next``, ``allreduce_sum``); the adjoint solve runs in the reverse order
and uses ``comm.reversed()``, a view with the previous and next neighbours swapped.
``LayerParallel`` also needs ``broadcast``, ``allreduce`` and ``allgather``.

Backends implement six primitives on tensors, all abstract, so that a backend that forgets one
cannot be instantiated (nothing falls back to single-process behaviour quietly): ``isend``
(never blocks: a send may complete later, ``flush`` waits for all of them), ``recv``,
``allreduce``, ``broadcast`` and ``allgather``. Every wait is bounded by ``timeout`` seconds
and fails with ``CommunicationError``. A single process uses ``SERIAL`` (a ``SingleProcess``),
whose collectives return their input.
Backends: ``TorchComm`` (torch.distributed, gloo or NCCL, any process group), ``MPIComm``
(mpi4py, buffers) and ``ThreadComm`` (ranks as threads of one process, for emulation); see
``comm_backends``.
"""
from __future__ import annotations

import abc
import copy
import os
import time
from typing import List, Optional

import torch

__all__ = ["DEFAULT_TIMEOUT", "CommunicationError", "default_timeout", "wait_failure",
           "Communicator", "SingleProcess", "SERIAL"]

DEFAULT_TIMEOUT = 300.0
"""Seconds a process waits for a peer before it gives up (``XBT_TIMEOUT`` overrides it)."""


class CommunicationError(RuntimeError):
    """A peer did not answer within the timeout, died, or called a different operation."""


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


def wait_failure(comm: "Communicator", what: str, peer, cause: Optional[BaseException] = None,
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


class Communicator(abc.ABC):
    """Ranks ``0..size-1`` of one layer-parallel group; rank r owns the r-th block of layers.
    Subclasses implement the primitives below (docs/architecture.md, "A communication
    backend")."""

    rank = 0
    size = 1
    timeout: float = DEFAULT_TIMEOUT
    device = torch.device("cpu")
    _reversed_order = False

    # ------------------------------------------------------------------ solve order
    @property
    def prev(self) -> Optional[int]:
        """The rank owning the previous block in solve order (None on the first block)."""
        r = self.rank + (1 if self._reversed_order else -1)
        return r if 0 <= r < self.size else None

    @property
    def next(self) -> Optional[int]:
        r = self.rank + (-1 if self._reversed_order else 1)
        return r if 0 <= r < self.size else None

    @property
    def position(self) -> int:
        """This rank's place in solve order (its rank, or size - 1 - rank when reversed)."""
        return self.rank_at(self.rank)

    def rank_at(self, position: int) -> int:
        """The rank at ``position`` in solve order (the map is its own inverse)."""
        return self.size - 1 - position if self._reversed_order else position

    def reversed(self) -> "Communicator":
        """The same group with the solve order reversed (for the adjoint solve)."""
        view = copy.copy(self)
        view._reversed_order = not self._reversed_order
        return view

    # ------------------------------------------------------------------ solver operations
    def exchange(self, last: torch.Tensor) -> Optional[torch.Tensor]:
        """Send this block's last point to the next block; return the previous block's last
        point (None on the first block)."""
        if self.next is not None:
            self.isend(last, self.next)
        return None if self.prev is None else self.recv(last, self.prev)

    def recv_prev(self, like: torch.Tensor) -> torch.Tensor:
        """Receive the previous block's last point (shape and dtype of ``like``)."""
        return like if self.prev is None else self.recv(like, self.prev)

    def send_next(self, value: torch.Tensor) -> None:
        """Send ``value`` to the next block (nothing on the last block)."""
        if self.next is not None:
            self.isend(value, self.next)

    def allreduce_sum(self, value: float) -> float:
        if self.size == 1:
            return value
        return float(self.allreduce(torch.tensor([value], dtype=torch.float64, device=self.device))[0])

    # ------------------------------------------------------------------ primitives
    @abc.abstractmethod
    def isend(self, tensor: torch.Tensor, dst: int) -> None:
        """Start sending ``tensor`` to rank ``dst``; never blocks (``flush`` waits)."""

    @abc.abstractmethod
    def recv(self, like: torch.Tensor, src: int) -> torch.Tensor:
        """A tensor of ``like``'s shape and dtype from rank ``src``."""

    @abc.abstractmethod
    def allreduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Element-wise sum or max over the ranks (a new tensor, equal on every rank)."""

    @abc.abstractmethod
    def broadcast(self, tensor: torch.Tensor, root: int) -> torch.Tensor:
        """``tensor`` of rank ``root`` on every rank (others pass a tensor of the same shape)."""

    @abc.abstractmethod
    def allgather(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        """Every rank's ``tensor`` (same shape on all ranks), in rank order."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Wait until every pending send has completed."""

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size}"


class SingleProcess(Communicator):
    """This process alone: the collectives return their input, and there is no peer."""

    def isend(self, tensor, dst):
        raise CommunicationError(f"a single process has no rank {dst} to send to")

    def recv(self, like, src):
        raise CommunicationError(f"a single process has no rank {src} to receive from")

    def allreduce(self, tensor, op="sum"):
        return tensor

    def broadcast(self, tensor, root):
        return tensor

    def allgather(self, tensor):
        return [tensor]

    def flush(self):
        pass


SERIAL = SingleProcess()

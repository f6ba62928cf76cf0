"""The torch.distributed backend: ``TorchComm`` over a process group (gloo, NCCL), and how
``init_distributed`` starts one."""
from __future__ import annotations

import atexit
import os
import time
from datetime import timedelta
from typing import Optional

import torch

from .comm import Communicator, default_timeout, wait_failure

__all__ = ["TorchComm", "joined_torch", "start_torch"]


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
            raise wait_failure(self, what, peer, error, started) from error
        if done is False:
            raise wait_failure(self, what, peer)

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


def joined_torch(timeout: float) -> Optional[TorchComm]:
    """The world of a torch.distributed process group this process already joined (one the
    caller initialised), else None."""
    import torch.distributed as dist
    return TorchComm(timeout=timeout) if dist.is_available() and dist.is_initialized() else None


def start_torch(choice: Optional[str], launcher: str, timeout: float) -> TorchComm:
    """Join the world of a torchrun or mpiexec/srun launch through torch.distributed with the
    ``choice`` of its backends (default: NCCL when CUDA is available, else gloo)."""
    import torch.distributed as dist
    if launcher == "mpi":
        from ._mpi_backend import abort_on_unhandled_error, torch_env_from_mpi
        torch_env_from_mpi()
        abort_on_unhandled_error()
    if choice is None:
        choice = "nccl" if torch.cuda.is_available() else "gloo"
    if choice == "nccl":
        # A failed or stuck NCCL collective aborts the process instead of hanging.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    dist.init_process_group(choice, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]),
                            timeout=timedelta(seconds=timeout))
    _destroy_at_exit(dist.group.WORLD)
    return TorchComm(timeout=timeout)


def _destroy_at_exit(group) -> None:
    """Destroy the process group ``start_torch`` created when the interpreter exits (torchrun's
    recipe never does; NCCL warns of leaked resources and peers may wait on the store). A group
    the caller destroyed, or replaced by one of its own, is left alone."""
    import torch.distributed as dist

    def destroy():
        try:
            if dist.is_initialized() and dist.group.WORLD is group:
                dist.destroy_process_group()
        except Exception:   # exiting anyway: a peer that is already gone is no error here
            pass
    atexit.register(destroy)

"""Starting processes and finding the launcher.

- ``init_distributed()``: torchrun (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``), mpiexec/srun
  (OpenMPI ``OMPI_COMM_WORLD_*``, MPICH/Hydra ``PMI_RANK``/``PMI_SIZE``, Slurm
  ``SLURM_PROCID``/``SLURM_NTASKS`` with mpi4py) or a single process; returns the world
  ``Communicator``.
- ``spawn(fn, nprocs, *args)``: ``nprocs`` gloo processes on this machine (free port), each
  calling ``fn(comm, *args)``; returns their results, or raises ``SpawnError`` naming the rank
  that failed. Used by the tests and by ``xbt ... --nprocs``.
- ``layer_data_groups(layer_size)``: the sub-groups of layer x data parallelism.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, List, Optional

import torch

from ..mgrit.comm import SERIAL, Communicator
from ..mgrit.comm_backends import MPIComm, TorchComm, default_timeout


class SpawnError(RuntimeError):
    """A spawned process failed, or the processes did not finish in time."""


def detect_launcher() -> str:
    """What started this process: "torchrun", "mpi" (mpiexec, srun) or "single"."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env:
        return "torchrun"
    if any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
        return "mpi"
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "mpi"
    return "single"


def init_distributed(backend: Optional[str] = None, timeout: Optional[float] = None) -> Communicator:
    """Initialise communication for the launcher this process was started by.

    backend: for torchrun ``"gloo"`` or ``"nccl"`` (default: NCCL when CUDA is available); for
    mpiexec ``"mpi"`` (default, mpi4py) or ``"gloo"``/``"nccl"`` (torch.distributed, the
    rendezvous address agreed through MPI). timeout: seconds before a silent peer is an error
    (default ``XBT_TIMEOUT`` or 300). Returns the world communicator (``SERIAL`` alone).
    """
    import torch.distributed as dist
    timeout = default_timeout(timeout)
    if dist.is_available() and dist.is_initialized():
        return TorchComm(timeout=timeout)
    launcher = detect_launcher()
    if launcher == "single":
        return SERIAL
    if launcher == "mpi" and backend in (None, "mpi"):
        try:
            return MPIComm(timeout=timeout)
        except ImportError as error:
            raise RuntimeError("started by mpiexec/srun but mpi4py is not installed: "
                               "pip install mpi4py (or launch with torchrun)") from error
    if launcher == "mpi":
        _torch_env_from_mpi()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        # A failed or stuck NCCL collective aborts the process instead of hanging.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    dist.init_process_group(backend, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]),
                            timeout=timedelta(seconds=timeout))
    return TorchComm(timeout=timeout)


def _torch_env_from_mpi() -> None:
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    address = None
    if world.Get_rank() == 0:
        address = (socket.gethostname(), _free_port())
    host, port = world.bcast(address, root=0)
    os.environ.update(RANK=str(world.Get_rank()), WORLD_SIZE=str(world.Get_size()),
                      MASTER_ADDR=os.environ.get("MASTER_ADDR", host),
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))


def layer_data_groups(layer_size: int, timeout: Optional[float] = None):
    """Split the world into layer-parallel groups of ``layer_size`` consecutive ranks and
    data-parallel groups across them. Returns ``(layer_comm, data_group)``: the layer group as
    a ``Communicator`` and the data group as a torch.distributed process group (for DDP or an
    all-reduce of gradients). Every process must call it (it creates all groups)."""
    import torch.distributed as dist
    world = dist.get_world_size()
    if layer_size < 1 or world % layer_size:
        raise ValueError(f"layer_size={layer_size} must divide the world size {world}")
    rank, mine_layer, mine_data = dist.get_rank(), None, None
    for d in range(world // layer_size):
        ranks = list(range(d * layer_size, (d + 1) * layer_size))
        group = dist.new_group(ranks, timeout=timedelta(seconds=default_timeout(timeout)))
        if rank in ranks:
            mine_layer = group
    for l in range(layer_size):
        ranks = list(range(l, world, layer_size))
        group = dist.new_group(ranks, timeout=timedelta(seconds=default_timeout(timeout)))
        if rank in ranks:
            mine_data = group
    return TorchComm(mine_layer, timeout=timeout), mine_data


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, nprocs, port, timeout, threads, fn, args, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        torch.set_num_threads(threads)
        comm = init_distributed("gloo", timeout=timeout)
        value = fn(comm, *args)
        buffer = io.BytesIO()   # plain bytes: shared-memory tensors would die with the process
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException as error:   # report every failure to the parent, then exit non-zero
        results.put((rank, False, f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
        results.close()
        results.join_thread()   # the message must leave before the process does
        os._exit(1)
    import torch.distributed as dist
    try:
        dist.destroy_process_group()
    except Exception:
        pass


def spawn(fn: Callable[..., Any], nprocs: int, *args, timeout: Optional[float] = None,
          join_timeout: Optional[float] = None, threads: int = 1) -> List[Any]:
    """Run ``fn(comm, *args)`` in ``nprocs`` fresh gloo processes on this machine.

    fn must be picklable (a module-level function); its return values come back in rank
    order. timeout: the communication timeout of the workers (seconds). join_timeout: the
    whole run's limit (default ``timeout + 120``). When a process fails, the others get
    ``timeout + 2`` seconds to report their own errors before they are terminated; then
    ``SpawnError`` lists every rank's error. threads: torch threads per process.
    """
    if not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs must be a positive integer, got {nprocs!r}")
    timeout = default_timeout(timeout)
    join_timeout = timeout + 120 if join_timeout is None else join_timeout
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, nprocs, port, timeout, threads, fn, args, results),
                         daemon=True) for r in range(nprocs)]
    for p in procs:
        p.start()
    outcome: dict = {}
    deadline = time.monotonic() + join_timeout
    failed_at = None
    try:
        while len(outcome) < nprocs:
            now = time.monotonic()
            if now > deadline or (failed_at is not None and now > failed_at + timeout + 2):
                break
            try:
                rank, ok, value = results.get(timeout=0.2)
                outcome[rank] = (ok, value)
                if not ok and failed_at is None:
                    failed_at = time.monotonic()
                continue
            except queue.Empty:
                pass
            # processes that ended without a word (killed, os._exit) count as failed
            silent = [r for r, p in enumerate(procs) if r not in outcome and p.exitcode is not None]
            if silent and failed_at is None:
                failed_at = time.monotonic()
            if len(outcome) + len(silent) == nprocs:
                break
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
    errors = []
    for r, p in enumerate(procs):
        if r not in outcome:
            code = p.exitcode
            errors.append(f"rank {r}: " + ("did not finish in time (terminated)" if code in (None, -15)
                                            else f"exited with code {code} without a result"))
        elif not outcome[r][0]:
            errors.append(f"rank {r}: {outcome[r][1]}")
    if errors:
        raise SpawnError(f"{len(errors)} of {nprocs} spawned processes failed:\n" + "\n".join(errors))
    return [torch.load(io.BytesIO(outcome[r][1]), weights_only=False) for r in range(nprocs)]

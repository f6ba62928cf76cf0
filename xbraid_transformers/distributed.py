"""Starting processes, finding the launcher, and layout-free state dicts.

- ``init_distributed()``: torchrun (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``), mpiexec/srun
  (OpenMPI ``OMPI_COMM_WORLD_*``, MPICH/Hydra ``PMI_RANK``/``PMI_SIZE``, Slurm
  ``SLURM_PROCID``/``SLURM_NTASKS`` with mpi4py) or a single process; returns the world
  ``Communicator``.
- ``spawn(fn, nprocs, *args)``: ``nprocs`` gloo processes on this machine (free port), each
  calling ``fn(comm, *args)``; returns their results, or raises ``SpawnError`` naming the rank
  that failed. Used by the tests and by ``xbt ... --nprocs``.
- ``layer_data_groups(layer_size)``: the sub-groups of layer x data parallelism.
- ``gather_state_dict(model)``: the full state dict on rank 0 of the layer-parallel group.
- ``broadcast_replicated_(model)``: make the replicated parameters equal to rank 0's.
- ``gather_optimizer_state`` / ``load_optimizer_state``: an optimizer's state keyed by
  parameter name, whole on rank 0, loadable on any number of ranks.
- ``clip_grad_norm_(model, max_norm)``: gradient clipping by the whole model's norm.
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
from torch import nn

from .mgrit.comm import SERIAL, Communicator
from .mgrit.comm_backends import MPIComm, TorchComm, default_timeout
from .ownership import RemoteLayer


class SpawnError(RuntimeError):
    """A spawned process failed, or the processes did not finish in time."""


# ---------------------------------------------------------------------- launchers
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


# ---------------------------------------------------------------------- state dicts
def _stacks(model: nn.Module):
    from .layer_parallel import LayerParallel
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LayerParallel)]


def gather_state_dict(model: nn.Module) -> Optional[dict]:
    """The full, layout-free state dict of ``model`` on rank 0 of its layer-parallel group(s);
    None on the other ranks. Every rank must call it. The result loads into a serial model and
    into a model distributed over any number of ranks (each keeps its own layers)."""
    state = model.state_dict()
    rank0 = True
    for name, stack in _stacks(model):
        comm = stack.comm
        rank0 = rank0 and comm.rank == 0
        if comm.size == 1:
            continue
        for lo, hi in stack.blocks:
            for n in range(lo, hi):
                layer = stack.layers[n]
                prefix = f"{name}.layers.{n}." if name else f"layers.{n}."
                if isinstance(layer, RemoteLayer):
                    owner = layer.owner
                    entries = {k: torch.empty(shape, dtype=dtype, device=comm.device)
                               for k, (shape, dtype) in layer.entries.items()}
                else:
                    owner = comm.rank
                    entries = {k: v.to(comm.device) for k, v in layer.state_dict().items()}
                for key, value in entries.items():
                    value = comm.broadcast(value, root=owner)
                    if comm.rank == 0:
                        state[prefix + key] = value.cpu()
    if not rank0:
        return None
    return {k: v for k, v in sorted(state.items(), key=lambda kv: _natural(kv[0]))}


def _natural(key: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split(".")]


@torch.no_grad()
def broadcast_replicated_(model: nn.Module) -> nn.Module:
    """Copy rank 0's parameters and buffers outside the LayerParallel stacks (embeddings,
    heads, norms, buffer layers) to every rank of the layer-parallel group; the layers owned
    by each rank are left alone. Call it after building and initialising a model whose
    initialisation may draw different random numbers on different ranks."""
    stacks = _stacks(model)
    comm = _layer_comm(model)
    if comm.size == 1:
        return model
    inside = {id(t) for _, s in stacks for t in [*s.parameters(), *s.buffers()]}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in inside:
            t.copy_(comm.broadcast(t.to(comm.device), root=0))
    return model


def _layer_comm(model: nn.Module) -> Communicator:
    comms = [s.comm for _, s in _stacks(model) if s.comm.size > 1]
    return comms[0] if comms else SERIAL


def _allgather_objects(comm: Communicator, value) -> list:
    """Every rank's ``value`` (tensors and plain data), in rank order."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    sizes = [int(n) for n in comm.allgather(torch.tensor([data.numel()], device=comm.device))]
    padded = torch.zeros(max(sizes), dtype=torch.uint8)
    padded[: data.numel()] = data
    parts = comm.allgather(padded.to(comm.device))
    return [torch.load(io.BytesIO(part[:n].cpu().numpy().tobytes()), weights_only=True)
            for part, n in zip(parts, sizes)]


def gather_named(model: nn.Module, values: dict) -> Optional[dict]:
    """Per-parameter values keyed by parameter name, from every rank of the layer-parallel
    group, merged on rank 0 (None on the others; every rank must call it)."""
    comm = _layer_comm(model)
    if comm.size == 1:
        return dict(values)
    parts = _allgather_objects(comm, values)
    return {k: v for part in parts for k, v in part.items()} if comm.rank == 0 else None


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Optional[dict]:
    """``optimizer``'s state with parameters named as in ``model.named_parameters()``: on rank 0
    of the layer-parallel group, the state of every layer whichever rank owns it (None on the
    others; every rank must call it). The result loads with :func:`load_optimizer_state` on
    any number of ranks."""
    names = {id(p): n for n, p in model.named_parameters()}
    state = optimizer.state_dict()
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    per_param = gather_named(model, {order[i]: v for i, v in state["state"].items()})
    group_of = gather_named(model, {order[i]: k for k, g in enumerate(state["param_groups"])
                                    for i in g["params"]})
    if per_param is None:
        return None
    return {"state": per_param,
            "param_groups": [{**g, "params": [n for n, j in group_of.items() if j == k]}
                             for k, g in enumerate(state["param_groups"])]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a :func:`gather_optimizer_state` result: each rank takes the state of its own
    parameters (and every group's hyperparameters)."""
    names = {id(p): n for n, p in model.named_parameters()}
    index, groups = 0, []
    if len(state["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"the saved optimizer has {len(state['param_groups'])} parameter groups, "
                         f"this one {len(optimizer.param_groups)}")
    per_param = {}
    for saved, group in zip(state["param_groups"], optimizer.param_groups):
        ids = []
        for p in group["params"]:
            name = names[id(p)]
            if name not in saved["params"]:
                raise ValueError(f"the saved optimizer state has no parameter {name!r}")
            if name in state["state"]:
                per_param[index] = state["state"][name]
            ids.append(index)
            index += 1
        groups.append({**saved, "params": ids})
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a model whose LayerParallel stacks are split over
    ranks: the norm is that of the whole model's gradient (each layer counted once, on the rank
    that owns it; the replicated parameters once), the same on every rank, and so is the
    scaling. Returns the total norm (float32 scalar)."""
    if not norm_type >= 1:
        raise ValueError(f"norm_type must be >= 1 or inf, got {norm_type!r}")
    stacks = [s for _, s in _stacks(model)]
    inside = {id(p) for s in stacks for p in s.layers.parameters()}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    split = [p.grad for s in stacks for p in s.layers.parameters() if p.grad is not None]
    replicated = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in inside]
    comm = _layer_comm(model)
    infinite = norm_type == float("inf")

    def local(gs):
        if not gs:
            return torch.zeros((), dtype=torch.float64)
        if infinite:
            return torch.stack([g.detach().abs().max().double().cpu() for g in gs]).max()
        return sum(g.detach().double().norm(norm_type).cpu() ** norm_type for g in gs)

    mine = local(split).reshape(1)
    if comm.size > 1:
        mine = comm.allreduce(mine.to(comm.device), "max" if infinite else "sum").cpu()
    if infinite:
        total = torch.maximum(mine[0], local(replicated))
    else:
        total = (mine[0] + local(replicated)) ** (1.0 / norm_type)
    scale = float(max_norm) / (float(total) + 1e-6)
    if scale < 1:
        for g in grads:
            g.mul_(scale)
    return total.float()


# ---------------------------------------------------------------------- spawning
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

"""Starting processes and finding the launcher.

- ``init_distributed()``: torchrun (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``), mpiexec/srun
  (OpenMPI ``OMPI_COMM_WORLD_*``, MPICH/Hydra ``PMI_RANK``/``PMI_SIZE``, Slurm
  ``SLURM_PROCID``/``SLURM_NTASKS`` with mpi4py) or a single process; returns the world
  ``Communicator``.
- ``spawn(fn, nprocs, *args)``: ``nprocs`` gloo processes on this machine, each calling
  ``fn(comm, *args)``; returns their results, or raises ``SpawnError`` naming the rank that
  failed. Used by the tests and by ``xbt ... --nprocs``. The workers die with their parent
  (even when it is killed with SIGKILL); SIGTERM or SIGHUP to the parent stops them and raises
  ``SpawnInterrupted``. They meet through a file in a private temporary directory and talk over
  the loopback interface only: nothing listens on the network.

Under mpiexec an unhandled exception aborts the whole MPI job (so a rank that hangs cannot keep
it alive), and a process group that ``init_distributed`` created is destroyed at exit.
- ``layer_data_groups(layer_size)``: the sub-groups of layer x data parallelism.
"""
from __future__ import annotations

import ctypes
import io
import logging
import logging.handlers
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch

from ..mgrit.comm import SERIAL, CommunicationError, Communicator
from ..mgrit.comm_backends import BACKENDS, TorchComm, backend_to_start, default_timeout

__all__ = ["JOIN_GRACE", "RankFailure", "SpawnError", "SpawnInterrupted", "detect_launcher",
           "init_distributed", "layer_data_groups", "spawn"]


# spawn's default whole-run limit is the communication timeout plus this (seconds)
JOIN_GRACE = 120.0


@dataclass
class RankFailure:
    """How one spawned process failed: ``summary`` is one line ("ValueError: ..." or "killed by
    SIGKILL"); ``error`` the exception itself when it could be sent to the parent."""

    rank: int
    summary: str
    traceback: str = ""
    error: Optional[BaseException] = None
    silent: bool = False             # ended without a word (killed, os._exit) or was stopped

    @property
    def consequence(self) -> bool:
        """A communication failure, usually the consequence of another rank's failure."""
        return isinstance(self.error, CommunicationError)


class SpawnError(RuntimeError):
    """A spawned process failed, or the processes did not finish in time. ``failures`` lists
    the failed ranks, root cause first: ranks that ended without a word, then ranks with their
    own error, then ranks whose communication failed because of them."""

    def __init__(self, message: str, failures: Sequence[RankFailure] = ()):
        super().__init__(message)
        self.failures = list(failures)


class SpawnInterrupted(SpawnError):
    """The parent of spawned processes received SIGTERM or SIGHUP; the workers were stopped.
    ``signum`` is the signal (a command exits with ``128 + signum``, as a shell reports it)."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"received {signal.Signals(signum).name}: the spawned processes were stopped")
        self.failures = []


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
    rendezvous address agreed through MPI); the choices of any backend registered with
    ``register_backend(..., start=...)`` too. timeout: seconds before a silent peer is an error
    (default ``XBT_TIMEOUT`` or 300). Returns the world communicator (``SERIAL`` alone).
    """
    timeout = default_timeout(timeout)
    for known in BACKENDS:           # a world the caller set up already (a process group)
        comm = known.joined(timeout) if known.joined is not None else None
        if comm is not None:
            return comm
    launcher = detect_launcher()
    if launcher == "single":         # no peers, whatever the backend
        return SERIAL
    return backend_to_start(launcher, backend).start(backend, launcher, timeout)


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


def _loopback_interface() -> Optional[str]:
    """The name of the loopback interface ("lo" on Linux, "lo0" on macOS), if there is one."""
    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:
        return None
    return next((name for name in ("lo", "lo0") if name in names), None)


def _die_with_parent(parent_pid: int) -> None:
    """A spawned worker must not outlive the process that spawned it: a parent killed with
    SIGKILL cannot stop its workers, and they would train on unseen. On Linux the kernel sends
    the worker SIGKILL when its parent dies; everywhere a watchdog thread also notices the
    parent's death (the worker is re-parented) within half a second."""
    if sys.platform.startswith("linux"):
        try:
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):   # no prctl: the watchdog alone
            pass
    if os.getppid() != parent_pid:          # the parent died before the signal was armed
        os._exit(1)

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, name="xbt-parent-watchdog", daemon=True).start()


def _worker(rank, nprocs, parent_pid, init_method, timeout, threads, fn, args, results, logs):
    _die_with_parent(parent_pid)
    if logs is not None and rank == 0:      # rank 0 speaks through the parent's log handlers
        level, log_queue = logs
        root = logging.getLogger()
        root.setLevel(level)
        root.addHandler(logging.handlers.QueueHandler(log_queue))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1")
    loopback = _loopback_interface()
    if loopback:   # gloo's own sockets: the loopback interface, not the host's address
        os.environ["GLOO_SOCKET_IFNAME"] = loopback
    import torch.distributed as dist
    try:
        torch.set_num_threads(threads)
        # a FileStore in the parent's private directory: no listening socket for the rendezvous
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=nprocs,
                                timeout=timedelta(seconds=timeout))
        comm = TorchComm(timeout=timeout)
        value = fn(comm, *args)
        buffer = io.BytesIO()   # plain bytes: shared-memory tensors would die with the process
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException as error:   # report every failure to the parent, then exit non-zero
        results.put((rank, False, (f"{type(error).__name__}: {error}", traceback.format_exc(),
                                   _picklable(error))))
        results.close()
        results.join_thread()   # the message must leave before the process does
        os._exit(1)
    try:
        dist.destroy_process_group()
    except Exception:
        pass


def _picklable(error: BaseException) -> Optional[BaseException]:
    """The exception, if it survives the trip to the parent (its class importable there)."""
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:
        return None


def _exit_summary(code: Optional[int], over_time: Optional[float]) -> str:
    if code is None or code == -signal.SIGTERM:     # stopped by the clean-up
        return (f"did not finish within the run's limit of {over_time:g} s (join_timeout); stopped"
                if over_time is not None else "still running when another rank failed; stopped")
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code} without a result"


def _root_cause_first(failures: List[RankFailure]) -> List[RankFailure]:
    return sorted(failures, key=lambda f: (not f.silent, f.consequence, f.rank))


def spawn(fn: Callable[..., Any], nprocs: int, *args, timeout: Optional[float] = None,
          join_timeout: Optional[float] = None, threads: int = 1,
          forward_logs: bool = False) -> List[Any]:
    """Run ``fn(comm, *args)`` in ``nprocs`` fresh gloo processes on this machine.

    fn must be picklable (a module-level function); its return values come back in rank
    order. timeout: the communication timeout of the workers (seconds). join_timeout: the
    whole run's limit (default ``timeout + JOIN_GRACE``, a guard for tests; ``math.inf`` for none: a
    dead or hung peer is still caught by the per-operation timeout). When a process fails, the
    others get ``timeout + 2`` seconds to report their own errors before they are terminated;
    then ``SpawnError`` lists every rank's error, root cause first. threads: torch threads per
    process. forward_logs: rank 0's log records (at this process's root logger level) go
    through this process's log handlers, as if it logged them itself.

    The workers never outlive this process: they die with it (also when it is killed), and
    SIGTERM or SIGHUP received while waiting (in the main thread) terminates them and raises
    ``SpawnInterrupted``. Their rendezvous is a file in a private temporary directory.
    """
    if not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs must be a positive integer, got {nprocs!r}")
    timeout = default_timeout(timeout)
    join_timeout = timeout + JOIN_GRACE if join_timeout is None else join_timeout
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    log_queue = ctx.Queue() if forward_logs else None
    logs = None if log_queue is None else (logging.getLogger().getEffectiveLevel(), log_queue)
    rendezvous = tempfile.mkdtemp(prefix="xbt-spawn-")     # mode 0700: this user's only
    init_method = "file://" + os.path.join(rendezvous, "store")
    procs = [ctx.Process(target=_worker, args=(r, nprocs, os.getpid(), init_method, timeout, threads,
                                               fn, args, results, logs),
                         daemon=True) for r in range(nprocs)]
    outcome: dict = {}
    previous_handlers = _stop_on_signals()
    listener = None
    if log_queue is not None:
        listener = logging.handlers.QueueListener(log_queue, *logging.getLogger().handlers,
                                                  respect_handler_level=True)
        listener.start()
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + join_timeout
        failed_at = over_time = None
        while len(outcome) < nprocs:
            now = time.monotonic()
            if now > deadline:
                over_time = join_timeout
                break
            if failed_at is not None and now > failed_at + timeout + 2:
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
        # the old handlers first: a second signal during the clean-up then acts as usual, and
        # the workers still die with this process
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        _stop(procs)
        if listener is not None:
            listener.stop()
        shutil.rmtree(rendezvous, ignore_errors=True)
    failures = []
    for r, p in enumerate(procs):
        if r not in outcome:
            failures.append(RankFailure(r, _exit_summary(p.exitcode, over_time), silent=True))
        elif not outcome[r][0]:
            summary, trace, error = outcome[r][1]
            failures.append(RankFailure(r, summary, trace, error))
    if failures:
        failures = _root_cause_first(failures)
        raise SpawnError(f"{len(failures)} of {nprocs} spawned processes failed:\n" + "\n".join(
            f"rank {f.rank}: {f.summary}" + (f"\n{f.traceback}" if f.traceback else "")
            for f in failures), failures)
    return [torch.load(io.BytesIO(outcome[r][1]), weights_only=False) for r in range(nprocs)]


def _stop_on_signals() -> dict:
    """While the parent waits, SIGTERM and SIGHUP raise ``SpawnInterrupted`` (whose clean-up
    terminates the workers) instead of ending the parent alone. Only the main thread can set
    handlers; elsewhere the workers still die with the parent. Returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def interrupted(signum, frame):
        raise SpawnInterrupted(signum)
    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None:
            previous[signum] = signal.signal(signum, interrupted)
    return previous


def _stop(procs) -> None:
    """Terminate the workers still running (SIGTERM), then kill any that linger."""
    started = [p for p in procs if p.pid is not None]
    for p in started:
        if p.is_alive():
            p.terminate()
    for p in started:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)

"""The registry of communication backends: what ``comm=`` accepts (``as_communicator``) and how
``init_distributed`` joins the world of a launch (``backend_to_start``).

Each backend lives in a module of its own: torch.distributed (``_torch_backend``), mpi4py
(``_mpi_backend``) and ranks as threads of one process (``_thread_backend``). All waits are
bounded by the communicator's ``timeout``; a peer that died, hangs or runs a different code
path turns into ``CommunicationError`` on every rank that waits for it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Tuple

from ._mpi_backend import MPIComm, start_mpi
from ._thread_backend import ThreadComm, ThreadWorld
from ._torch_backend import TorchComm, joined_torch, start_torch
from .comm import Communicator, default_timeout

__all__ = ["Backend", "BACKENDS", "register_backend", "as_communicator", "backend_to_start",
           "default_timeout", "TorchComm", "MPIComm", "ThreadWorld", "ThreadComm"]


@dataclasses.dataclass(frozen=True)
class Backend:
    """One way for ranks to talk.

    name: what messages and the parity tests call it. accepts / wrap: ``comm=`` takes the
    objects ``accepts`` recognises (another library's communicator) as ``wrap(obj)``.
    start(choice, launcher, timeout): how ``init_distributed`` joins the world of a launch
    (``launcher``: "torchrun" or "mpi"), for ``backend=`` one of ``choices``, or ``None`` where
    the backend is the default of the launcher (``default_for``); ``starts_under`` lists the
    launchers it can join. joined(timeout): the world this process already joined through the
    backend (one the caller set up), else None. communicator: the ``Communicator`` subclass.
    """

    name: str
    accepts: Optional[Callable[[object], bool]] = None
    wrap: Optional[Callable[[object], Communicator]] = None
    start: Optional[Callable[[Optional[str], str, float], Communicator]] = None
    choices: Tuple[str, ...] = ()
    starts_under: Tuple[str, ...] = ()
    default_for: Tuple[str, ...] = ()
    joined: Optional[Callable[[float], Optional[Communicator]]] = None
    communicator: Optional[type] = None


#: The registered backends, in the order ``as_communicator`` and ``init_distributed`` try them.
BACKENDS: List[Backend] = []


def register_backend(name: str, accepts: Optional[Callable[[object], bool]] = None,
                     wrap: Optional[Callable[[object], Communicator]] = None, **launch) -> Backend:
    """Add a backend: ``comm=`` takes the communicators ``accepts`` recognises, wrapped by
    ``wrap`` (a ``Communicator`` subclass implementing every primitive); the keywords
    ``start``, ``choices``, ``starts_under``, ``default_for``, ``joined`` and ``communicator``
    (see ``Backend``) let ``init_distributed`` start it. Returns the entry."""
    if (accepts is None) != (wrap is None):
        raise ValueError(f"backend {name!r}: give both accepts and wrap, or neither")
    backend = Backend(name, accepts, wrap, **launch)
    if backend.start is None and (backend.choices or backend.starts_under or backend.default_for):
        raise ValueError(f"backend {name!r}: choices, starts_under and default_for need a start")
    BACKENDS.append(backend)
    return backend


def _is_process_group(comm) -> bool:
    import torch.distributed as dist
    return dist.is_available() and isinstance(comm, dist.ProcessGroup)


register_backend("torch.distributed", _is_process_group, TorchComm, start=start_torch,
                 choices=("gloo", "nccl"), starts_under=("torchrun", "mpi"),
                 default_for=("torchrun",), joined=joined_torch, communicator=TorchComm)
register_backend("mpi4py", lambda comm: type(comm).__module__.startswith("mpi4py"), MPIComm,
                 start=start_mpi, choices=("mpi",), starts_under=("mpi",), default_for=("mpi",),
                 communicator=MPIComm)
# ranks made by ThreadWorld(size).comm(rank) (or app.runs' emulation): nothing to wrap or start
register_backend("threads", communicator=ThreadComm)


def as_communicator(comm) -> Communicator:
    """None (one process), a ``Communicator``, or a communicator of a registered backend (a
    torch.distributed process group, an mpi4py communicator, ...), as a ``Communicator``."""
    from .comm import SERIAL
    if comm is None:
        return SERIAL
    if isinstance(comm, Communicator):
        return comm
    wrapping = [b for b in BACKENDS if b.accepts is not None]
    for backend in wrapping:
        if backend.accepts(comm):
            return backend.wrap(comm)
    raise TypeError(f"comm must be None, an xbt Communicator or a communicator of a registered "
                    f"backend ({', '.join(b.name for b in wrapping)}), got "
                    f"{type(comm).__name__}")


def backend_to_start(launcher: str, choice: Optional[str] = None) -> Backend:
    """The registered backend that joins the world of ``launcher`` for ``init_distributed(
    backend=choice)``: the one that lists ``choice``, or with ``choice=None`` the launcher's
    default. Anything else is a ``ValueError`` naming the choices there are."""
    able = [b for b in BACKENDS if launcher in b.starts_under]
    for backend in able:
        if (launcher in backend.default_for) if choice is None else (choice in backend.choices):
            return backend
    names = [c for b in able for c in b.choices]
    what = "no default backend" if choice is None else f"no backend {choice!r}"
    raise ValueError(f"{what} for a launch by {launcher}: choose one of "
                     f"{', '.join(names) or 'none registered'}")

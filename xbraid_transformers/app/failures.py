"""How the ``xbt`` command ends when something goes wrong: errors a user can act on (a bad
option or path, a checkpoint that does not fit, a full disk, memory, an interrupt) in one line
with the exit status a shell expects, also when a spawned rank raised them; everything else is
a bug and keeps its traceback."""
from __future__ import annotations

import os
import sys
from typing import Optional

from .checkpoint import CheckpointError
from .resume import ResumeError
from .rundir import CHECKPOINT, RunDirectoryInUse
from .tasks import TaskUnavailable

__all__ = ["USAGE_ERRORS", "actionable", "report", "interrupted"]


# errors in what the user gave (exit 2, as argparse's); OSError (a path and its cause) exits 1
USAGE_ERRORS = (TaskUnavailable, ResumeError, RunDirectoryInUse)


def interrupted(args, signal_name: str) -> str:
    """One line: the run stopped, and where to continue it from."""
    checkpoints = [os.path.join(d, CHECKPOINT) for d in getattr(args, "run_dirs", ())
                   if os.path.isfile(os.path.join(d, CHECKPOINT))]
    if args.command == "train" and checkpoints:
        where = (f"the last checkpoint is {checkpoints[0]}; continue with the same command and "
                 f"--resume")
    elif args.command == "train" and getattr(args, "run_dirs", None):
        where = ("no checkpoint was written (--checkpoint-every sets how often); start again "
                 "with --overwrite")
    elif args.command == "compare":
        where = "start again with --overwrite"
    elif args.command == "reproduce":
        where = f"the experiments that finished are in {args.out}"
    else:
        where = ""
    return f"xbt {args.command}: stopped by {signal_name}" + (f"; {where}" if where else "")


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.strerror}: {error.filename}"
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _out_of_memory(error: BaseException) -> bool:
    import torch
    return (isinstance(error, (MemoryError, torch.OutOfMemoryError))
            or (isinstance(error, RuntimeError) and "can't allocate memory" in str(error)))


def actionable(error: Optional[BaseException]) -> bool:
    """An error the user can act on, reported in one line (others are bugs: a traceback)."""
    return (isinstance(error, (KeyboardInterrupt, *USAGE_ERRORS, CheckpointError, OSError))
            or _out_of_memory(error))


def report(args, parser, error: BaseException) -> int:
    """The exit status and one-line message of an actionable error (raised here or in a spawned
    rank)."""
    if isinstance(error, KeyboardInterrupt):
        print(interrupted(args, "Ctrl-C"), file=sys.stderr, flush=True)
        return 130
    if isinstance(error, (*USAGE_ERRORS, CheckpointError)):
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")
    if isinstance(error, OSError):
        print(f"xbt {args.command}: error: {_one_line(error)}", file=sys.stderr, flush=True)
        return 1
    print(f"xbt {args.command}: error: out of memory ({_one_line(error)}); reduce --batch-size, "
          f"--seq-len or --layers, or spread the layers over more --nprocs", file=sys.stderr,
          flush=True)
    return 1

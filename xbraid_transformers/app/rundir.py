"""A run directory: its files (metrics records, summary, checkpoint) and the lock that keeps a
second run out of it.

:class:`RunFiles` writes a run's records (rank 0 only) and reads them back, skipping damaged
lines. The lock is an advisory ``flock`` on ``.xbt-lock`` in the directory, held by the process
that writes the run (the ``xbt`` command, or rank 0 under a launcher). The kernel drops it when
that process ends, however it ends, so a run that was killed never blocks the next one; the
file keeps the holder's pid, host and start time for the message a second run gets.
"""
from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import socket
from typing import List, Optional

from ..data.cache import atomic_write_text

__all__ = ["METRICS", "SUMMARY", "CHECKPOINT", "RUN_FILES", "RunDirectoryInUse", "RunLock", "RunFiles",
           "read_metrics", "read_run"]

logger = logging.getLogger(__name__)

METRICS, SUMMARY, CHECKPOINT = "metrics.jsonl", "summary.json", "checkpoint.pt"
RUN_FILES = (METRICS, SUMMARY, CHECKPOINT)
LOCK_FILE = ".xbt-lock"

try:
    import fcntl
except ImportError:          # not POSIX: runs are not locked
    fcntl = None


class RunDirectoryInUse(RuntimeError):
    """Another live process is writing a run into the directory."""


class RunLock:
    """``with RunLock(directory):`` holds the directory for one run, creating it if needed;
    raises :class:`RunDirectoryInUse` naming the holder when another process has it."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise NotADirectoryError(errno.ENOTDIR, "the output directory is a file", self.directory)
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "unknown"
                os.close(fd)
                raise RunDirectoryInUse(
                    f"{self.directory} is in use by another run ({holder}); wait for it to end, "
                    f"stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}, started {started}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)        # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RunFiles:
    """The files of one run in ``out_dir`` (None: no files); only the ``writer`` (rank 0)
    writes."""

    def __init__(self, out_dir: Optional[str], writer: bool):
        self.out_dir, self.writer = out_dir, writer

    def path(self, name: str) -> Optional[str]:
        """``out_dir/name`` (the directory created), None without an ``out_dir``."""
        if self.out_dir is None:
            return None
        os.makedirs(self.out_dir, exist_ok=True)
        return os.path.join(self.out_dir, name)

    def append_record(self, record: dict) -> None:
        path = self.path(METRICS)
        if path and self.writer:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, allow_nan=True) + "\n")

    def write_summary(self, summary: dict) -> None:
        path = self.path(SUMMARY)
        if path and self.writer:
            atomic_write_text(path, json.dumps(summary, indent=2, allow_nan=True))

    def trim_metrics(self, step: int, log_every: int) -> Optional[dict]:
        """On resuming at ``step``: drop the records of steps from ``step`` on (written after the
        checkpoint by a run that was then killed; they are replayed now) and damaged lines, and
        name the steps whose records are lost. Returns the last record kept (writer only)."""
        path = self.path(METRICS)
        if path is None or not self.writer or not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as handle:
            lines = [line for line in handle.read().splitlines() if line.strip()]
        kept = [r for r in read_metrics(path) if r["step"] < step]
        if len(kept) != len(lines):
            logger.info("%s: kept the %d records before step %d, dropped %d lines", path,
                        len(kept), step, len(lines) - len(kept))
            atomic_write_text(path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in kept))
        last = kept[-1]["step"] if kept else -1
        if step - 1 - last >= log_every:    # more than one logging interval is missing
            logger.warning("%s: the records of steps %d to %d are lost (the file was cut short); "
                           "the run continues from the checkpoint at step %d", path, last + 1,
                           step - 1, step)
        return kept[-1] if kept else None


def read_metrics(path: str) -> List[dict]:
    """The records of a metrics.jsonl; a line that is not a record (half-written when a run was
    killed, or edited by hand: no integer step, a number field that is not a number) is skipped
    with a warning naming its line, not an error after hours of training."""
    records, bad = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if _is_record(record):
                records.append(record)
            else:
                bad.append(number)
    if bad:
        logger.warning("%s: skipped %d damaged line(s): line %s", path, len(bad),
                       ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else ""))
    return records


# the number fields of a metrics record (absent, null or a number)
_NUMBERS = ("loss", "lr", "grad_norm", "time", "virtual_time", "eval_loss", "rho_forward",
            "rho_backward", "fwd_iters", "bwd_iters", "grad_error")


def _is_record(record) -> bool:
    def number(value):
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
    return (isinstance(record, dict) and isinstance(record.get("step"), int)
            and not isinstance(record["step"], bool)
            and all(number(record.get(key)) for key in _NUMBERS))


def read_run(out_dir: str) -> dict:
    """The summary of a finished run in ``out_dir`` with its metrics records as ``history``."""
    with open(os.path.join(out_dir, SUMMARY), encoding="utf-8") as handle:
        summary = json.load(handle)
    summary["history"] = read_metrics(os.path.join(out_dir, METRICS))
    return summary

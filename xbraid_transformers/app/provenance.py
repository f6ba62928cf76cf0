"""Which code, on which machine, by which command: the facts every results file carries.

Every JSON file under ``benchmarks/results/`` has a top-level ``"provenance"`` object made by
:func:`provenance`, and every Markdown results file a line made by :func:`provenance_line`, so
that a reader can tell a current figure from a stale one.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from typing import Optional, Sequence

__all__ = ["FIELDS", "UNKNOWN_COMMIT", "provenance", "provenance_line", "git_commit", "machine", "stamped",
           "write_json", "write_markdown"]

FIELDS = ("commit", "date", "machine", "command")
# the commit of a results file written before these facts were recorded
UNKNOWN_COMMIT = "unknown (before provenance was recorded)"

_SOURCE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def git_commit() -> str:
    """``git describe --always --dirty`` of the checkout this package is imported from."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=_SOURCE_DIR,
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown (git failed: {exc})"
    described = done.stdout.strip()
    return described if done.returncode == 0 and described else "unknown (not a git checkout)"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return ""


def machine() -> str:
    """The processor, core count, accelerator and torch build, in one line."""
    import torch

    cpu = _cpu_model() or platform.processor() or platform.machine()
    parts = [f"{platform.system()} {platform.machine()}", f"{os.cpu_count()} cores ({cpu})"]
    if torch.cuda.is_available():
        parts.append(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    else:
        parts.append("no GPU")
    parts.append(f"torch {torch.__version__}, python {platform.python_version()}")
    return ", ".join(parts)


def _program(path: str) -> str:
    """A command's first word as a reader would type it: a script of this checkout relative to its
    root (``benchmarks/memory.py``), a package run as a module (``-m pytest``), an installed
    console script by its name (``xbt``)."""
    if not os.path.isabs(path):
        path = os.path.abspath(path)
    if os.path.basename(path) == "__main__.py":   # python -m PACKAGE
        return "-m " + os.path.basename(os.path.dirname(path))
    inside = os.path.relpath(path, _SOURCE_DIR)
    if not inside.startswith(os.pardir) and path.endswith(".py"):
        return inside
    return os.path.basename(path)


def provenance(command: Optional[Sequence[str]] = None) -> dict:
    """The ``"provenance"`` object: commit, UTC date, machine and the command (``sys.argv`` by
    default) that produced a results file."""
    argv = list(sys.argv if command is None else command)
    if argv and (os.sep in argv[0] or argv[0].endswith(".py")):
        argv[0:1] = _program(argv[0]).split(" ", 1)
        if argv[0] == "-m" or argv[0].endswith(".py"):
            argv.insert(0, "python")
    return {"commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": machine(),
            "command": shlex.join(argv)}


def provenance_line(facts: dict) -> str:
    """The Markdown line carrying the same facts as a JSON file's ``"provenance"``."""
    return (f"*Provenance:* commit `{facts['commit']}`, {facts['date']}, {facts['machine']}; "
            f"command `{facts['command']}`.")


def stamped(data: dict, facts: dict) -> dict:
    """``data`` with ``"provenance"`` as its first key (a reader sees it before the numbers)."""
    if not isinstance(data, dict):
        raise TypeError(f"a results file's top level must be an object to carry provenance; got {type(data).__name__}")
    missing = [field for field in FIELDS if not facts.get(field)]
    if missing:
        raise ValueError(f"provenance lacks {', '.join(missing)}")
    return {"provenance": dict(facts), **{k: v for k, v in data.items() if k != "provenance"}}


def write_json(path: str, data: dict, facts: dict) -> None:
    """Write a JSON results file with its provenance."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(stamped(data, facts), handle, indent=1)
        handle.write("\n")


def write_markdown(path: str, text: str, facts: dict) -> None:
    """Write a Markdown results file ending in its provenance line."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text.rstrip("\n") + "\n\n" + provenance_line(facts) + "\n")

"""Checkpoints: layout-free, written atomically, loaded with ``torch.load(weights_only=True)``.

A checkpoint is one file holding plain data and tensors only: the full model state dict (every
layer, whatever the number of ranks that trained it), the optimizer and scheduler states, the
adaptive controller's state, the RNG states and the data position. It is written to a temporary
file in the target directory, flushed to disk and renamed over the target with ``os.replace``,
so a crash while writing never damages the previous checkpoint; temporary files that killed
writers left behind are removed by the next save. A SHA-256 of the content (every tensor's bytes
and every value) is stored in the file and verified on load, since torch's zip reader does not
notice a flipped bit in a tensor. Loading a damaged file raises :class:`CheckpointError` naming
the file and what is wrong.
"""
from __future__ import annotations

import glob
import hashlib
import os
import random
import tempfile
from typing import Any, Dict

import numpy as np
import torch

__all__ = ["FORMAT", "VERSION", "READABLE", "REQUIRED", "CHECKSUM", "CheckpointError",
           "CheckpointWriteError", "save_checkpoint", "load_checkpoint", "rng_state",
           "set_rng_state"]

FORMAT = "xbraid_transformers-checkpoint"
VERSION = 3   # 2: the optimizer state is keyed by parameter name; 3: a content checksum
READABLE = (2, 3)
REQUIRED = ("format", "version", "step", "model")
CHECKSUM = "content_sha256"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not a checkpoint of this package."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, file size limit, a directory in its
    place); the previous checkpoint at the path is intact."""


def save_checkpoint(path: str, state: Dict[str, Any]) -> str:
    """Write ``state`` (plus format and version tags) to ``path`` atomically; returns the path."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **state}
    payload[CHECKSUM] = _content_digest(payload)
    fd, tmp = tempfile.mkstemp(prefix=f"{os.path.basename(_tmp_prefix(path))}{os.getpid()}-",
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(error, (OSError, RuntimeError)):   # torch's zip writer raises RuntimeError
            cause = getattr(error, "strerror", None) or str(error).strip().splitlines()[-1]
            raise CheckpointWriteError(getattr(error, "errno", None) or 0,
                                       f"could not write the checkpoint ({cause}); the previous "
                                       f"checkpoint there, if any, is intact", path) from error
        raise
    _remove_stale_temporaries(path)
    return path


def _tmp_prefix(path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)), ".tmp-" + os.path.basename(path) + "-")


def _remove_stale_temporaries(path: str) -> None:
    """Temporary files of ``path`` whose writer is gone (killed while writing): the writer's
    pid is in the name, after the prefix; files of a live writer, another process saving at the
    same moment, are left alone."""
    prefix = _tmp_prefix(path)
    for stale in glob.glob(glob.escape(prefix) + "*"):
        pid = stale[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        try:
            os.remove(stale)
        except OSError:       # gone already, or not ours to remove
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


def _content_digest(state: Any) -> str:
    """SHA-256 of a checkpoint's content: the structure, every value's repr and every tensor's
    dtype, shape and bytes, in order. Equal for a state and its ``torch.load`` round trip."""
    digest = hashlib.sha256()
    _feed(digest, state)
    return digest.hexdigest()


def _feed(digest, value: Any) -> None:
    if torch.is_tensor(value):
        t = value.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)};".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__}{len(value)};".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # zip reader, unpickler and EOF errors all mean a damaged file
        size = os.path.getsize(path)
        raise CheckpointError(
            f"checkpoint {path!r} ({size} bytes) is truncated or corrupt and cannot be loaded: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not an xbraid_transformers checkpoint")
    if state.get("version") not in READABLE:
        raise CheckpointError(f"checkpoint {path!r} has format version {state.get('version')}, "
                              f"this version reads {', '.join(map(str, READABLE))}")
    expected = state.pop(CHECKSUM, None)
    if expected is None and state["version"] >= 3:
        raise CheckpointError(f"checkpoint {path!r} lacks its checksum: the file is damaged")
    if expected is not None and _content_digest(state) != expected:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: its content does not match the "
                              f"checksum stored in it (damaged on disk or in transfer)")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks {', '.join(missing)}")
    return state


# ---------------------------------------------------------------------------- RNG states
def rng_state() -> Dict[str, Any]:
    """The Python, NumPy and torch (CPU and CUDA) random states as weights_only-safe data."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                       float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

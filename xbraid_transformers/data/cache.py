"""Cache of prepared token ids: uint16 ``.bin`` files (nanoGPT style) read back with np.memmap.

Every file is written atomically (a temporary file in the same directory, then ``os.replace``),
so an interrupted preparation never leaves a half-written array that a later run would trust.
A cache entry is prepared under a file lock (:func:`preparing`): the ranks of a run, and jobs
sharing the cache directory, wait for the one that prepares it and then load what it wrote. This
matters beyond speed: the Rust tokenizer trainers break ties differently in every process, so
ranks that each trained their own tokenizer would train on different tokens.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .sources import PathLike, data_dir

__all__ = ["TOKEN_DTYPE", "atomic_write_bytes", "atomic_write_text", "save_tokens", "load_tokens",
           "save_ragged", "load_ragged", "fingerprint", "cache_dir", "preparing", "read_meta",
           "write_meta", "TokenData"]

TOKEN_DTYPE = np.uint16


def atomic_write_bytes(path: PathLike, data: Union[bytes, Iterable[bytes]]) -> Path:
    """Write ``data`` (bytes or an iterable of byte chunks) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                for chunk in data:
                    f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_tokens(path: PathLike, ids: Union[np.ndarray, Sequence[int]]) -> Path:
    """Save token ids as raw little-endian uint16 (ids must lie in [0, 65535])."""
    arr = np.asarray(ids)
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(TOKEN_DTYPE).max):
        raise ValueError(f"{path}: token ids must lie in [0, 65535] for uint16 storage "
                         f"(got {int(arr.min())}..{int(arr.max())})")
    return atomic_write_bytes(path, arr.astype("<u2").tobytes())


def load_tokens(path: PathLike) -> np.ndarray:
    """Memory-map a uint16 ``.bin`` written by :func:`save_tokens`."""
    path = Path(path)
    if path.stat().st_size % 2:
        raise ValueError(f"{path}: size {path.stat().st_size} is not a multiple of 2 bytes (corrupt uint16 file)")
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype="<u2", mode="r")


def save_ragged(prefix: PathLike, seqs: Sequence[Sequence[int]]) -> None:
    """Save a list of id sequences as ``<prefix>.bin`` (uint16) and ``<prefix>.off`` (int64 offsets)."""
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    off = np.zeros(len(seqs) + 1, dtype="<i8")
    np.cumsum(lens, out=off[1:])
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(off[-1]))
    save_tokens(f"{prefix}.bin", flat)
    atomic_write_bytes(f"{prefix}.off", off.tobytes())


def load_ragged(prefix: PathLike) -> List[np.ndarray]:
    """Inverse of :func:`save_ragged`."""
    flat = load_tokens(f"{prefix}.bin")
    off = np.fromfile(f"{prefix}.off", dtype="<i8")
    if off.size == 0 or off[0] != 0 or off[-1] != flat.size or np.any(np.diff(off) < 0):
        raise ValueError(f"{prefix}.off: offsets do not match {prefix}.bin ({flat.size} tokens)")
    return [np.asarray(flat[off[i]:off[i + 1]]) for i in range(off.size - 1)]


def fingerprint(*parts: object) -> str:
    """Short hash of parameters and source files (path, size and mtime of each Path given)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Path):
            st = p.stat()
            h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        else:
            h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def cache_dir(name: str, key: str, root: Optional[PathLike] = None) -> Path:
    """``<root or data_dir()>/<name>/<key>``."""
    return (Path(root) if root is not None else data_dir()) / name / key


@contextlib.contextmanager
def preparing(directory: Path):
    """Held while this process prepares the cache entry ``directory``; other processes that
    prepare the same entry wait here (check for the finished entry again inside)."""
    from filelock import FileLock        # a dependency of torch

    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory) + ".lock"):
        yield


def read_meta(directory: Path) -> Optional[dict]:
    try:
        return json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def write_meta(directory: Path, meta: dict) -> None:
    """Written last: its presence marks the directory's other files as complete."""
    atomic_write_text(directory / "meta.json", json.dumps(meta, indent=1, sort_keys=True))


class TokenData:
    """Token streams per split (``"train"``, ``"val"``, ...) with a nanoGPT-style :meth:`get_batch`.

    ``splits`` maps a split name to a 1-D integer array (a memmap of a ``.bin`` or an array).
    """

    def __init__(self, splits: Dict[str, np.ndarray], tokenizer=None, vocab_size: Optional[int] = None,
                 directory: Optional[Path] = None):
        self.splits = dict(splits)
        self.tokenizer = tokenizer
        if vocab_size is None:
            vocab_size = tokenizer.vocab_size if tokenizer is not None else \
                int(max(int(a.max()) for a in self.splits.values() if len(a)) + 1)
        self.vocab_size = int(vocab_size)
        self.directory = directory

    def __len__(self) -> int:
        return sum(len(a) for a in self.splits.values())

    def get_batch(self, split: str, batch_size: int, block_size: int,
                  generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Random windows: ``x`` [B, T] and ``y`` = ``x`` shifted by one, both int64."""
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; have {sorted(self.splits)}")
        data = self.splits[split]
        n = len(data) - block_size - 1
        if n < 0:
            raise ValueError(f"split {split!r} has {len(data)} tokens, fewer than block_size+1={block_size + 1}")
        starts = torch.randint(n + 1, (batch_size,), generator=generator).numpy()
        idx = starts[:, None] + np.arange(block_size + 1)[None, :]
        win = torch.from_numpy(np.asarray(data[idx], dtype=np.int64))
        return win[:, :-1].contiguous(), win[:, 1:].contiguous()

    @classmethod
    def load(cls, directory: PathLike, tokenizer=None) -> "TokenData":
        directory = Path(directory)
        meta = read_meta(directory)
        if meta is None:
            raise FileNotFoundError(f"{directory}: no meta.json (not a prepared token cache)")
        splits = {s: load_tokens(directory / f"{s}.bin") for s in meta["splits"]}
        vocab_size = meta.get("vocab_size")
        for s, ids in splits.items():
            # one pass over each file: damaged bytes become a clear error here, not an
            # IndexError in an embedding at some later step
            top = int(ids.max()) if len(ids) else -1
            if vocab_size is not None and top >= vocab_size:
                raise ValueError(f"{directory / f'{s}.bin'}: token id {top} is outside the vocabulary "
                                 f"of {vocab_size}: the token cache is damaged; delete {directory} "
                                 f"to rebuild it")
        return cls(splits, tokenizer=tokenizer, vocab_size=vocab_size, directory=directory)

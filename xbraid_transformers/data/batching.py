"""Small batch helpers shared by the loaders: seeded splits, padding, minibatches, MLM masking."""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["DEFAULT_FRACTIONS", "SPLIT_NAMES", "split_indices", "split_arrays", "pad_sequences",
           "padding_mask", "iterate_minibatches", "classification_batches"]

DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
SPLIT_NAMES = ("train", "val", "test")


def split_indices(n: int, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
                  names: Sequence[str] = SPLIT_NAMES) -> Dict[str, torch.Tensor]:
    """A seeded random partition of ``range(n)`` into named parts of the given fractions."""
    if len(fractions) != len(names):
        raise ValueError(f"{len(fractions)} fractions for {len(names)} split names")
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    bounds = np.round(np.cumsum([0.0] + list(fractions)) * n).astype(int)
    bounds[-1] = n
    return {name: perm[bounds[i]:bounds[i + 1]] for i, name in enumerate(names)}


def split_arrays(x, y, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
                 ) -> Dict[str, Tuple[object, object]]:
    """``{"train": (x, y), "val": ..., "test": ...}`` by :func:`split_indices` (tensors or lists)."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} inputs but {len(y)} labels")
    parts = split_indices(len(x), fractions, seed)

    def take(a, idx):
        if isinstance(a, (torch.Tensor, np.ndarray)):
            return a[idx.numpy()] if isinstance(a, np.ndarray) else a[idx]
        return [a[i] for i in idx.tolist()]

    return {k: (take(x, idx), take(y, idx)) for k, idx in parts.items()}


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, max_len: Optional[int] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id sequences into an int64 [B, L] tensor; returns (ids, lengths).

    Sequences longer than ``max_len`` are truncated.
    """
    lens = [len(s) if max_len is None else min(len(s), max_len) for s in seqs]
    width = max(lens, default=0)
    out = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    for i, (s, n) in enumerate(zip(seqs, lens)):
        if n:
            out[i, :n] = torch.as_tensor(np.asarray(s[:n], dtype=np.int64))
    return out, torch.tensor(lens, dtype=torch.long)


def padding_mask(lengths: torch.Tensor, width: Optional[int] = None) -> torch.Tensor:
    """Boolean [B, L] key-padding mask, True at padded positions (the torch convention)."""
    width = int(lengths.max()) if width is None and len(lengths) else (width or 0)
    return torch.arange(width)[None, :] >= lengths[:, None]


def iterate_minibatches(n: int, batch_size: int, shuffle: bool = False,
                        generator: Optional[torch.Generator] = None) -> Iterator[torch.Tensor]:
    """Index tensors covering ``range(n)`` once, in order or shuffled."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def classification_batches(ids: List[Sequence[int]], labels: torch.Tensor, batch_size: int, pad_id: int,
                           shuffle: bool = False, generator: Optional[torch.Generator] = None,
                           max_len: Optional[int] = None):
    """Yield (ids [B, L], lengths [B], labels [B]) padded batches over a tokenized split."""
    for idx in iterate_minibatches(len(ids), batch_size, shuffle, generator):
        x, n = pad_sequences([ids[i] for i in idx.tolist()], pad_id, max_len)
        yield x, n, labels[idx]

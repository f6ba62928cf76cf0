"""Synthetic data for unit tests and smoke runs; deterministic given the seed."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .cache import TokenData

__all__ = ["random_tokens", "synthetic_lm", "seq2seq_task", "random_images",
           "synthetic_classification"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def random_tokens(n: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """``n`` uniform token ids in ``[0, vocab_size)`` (int64)."""
    return torch.randint(vocab_size, (n,), generator=_gen(seed))


def synthetic_lm(vocab_size: int = 64, n_train: int = 20_000, n_val: int = 2_000, seed: int = 0,
                 period: Optional[int] = 8) -> TokenData:
    """A :class:`TokenData` of random tokens. With ``period``, the stream repeats random motifs
    of that length (the same motifs in both splits, so that a model can learn them and the
    validation loss falls too); ``None``: i.i.d. tokens."""
    g = _gen(seed)
    motifs = None if period is None else torch.randint(vocab_size, (4, period), generator=g)

    def stream(n: int) -> torch.Tensor:
        if motifs is None:
            return torch.randint(vocab_size, (n,), generator=g)
        pick = torch.randint(len(motifs), ((n + period - 1) // period,), generator=g)
        return motifs[pick].reshape(-1)[:n]

    return TokenData({"train": stream(n_train).numpy(), "val": stream(n_val).numpy()}, vocab_size=vocab_size)


def seq2seq_task(n: int, length: int, vocab_size: int, task: str = "copy", seed: int = 0,
                 min_length: Optional[int] = None, n_special: int = 3
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy or reverse task: (src [n, L], tgt [n, L], lengths [n]).

    Tokens are drawn from ``[n_special, vocab_size)`` so that ids 0, 1, 2 stay free for
    pad / BOS / EOS; positions past a row's length are 0 (pad). With ``min_length`` the
    lengths vary uniformly in ``[min_length, length]``."""
    if task not in ("copy", "reverse"):
        raise ValueError(f"task must be 'copy' or 'reverse', got {task!r}")
    if vocab_size <= n_special:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for tokens after {n_special} specials")
    g = _gen(seed)
    src = torch.randint(n_special, vocab_size, (n, length), generator=g)
    if min_length is None:
        lengths = torch.full((n,), length, dtype=torch.long)
    else:
        lengths = torch.randint(min_length, length + 1, (n,), generator=g)
    pos = torch.arange(length)[None, :]
    src = src.masked_fill(pos >= lengths[:, None], 0)
    if task == "copy":
        tgt = src.clone()
    else:
        idx = (lengths[:, None] - 1 - pos).clamp(min=0)
        tgt = torch.gather(src, 1, idx).masked_fill(pos >= lengths[:, None], 0)
    return src, tgt, lengths


def random_images(n: int, channels: int = 1, size: int = 8, num_classes: int = 10, seed: int = 0,
                  learnable: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Float images [n, C, size, size] and int64 labels. With ``learnable`` each class adds its
    own fixed pattern to the noise, so a classifier can beat chance."""
    g = _gen(seed)
    y = torch.randint(num_classes, (n,), generator=g)
    x = torch.randn(n, channels, size, size, generator=g)
    if learnable:
        patterns = torch.randn(num_classes, channels, size, size, generator=g)
        x = 0.5 * x + patterns[y]
    return x, y


def synthetic_classification(n: int = 512, length: int = 16, vocab_size: int = 32, num_classes: int = 2,
                             seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token sequences [n, length] whose label is the class of their most frequent marker token
    (tokens ``1..num_classes`` act as markers): learnable sequence classification."""
    g = _gen(seed)
    y = torch.randint(num_classes, (n,), generator=g)
    x = torch.randint(num_classes + 1, vocab_size, (n, length), generator=g)
    k = max(1, length // 4)
    cols = torch.stack([torch.randperm(length, generator=g)[:k] for _ in range(n)])
    x.scatter_(1, cols, (y + 1)[:, None].expand(n, k))
    return x, y

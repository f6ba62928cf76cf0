"""Which rank owns which layers, placeholders for the others, and cross-rank consistency checks.

Rank r of a layer-parallel group owns a contiguous block of fine layers ``[lo, hi)``, balanced
to within one layer; each interval of a coarse MGRIT level is evaluated by the rank that owns
its first layer (``mgrit.layout``), so coarse levels live on the ranks that own their points.
Layers owned elsewhere are replaced by ``RemoteLayer`` placeholders that hold no parameters
(the optimizer of a rank sees only its own layers); they remember the names, shapes and dtypes
of the layer's state so that ``xbt.gather_state_dict`` can assemble a full state dict, and they
ignore their entries when a full state dict is loaded (so a checkpoint loads into any number
of ranks).
"""
from __future__ import annotations

import hashlib
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["Partition", "partition_layers", "RemoteLayer", "fingerprint", "content_checksum",
           "check_agreement", "config_key", "layer_key"]

Partition = Union[None, str, Sequence[int]]


def partition_layers(num_layers: int, spacing: int, size: int,
                     partition: Partition = None) -> List[Tuple[int, int]]:
    """The blocks ``[(lo, hi), ...]`` of fine layers of ranks ``0..size-1``.

    spacing: the coarsest MGRIT spacing; the layers must be a multiple of it (the blocks need
    not be: a coarse interval belongs to the rank that owns its first layer).
    partition: None (balanced: blocks differ by at most one layer, the first ones larger),
    ``"even"`` (equal blocks, an error when that is impossible), or the number of layers of
    each rank (positive, summing to ``num_layers``).
    """
    if num_layers % spacing:
        raise ValueError(
            f"{num_layers} layers cannot be split into coarsest-level intervals of {spacing} "
            "layers; the number of layers must be a multiple of the product of the cfactors")
    if partition is None or partition == "even":
        if size > num_layers:
            raise ValueError(
                f"{size} ranks but only {num_layers} layers: every rank must own at least one "
                f"layer; use at most {num_layers} ranks")
        base, extra = divmod(num_layers, size)
        if partition == "even" and extra:
            raise ValueError(
                f"partition='even': {num_layers} layers cannot be split evenly over {size} ranks; "
                f"use a layer count that is a multiple of {size} or partition=None (blocks "
                "differ by one layer)")
        counts = [base + (r < extra) for r in range(size)]
    elif isinstance(partition, str):
        raise ValueError(f"partition must be None, 'even' or a list of layer counts, got {partition!r}")
    else:
        counts = [int(c) for c in partition]
        if len(counts) != size or sum(counts) != num_layers or any(c <= 0 for c in counts):
            raise ValueError(
                f"partition {list(partition)} cannot be used: it needs {size} positive layer "
                f"counts (one per rank) summing to {num_layers}")
    blocks, lo = [], 0
    for c in counts:
        blocks.append((lo, lo + c))
        lo += c
    return blocks


class RemoteLayer(nn.Module):
    """Stands in for layer ``index``, whose parameters live on rank ``owner`` only."""

    def __init__(self, index: int, owner: int, layer: nn.Module):
        super().__init__()
        self.index, self.owner = index, owner
        self.kind = type(layer).__name__
        self.entries: Dict[str, Tuple[torch.Size, torch.dtype]] = {
            name: (t.shape, t.dtype) for name, t in layer.state_dict().items()}
        self._register_load_state_dict_pre_hook(self._ignore_entries)

    def _ignore_entries(self, state_dict, prefix, *args):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[key]

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"layer {self.index} is owned by rank {self.owner}; this rank holds "
                           "only a placeholder for it")

    def extra_repr(self) -> str:
        return f"{self.kind} {self.index}, owned by rank {self.owner}"


def fingerprint(value) -> int:
    """A 63-bit hash of ``repr(value)``, equal on every process for equal values."""
    digest = hashlib.sha256(repr(value).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def content_checksum(tensor: torch.Tensor) -> Tuple[int, int]:
    """A cheap checksum of a tensor's bits, equal on every process for bitwise-equal tensors.

    The elements are read as integers of their own width and summed twice, plainly and weighted
    by position (int64 arithmetic, wrapping, so the sums are exact and independent of the order
    of reduction): a change of any element, or two elements swapped, changes the result. Two
    passes over the tensor on its own device, one synchronisation."""
    flat = tensor.detach().reshape(-1)
    if flat.dtype.is_complex:
        flat = torch.view_as_real(flat).reshape(-1)
    width = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    bits = flat.view(width).to(torch.int64) if flat.dtype != torch.bool else flat.to(torch.int64)
    weights = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64)
    plain, weighted = torch.stack([bits.sum(), (bits * weights).sum()]).tolist()
    return plain, weighted


def check_agreement(comm, fields: Dict[str, object], what: str, hint: Optional[str] = None) -> List[List[int]]:
    """All-gather the fingerprints of ``fields`` and raise ``ValueError`` on every rank when the
    ranks disagree; the message names, for each field that differs, which ranks agree with which.
    hint: what to do about it (default: build the same model, call it with the same shapes and
    options). Returns the gathered table (one row per rank)."""
    names = list(fields)
    mine = torch.tensor([fingerprint(fields[n]) for n in names], dtype=torch.int64,
                        device=comm.device)
    rows = [row.tolist() for row in comm.allgather(mine)]
    differ = [i for i in range(len(names)) if len({row[i] for row in rows}) > 1]
    if differ:
        parts = []
        for i in differ:
            groups: Dict[int, List[int]] = {}
            for r, row in enumerate(rows):
                groups.setdefault(row[i], []).append(r)
            parts.append(f"{names[i]}: " + " vs ".join(f"rank{'s' if len(g) > 1 else ''} "
                                                       f"{', '.join(map(str, g))}"
                                                       for g in groups.values()))
        raise ValueError(
            f"the {comm.size} ranks of the layer-parallel group disagree on "
            f"{', '.join(names[i] for i in differ)} {what} ({'; '.join(parts)}; this is rank "
            f"{comm.rank} with {', '.join(f'{names[i]}={fields[names[i]]!r}' for i in differ)}); "
            + (hint or "every rank must build the same model and call it with the same shapes "
                       "and options"))
    return rows


def config_key(config) -> tuple:
    """The MGRIT options that must agree across ranks (callables by name, not address)."""
    guess = config.initial_guess
    guess = guess if isinstance(guess, str) else getattr(guess, "__qualname__", type(guess).__name__)
    return (config.levels, config.cfactors, config.cf_sweeps, config.cycle,
            config.skip_first_downcycle, config.fwd_iters, config.bwd_iters, float(config.tol),
            float(config.rtol), guess, config.warm_start)


def layer_key(layer: nn.Module) -> tuple:
    return (type(layer).__name__,
            tuple((n, tuple(t.shape), str(t.dtype)) for n, t in layer.state_dict().items()))

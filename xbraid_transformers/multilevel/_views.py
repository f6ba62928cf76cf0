"""The model's weights across views: coarse views of every stack, prolongation of trained
coarse layers to the layers a view skipped, and the optimizer state that goes with them."""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
from torch import nn

from ..core.layer_parallel import LayerParallel, find_stacks
from ._schedule import PROLONGATIONS, check_choice

__all__ = ["stacks", "coarse_view", "prolongate", "transfer_optimizer_state"]


def stacks(model: nn.Module) -> List[LayerParallel]:
    """The LayerParallel stacks of ``model``; a model without any is a ``ValueError``."""
    found = find_stacks(model)
    if not found:
        raise ValueError(f"{type(model).__name__} contains no LayerParallel stack to coarsen")
    return found


@contextlib.contextmanager
def coarse_view(model: nn.Module, stride: int = 2, offset: int = 0):
    """Inside the ``with`` block every LayerParallel stack of ``model`` runs the layers
    ``offset::stride`` with step ``stride * h`` (``LayerParallel.coarse_view``: serially,
    unless the stack's MGRIT hierarchy also fits the coarse layer count and the ranks' layer ranges).
    The layer modules are shared, not copied; on several ranks each keeps the selected layers
    of its own range."""
    with contextlib.ExitStack() as views:
        for stack in stacks(model):
            views.enter_context(stack.coarse_view(stride, offset))
        yield model


def _entries(layer: nn.Module) -> dict:
    return layer.state_dict(keep_vars=True)


def _first_layer_of_next_rank(stack: LayerParallel) -> Optional[dict]:
    """Each rank sends its first layer to the previous rank (linear prolongation needs the
    trained layer after a range's last group); returns the next rank's, None on the last."""
    comm = stack.comm
    lo, hi = stack.owned_range
    mine = _entries(stack.layers[lo])
    if comm.rank > 0:
        for value in mine.values():
            comm.isend(value.detach().to(comm.device), comm.rank - 1)
    theirs = None
    if comm.rank < comm.size - 1:
        like = _entries(stack.layers[hi - 1])      # the same structure as every layer
        theirs = {k: comm.recv(v.detach().to(comm.device), comm.rank + 1).to(v.device)
                  for k, v in like.items()}
    comm.flush()
    return theirs


@torch.no_grad()
def prolongate(model: nn.Module, stride: int, method: str = "copy") -> None:
    """Fill the layers a ``coarse_view(stride, offset=0)`` skipped from the trained ones.

    ``"copy"``: layer i takes the parameters of layer ``stride * (i // stride)``.
    ``"linear"``: layer i interpolates linearly between the trained layers before and after it
    (the last range, which has no trained layer after it, copies). On several ranks, every
    rank fills its own layers (each range starts with a trained layer)."""
    check_choice("method", method, PROLONGATIONS)
    for stack in stacks(model):
        layers = stack.layers
        stack.coarse_layers(stride, 0)
        lo, hi = stack.owned_range
        if lo % stride or hi % stride:
            raise ValueError(f"the layer ranges {stack.layer_ranges} do not start at trained layers of stride {stride}")
        after = (_first_layer_of_next_rank(stack) if method == "linear" and stack.comm.size > 1
                 else None)
        for i in range(lo, hi):
            j = i % stride
            if j == 0:
                continue
            left = _entries(layers[i - j])
            right = None
            if method == "linear":
                right = _entries(layers[i - j + stride]) if i - j + stride < hi else after
            for name, target in _entries(layers[i]).items():
                value = left[name].detach()
                if right is not None and torch.is_floating_point(target):
                    value = torch.lerp(value, right[name].detach(), j / stride)
                target.copy_(value)


def _filled_layers(stack: LayerParallel, stride: int):
    """(filled layer, trained layer before it) for this rank's layers a prolongation fills."""
    lo, hi = stack.owned_range
    return [(stack.layers[i], stack.layers[i - i % stride]) for i in range(lo, hi) if i % stride]


@torch.no_grad()
def transfer_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, stride: int) -> None:
    """After ``prolongate(model, stride)``: each filled layer's parameters take a copy of the
    optimizer state (momentum, second moments, step count) of the trained layer before it."""
    for stack in stacks(model):
        for filled, source in _filled_layers(stack, stride):
            for target, origin in zip(filled.parameters(), source.parameters()):
                if origin in optimizer.state:
                    optimizer.state[target] = {k: v.clone() if torch.is_tensor(v) else v
                                               for k, v in optimizer.state[origin].items()}

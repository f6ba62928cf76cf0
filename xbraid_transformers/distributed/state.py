"""Model state across the ranks of a layer-parallel group.

- ``gather_state_dict(model)``: the full state dict on rank 0 of the layer-parallel group.
- ``broadcast_replicated_(model)``: make the replicated parameters equal to rank 0's.
- ``gather_optimizer_state`` / ``load_optimizer_state``: an optimizer's state keyed by
  parameter name, whole on rank 0, loadable on any number of ranks.
- ``clip_grad_norm_(model, max_norm)``: gradient clipping by the whole model's norm.
- ``layer_comm(model)``: the communicator of the model's split stacks (``SERIAL`` if none).
"""
from __future__ import annotations

import io
from typing import Optional

import torch
from torch import nn

from ..core.layer_parallel import named_stacks
from ..core.ownership import RemoteLayer
from ..mgrit.comm import SERIAL, Communicator

__all__ = ["gather_state_dict", "broadcast_replicated_", "layer_comm", "gather_named",
           "gather_optimizer_state", "load_optimizer_state", "clip_grad_norm_"]


def gather_state_dict(model: nn.Module) -> Optional[dict]:
    """The full, layout-free state dict of ``model`` on rank 0 of its layer-parallel group(s);
    None on the other ranks. Every rank must call it. The result loads into a serial model and
    into a model distributed over any number of ranks (each keeps its own layers)."""
    state = model.state_dict()
    rank0 = True
    for name, stack in named_stacks(model):
        comm = stack.comm
        rank0 = rank0 and comm.rank == 0
        if comm.size == 1:
            continue
        for lo, hi in stack.layer_ranges:
            for n in range(lo, hi):
                layer = stack.layers[n]
                prefix = f"{name}.layers.{n}." if name else f"layers.{n}."
                if isinstance(layer, RemoteLayer):
                    owner = layer.owner
                    entries = {k: torch.empty(shape, dtype=dtype, device=comm.device)
                               for k, (shape, dtype) in layer.entries.items()}
                else:
                    owner = comm.rank
                    entries = {k: v.to(comm.device) for k, v in layer.state_dict().items()}
                for key, value in entries.items():
                    value = comm.broadcast(value, root=owner)
                    if comm.rank == 0:
                        state[prefix + key] = value.cpu()
    if not rank0:
        return None
    # Modules whose state_dict() gives their layers other keys than their module paths (the
    # adapters' block lists keep the original model's keys) rename the gathered entries alike.
    for name, module in model.named_modules():
        rename = getattr(module, "rename_state_keys", None)
        if callable(rename):
            rename(state, f"{name}." if name else "")
    return {k: v for k, v in sorted(state.items(), key=lambda kv: _natural(kv[0]))}


def _natural(key: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split(".")]


@torch.no_grad()
def broadcast_replicated_(model: nn.Module) -> nn.Module:
    """Copy rank 0's parameters and buffers outside the LayerParallel stacks (embeddings,
    heads, norms, buffer layers) to every rank of the layer-parallel group; the layers owned
    by each rank are left alone. Call it after building and initialising a model whose
    initialisation may draw different random numbers on different ranks."""
    stacks = named_stacks(model)
    comm = layer_comm(model)
    if comm.size == 1:
        return model
    inside = {id(t) for _, s in stacks for t in [*s.parameters(), *s.buffers()]}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in inside:
            t.copy_(comm.broadcast(t.to(comm.device), root=0))
    return model


def layer_comm(model: nn.Module) -> Communicator:
    """The communicator of the first LayerParallel stack split over several ranks."""
    comms = [s.comm for _, s in named_stacks(model) if s.comm.size > 1]
    return comms[0] if comms else SERIAL


def _allgather_objects(comm: Communicator, value) -> list:
    """Every rank's ``value`` (tensors and plain data), in rank order."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    sizes = [int(n) for n in comm.allgather(torch.tensor([data.numel()], device=comm.device))]
    padded = torch.zeros(max(sizes), dtype=torch.uint8)
    padded[: data.numel()] = data
    parts = comm.allgather(padded.to(comm.device))
    return [torch.load(io.BytesIO(part[:n].cpu().numpy().tobytes()), weights_only=True)
            for part, n in zip(parts, sizes)]


def gather_named(model: nn.Module, values: dict) -> Optional[dict]:
    """Per-parameter values keyed by parameter name, from every rank of the layer-parallel
    group, merged on rank 0 (None on the others; every rank must call it)."""
    comm = layer_comm(model)
    if comm.size == 1:
        return dict(values)
    parts = _allgather_objects(comm, values)
    return {k: v for part in parts for k, v in part.items()} if comm.rank == 0 else None


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Optional[dict]:
    """``optimizer``'s state with parameters named as in ``model.named_parameters()``: on rank 0
    of the layer-parallel group, the state of every layer whichever rank owns it (None on the
    others; every rank must call it). The result loads with :func:`load_optimizer_state` on
    any number of ranks."""
    names = {id(p): n for n, p in model.named_parameters()}
    state = optimizer.state_dict()
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    per_param = gather_named(model, {order[i]: v for i, v in state["state"].items()})
    group_of = gather_named(model, {order[i]: k for k, g in enumerate(state["param_groups"])
                                    for i in g["params"]})
    if per_param is None:
        return None
    return {"state": per_param,
            "param_groups": [{**g, "params": [n for n, j in group_of.items() if j == k]}
                             for k, g in enumerate(state["param_groups"])]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a :func:`gather_optimizer_state` result: each rank takes the state of its own
    parameters (and every group's hyperparameters)."""
    names = {id(p): n for n, p in model.named_parameters()}
    index, groups = 0, []
    if len(state["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"the saved optimizer has {len(state['param_groups'])} parameter groups, "
                         f"this one {len(optimizer.param_groups)}")
    per_param = {}
    for saved, group in zip(state["param_groups"], optimizer.param_groups):
        ids = []
        for p in group["params"]:
            name = names[id(p)]
            if name not in saved["params"]:
                raise ValueError(f"the saved optimizer state has no parameter {name!r}")
            if name in state["state"]:
                per_param[index] = state["state"][name]
            ids.append(index)
            index += 1
        groups.append({**saved, "params": ids})
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a model whose LayerParallel stacks are split over
    ranks: the norm is that of the whole model's gradient (each layer counted once, on the rank
    that owns it; the replicated parameters once), the same on every rank, and so is the
    scaling. Returns the total norm (float32 scalar)."""
    if not norm_type >= 1:
        raise ValueError(f"norm_type must be >= 1 or inf, got {norm_type!r}")
    stacks = [s for _, s in named_stacks(model)]
    inside = {id(p) for s in stacks for p in s.layers.parameters()}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    split = [p.grad for s in stacks for p in s.layers.parameters() if p.grad is not None]
    replicated = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in inside]
    comm = layer_comm(model)
    infinite = norm_type == float("inf")

    def local(gs):
        if not gs:
            return torch.zeros((), dtype=torch.float64)
        if infinite:
            return torch.stack([g.detach().abs().max().double().cpu() for g in gs]).max()
        return sum(g.detach().double().norm(norm_type).cpu() ** norm_type for g in gs)

    mine = local(split).reshape(1)
    if comm.size > 1:
        mine = comm.allreduce(mine.to(comm.device), "max" if infinite else "sum").cpu()
    if infinite:
        total = torch.maximum(mine[0], local(replicated))
    else:
        total = (mine[0] + local(replicated)) ** (1.0 / norm_type)
    scale = float(max_norm) / (float(total) + 1e-6)
    if scale < 1:
        for g in grads:
            g.mul_(scale)
    return total.float()



"""One forward call of a ``LayerParallel`` stack and its adjoint: the context, the dropout
micro-batch, the per-layer graphs the forward records and the adjoint differentiates, the
checks that every rank makes the same call, and the warm starts kept between calls."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Dict, List, Optional

import torch
from torch import nn

from ..mgrit import solve
from ..mgrit.config import MGRITConfig
from ..mgrit.layout import mirrored
from .counts import SolveStats
from .ownership import check_agreement, config_key, content_checksum

__all__ = ["StackCall", "MGRITFunction", "WarmStarts", "check_call"]


class WarmStarts:
    """The last solve's states of each kind ("forward", "adjoint"), the initial guess of the
    next solve of that kind when ``MGRITConfig.warm_start`` is on and the shapes still match."""

    def __init__(self):
        self._states: Dict[str, List[torch.Tensor]] = {}

    def states(self, kind: str, like: torch.Tensor, config: MGRITConfig) -> Optional[List[torch.Tensor]]:
        states = self._states.get(kind)
        if not config.warm_start or states is None or states[0].shape != like.shape \
                or states[0].dtype != like.dtype or states[0].device != like.device:
            return None
        return states

    def remember(self, kind: str, states: List[torch.Tensor], config: MGRITConfig) -> None:
        if config.warm_start:
            self._states[kind] = [s.detach() for s in states]

    def clear(self) -> None:
        self._states.clear()


class StackCall:
    """One forward call and its adjoint: the context, the masks and the recorded graphs."""

    def __init__(self, module: nn.Module, ctx: dict, micro_batch: Optional[int]):
        self.module, self.micro_batch = module, micro_batch
        self.config = module.mgrit
        self.comm = module.comm
        self.owned_range = module.owned_range
        self.grad_ctx = [k for k, v in ctx.items() if torch.is_tensor(v) and v.requires_grad]
        self.ctx_in = ctx
        # Tensors that need gradients become leaves so that each layer's graph ends there.
        self.ctx = {k: (v.detach().requires_grad_() if k in self.grad_ctx else v) for k, v in ctx.items()}
        self.graphs: Dict[int, tuple] = {}
        # The parameters of this rank's layers as they are now (functional_call may swap them
        # before backward); the other layers are placeholders without any: O(N / P) per call.
        lo, hi = self.owned_range
        self.layer_params = {n: [p for p in layer.parameters() if p.requires_grad]
                             for n, layer in enumerate(itertools.islice(module.layers, lo, hi), start=lo)}
        self.params = list({id(p): p for ps in self.layer_params.values() for p in ps}.values())

    def grad_ctx_values(self):
        return [self.ctx_in[k] for k in self.grad_ctx]

    def forward(self, x: torch.Tensor, record: bool) -> torch.Tensor:
        if not self.module.parallel:
            return self.relay_forward(x, record)
        module, config, comm = self.module, self.config, self.comm
        rhs, h, counts = module.rhs_at, module.step_size, module.counts

        def step(u, n, dt):
            counts.count("forward", dt == h)
            return torch.add(u, rhs(n, u, self.ctx, self.micro_batch), alpha=dt)

        def recording_step(u, n, dt):
            counts.count("forward", True)
            leaf = u.detach().requires_grad_()
            with torch.enable_grad():
                f = rhs(n, leaf, self.ctx, self.micro_batch)
            self.graphs[n] = (leaf, f)
            return torch.add(u, f.detach(), alpha=dt)

        with torch.no_grad():
            result = solve(step, x.detach(), len(module.layers), h, config,
                           max_iters=config.fwd_iters,
                           initial_states=module.warm_starts.states("forward", x, config),
                           final_step=recording_step if record else None,
                           comm=comm, ranges=module.layer_ranges)
            out = result.states[-1]
            if comm.size > 1:   # the last rank holds the output; every rank returns it
                out = comm.broadcast(out, root=comm.size - 1)
                comm.flush()
        module.warm_starts.remember("forward", result.states, config)
        module.stats = SolveStats(mode="parallel" if module.parallel else "serial",
                                  fwd_iters=result.iterations, fwd_residuals=result.residuals)
        return out

    def relay_forward(self, x: torch.Tensor, record: bool) -> torch.Tensor:
        """Serial mode over several ranks: each rank runs its range of layers through autograd after the
        previous rank's, so the arithmetic is exactly that of one process."""
        module, comm = self.module, self.comm
        lo, hi = self.owned_range
        module.stats = SolveStats(mode="serial")
        module.counts.forward_fine += hi - lo
        u = x.detach() if comm.prev is None else comm.recv(x, comm.prev)
        leaf = u.requires_grad_() if record else u
        with torch.set_grad_enabled(record):
            y = leaf
            for n in range(lo, hi):
                y = torch.add(y, module.rhs_at(n, y, self.ctx, self.micro_batch), alpha=module.step_size)
        with torch.no_grad():
            comm.send_next(y)
            out = comm.broadcast(y, root=comm.size - 1)
            comm.flush()
        self.graphs = {"relay": (leaf, y)} if record else {}
        return out

    def relay_adjoint(self, grad_out: torch.Tensor):
        comm = self.comm.reversed()
        leaf, y = self.graphs["relay"]
        leaves = [self.ctx[k] for k in self.grad_ctx]
        with torch.no_grad():
            lam = grad_out if comm.prev is None else comm.recv(grad_out, comm.prev)
        grads = torch.autograd.grad(y, [leaf, *self.params, *leaves], lam, allow_unused=True,
                                    retain_graph=self.module.retain_graph)
        with torch.no_grad():
            comm.send_next(grads[0])
            grad_x = comm.broadcast(grads[0], root=0)   # rank 0 holds the input gradient
            ctx_grads = [comm.allreduce(torch.zeros_like(v) if g is None else g)
                         for v, g in zip(leaves, grads[1 + len(self.params):])]
            comm.flush()
        if not self.module.retain_graph:
            self.graphs = None
        return grad_x, ctx_grads, list(grads[1:1 + len(self.params)])

    def adjoint(self, grad_out: torch.Tensor):
        """Solve the adjoint; returns (input gradient, context gradients, parameter gradients)."""
        if self.graphs is not None and "relay" in self.graphs:
            return self.relay_adjoint(grad_out)
        module, config, comm = self.module, self.config, self.comm
        num_layers, h, counts = len(module.layers), module.step_size, module.counts
        graphs = self.graphs
        leaves = [self.ctx[k] for k in self.grad_ctx]
        param_index = {id(p): i for i, p in enumerate(self.params)}
        param_grads: List[Optional[torch.Tensor]] = [None] * len(self.params)
        ctx_grads: List[Optional[torch.Tensor]] = [None] * len(leaves)

        def layer_of(k, dt):  # reversed index k at the start of a step of size dt
            return num_layers - k - round(dt / h)

        def step(lam, k, dt):
            counts.count("adjoint", dt == h)
            leaf, f = graphs[layer_of(k, dt)]
            (g,) = torch.autograd.grad(f, leaf, dt * lam, retain_graph=True)
            return lam + g

        if graphs is None:
            raise RuntimeError(
                "backward through a layer-parallel forward a second time: its layer graphs were "
                "freed by the first backward; set `retain_graph = True` on the LayerParallel "
                "module to keep them")

        def final_step(lam, k, dt):
            counts.count("adjoint", True)
            n = layer_of(k, dt)
            leaf, f = graphs[n]
            own = self.layer_params[n]
            grads = torch.autograd.grad(f, [leaf, *own, *leaves], dt * lam, allow_unused=True,
                                        retain_graph=module.retain_graph)
            for p, g in zip(own, grads[1:1 + len(own)]):
                _accumulate(param_grads, param_index[id(p)], g)
            for i, g in enumerate(grads[1 + len(own):]):
                _accumulate(ctx_grads, i, g)
            return lam if grads[0] is None else lam + grads[0]

        ranges = None if module.layer_ranges is None else mirrored(num_layers, module.layer_ranges)
        with torch.no_grad():
            # the adjoint runs backwards through the same intervals: a coarse adjoint step uses
            # the graph of its interval's first layer, the last fine step in adjoint order
            result = solve(step, grad_out, num_layers, h, config,
                           max_iters=config.bwd_iters,
                           initial_states=module.warm_starts.states("adjoint", grad_out, config),
                           final_step=final_step, comm=comm.reversed(), ranges=ranges,
                           anchor="last")
            grad_x = result.states[-1]
            if comm.size > 1:   # rank 0 holds the input gradient; context gradients are summed
                grad_x = comm.broadcast(grad_x, root=0)
                ctx_grads = [comm.allreduce(torch.zeros_like(leaf) if g is None else g)
                             for leaf, g in zip(leaves, ctx_grads)]
                comm.flush()
        if not module.retain_graph:
            self.graphs = None
        module.warm_starts.remember("adjoint", result.states, config)
        module.stats = dataclasses.replace(module.stats, bwd_iters=result.iterations,
                                           bwd_residuals=result.residuals)
        return grad_x, ctx_grads, param_grads


def _accumulate(store, i, g):
    if g is not None:
        store[i] = g if store[i] is None else store[i] + g


class MGRITFunction(torch.autograd.Function):
    """The forward solve and, in backward, the adjoint solve of one ``StackCall``."""

    @staticmethod
    def forward(ctx, run: StackCall, x, *inputs):
        ctx.run = run
        return run.forward(x, record=True)

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            # The adjoint solve differentiates each layer once; differentiating through it again
            # would treat the solve's gradient as a constant and give a wrong answer, not an error.
            raise RuntimeError(
                "higher-order gradients (backward or autograd.grad with create_graph=True) are not "
                "supported through a LayerParallel stack solved by MGRIT or spread over several "
                "ranks; compute them on one process in serial mode (`stack.serial()`), where "
                "autograd runs through the layers themselves")
        run = ctx.run
        grad_x, ctx_grads, param_grads = run.adjoint(grad_out.contiguous())
        return (None, grad_x, *ctx_grads, *param_grads)


def check_call(module: nn.Module, x, ctx, micro_batch, run: StackCall,
               needs_grad: bool) -> bool:
    """Every rank of ``module``'s group must make the same call; returns whether any rank
    needs gradients."""
    ctx_key = sorted((k, tuple(v.shape) if torch.is_tensor(v) else repr(v)) for k, v in ctx.items())
    fields = {
        "the mode": (module.parallel, module.training, micro_batch, len(module.layers)),
        "the MGRIT options": config_key(module.mgrit),
        "the input": (tuple(x.shape), str(x.dtype)),
        "the keyword arguments": (ctx_key, run.grad_ctx)}
    if module.check_inputs:    # same shapes but different data would give rank 0's answer everywhere
        fields["the input values"] = content_checksum(x)
        fields["the keyword tensors' values"] = [(k, content_checksum(v)) for k, v in sorted(ctx.items())
                                                 if torch.is_tensor(v)]
    check_agreement(module.comm, fields, "in a forward call",
                    hint="every rank of a layer-parallel group must make the same call with the "
                         "same input (the same batch; data parallelism splits the batch between "
                         "groups, not within one); LayerParallel(check_inputs=False) skips the "
                         "check of the values")
    return module.comm.allreduce_sum(float(needs_grad)) > 0

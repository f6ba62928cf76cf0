"""LayerParallel: a stack of ODE steps whose forward and backward passes are MGRIT solves.

Layer n advances the state by x_{n+1} = x_n + h * F(x_n; theta_n). In layer-parallel mode the
forward pass solves this recursion with MGRIT; the backward pass solves the discrete adjoint
lambda_n = lambda_{n+1} + h * J_F(x_n)^T lambda_{n+1} with the same solver on the reversed
recursion. The forward's final sweep records one autograd graph per layer (F at the layer's
input state); every adjoint step, fine or coarse, is a vector-Jacobian product through one of
those graphs (a coarse step of level l uses the graph of its first fine layer, scaled by the
level's step). Parameter gradients are formed only in the adjoint's final sweep, and returned
through ``torch.autograd.Function`` so that autograd accumulates them into ``.grad``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .config import MGRITConfig
from .mgrit import solve
from .ode.dropout import DropoutSync

Rhs = Callable[..., torch.Tensor]


def _call_layer(layer: nn.Module, x: torch.Tensor, **ctx) -> torch.Tensor:
    return layer(x, **ctx)


@dataclass
class SolveStats:
    """Diagnostics of the last forward and backward solve (empty lists in serial mode)."""

    mode: str = "layer_parallel"
    fwd_iters: int = 0
    bwd_iters: int = 0
    fwd_residuals: List[float] = field(default_factory=list)
    bwd_residuals: List[float] = field(default_factory=list)

    @property
    def fwd_factors(self) -> List[float]:
        return _factors(self.fwd_residuals)

    @property
    def bwd_factors(self) -> List[float]:
        return _factors(self.bwd_residuals)


def _factors(r):
    return [r[i + 1] / r[i] if r[i] > 0 else float("nan") for i in range(len(r) - 1)]


class LayerParallel(nn.Module):
    """A stack of ODE steps x + h F_n(x) solved by MGRIT (or serially).

    layers: one module per step, holding that step's parameters.
    rhs: ``rhs(layer, x, **ctx) -> F(x)``; by default ``layer(x, **ctx)`` is F.
    step_size: h (default ``1 / len(layers)``, the neural-ODE form on [0, 1]).
    mgrit: the solver options (``fwd_iters``/``bwd_iters`` are the iteration counts).
    dropout_seed: seed of the synchronised dropout masks (equal on every process).

    The per-layer graphs of a layer-parallel forward are freed by its backward, as autograd
    frees a graph; set ``retain_graph = True`` to allow several backward passes through one
    forward (``gradcheck``, higher-level loops that backpropagate twice).

    Keyword arguments of ``forward`` (masks, memory, ...) reach every evaluation of every layer
    on every level and in the adjoint; tensors among them that require grad get their gradient.
    """

    def __init__(self, layers: Sequence[nn.Module], rhs: Optional[Rhs] = None,
                 step_size: Optional[float] = None, mgrit: Optional[MGRITConfig] = None,
                 dropout_seed: Optional[int] = None):
        super().__init__()
        self.layers = layers if isinstance(layers, nn.ModuleList) else nn.ModuleList(layers)
        num_layers = len(self.layers)
        if num_layers == 0:
            raise ValueError("LayerParallel needs at least one layer")
        self.rhs = rhs or _call_layer
        self.step_size = 1.0 / num_layers if step_size is None else float(step_size)
        if not self.step_size > 0:
            raise ValueError(f"step_size must be positive, got {step_size}")
        self.mgrit = mgrit if mgrit is not None else MGRITConfig()
        self.dropout = DropoutSync(dropout_seed)
        self.parallel = True
        self.retain_graph = False
        self.stats = SolveStats()
        self._warm: Dict[str, List[torch.Tensor]] = {}

    # ------------------------------------------------------------------ modes
    @property
    def mgrit(self) -> MGRITConfig:
        return self._mgrit

    @mgrit.setter
    def mgrit(self, config: MGRITConfig) -> None:
        spacing = config.coarsest_spacing
        if len(self.layers) % spacing:
            raise ValueError(
                f"{len(self.layers)} layers cannot be split into coarsest-level intervals of "
                f"{spacing} layers (levels={config.levels}, cfactors={config.cfactors}); the "
                "number of layers must be a multiple of the product of the cfactors")
        self._mgrit = config

    def serial(self) -> "LayerParallel":
        """Exact training: the layers run one after another through autograd."""
        self.parallel = False
        return self

    def layer_parallel(self) -> "LayerParallel":
        self.parallel = True
        return self

    def configure(self, **changes) -> None:
        """Change MGRIT options in place, e.g. ``configure(fwd_iters=4)``."""
        self.mgrit = dataclasses.replace(self.mgrit, **changes)

    # ------------------------------------------------------------------ forward
    def rhs_at(self, n: int, x: torch.Tensor, ctx: dict, micro_batch: Optional[int]) -> torch.Tensor:
        """F_n(x) under layer n's dropout masks."""
        with self.dropout.scope(n, micro_batch, x.device):
            return self.rhs(self.layers[n], x, **ctx)

    def forward(self, x: torch.Tensor, **ctx) -> torch.Tensor:
        if not torch.is_floating_point(x):
            raise TypeError(f"LayerParallel expects a floating-point state, got {x.dtype}")
        micro_batch = self.dropout.next_micro_batch() if self.training else None
        h = self.step_size
        if not self.parallel:
            self.stats = SolveStats(mode="serial")
            for n in range(len(self.layers)):
                x = x + h * self.rhs_at(n, x, ctx, micro_batch)
            return x
        run = _Run(self, ctx, micro_batch)
        if torch.is_grad_enabled() and (x.requires_grad or run.params or run.grad_ctx):
            return _MGRITFunction.apply(run, x, *run.grad_ctx_values(), *run.params)
        return run.forward(x, record=False)

    def _initial_states(self, kind: str, like: torch.Tensor) -> Optional[List[torch.Tensor]]:
        states = self._warm.get(kind)
        if not self.mgrit.warm_start or states is None or states[0].shape != like.shape \
                or states[0].dtype != like.dtype or states[0].device != like.device:
            return None
        return states

    def _remember(self, kind: str, states: List[torch.Tensor]) -> None:
        if self.mgrit.warm_start:
            self._warm[kind] = [s.detach() for s in states]

    def reset_warm_start(self) -> None:
        self._warm.clear()


class _Run:
    """One forward call and its adjoint: the context, the masks and the recorded graphs."""

    def __init__(self, module: LayerParallel, ctx: dict, micro_batch: Optional[int]):
        self.module, self.micro_batch = module, micro_batch
        self.grad_ctx = [k for k, v in ctx.items() if torch.is_tensor(v) and v.requires_grad]
        self.ctx_in = ctx
        # Tensors that need gradients become leaves so that each layer's graph ends there.
        self.ctx = {k: (v.detach().requires_grad_() if k in self.grad_ctx else v) for k, v in ctx.items()}
        self.graphs: Dict[int, tuple] = {}
        # The parameters as they are now (functional_call may swap them before backward).
        self.layer_params = [[p for p in layer.parameters() if p.requires_grad]
                             for layer in module.layers]
        self.params = list({id(p): p for ps in self.layer_params for p in ps}.values())

    def grad_ctx_values(self):
        return [self.ctx_in[k] for k in self.grad_ctx]

    def forward(self, x: torch.Tensor, record: bool) -> torch.Tensor:
        module = self.module
        rhs = module.rhs_at

        def step(u, n, dt):
            return u + dt * rhs(n, u, self.ctx, self.micro_batch)

        def recording_step(u, n, dt):
            leaf = u.detach().requires_grad_()
            with torch.enable_grad():
                f = rhs(n, leaf, self.ctx, self.micro_batch)
            self.graphs[n] = (leaf, f)
            return u + dt * f.detach()

        with torch.no_grad():
            result = solve(step, x.detach(), len(module.layers), module.step_size, module.mgrit,
                           max_iters=module.mgrit.fwd_iters,
                           initial_states=module._initial_states("forward", x),
                           final_step=recording_step if record else None)
        module._remember("forward", result.states)
        module.stats = SolveStats(fwd_iters=result.iterations, fwd_residuals=result.residuals)
        return result.states[-1]

    def adjoint(self, grad_out: torch.Tensor):
        """Solve the adjoint; returns (input gradient, context gradients, parameter gradients)."""
        module = self.module
        num_layers, h = len(module.layers), module.step_size
        graphs = self.graphs
        leaves = [self.ctx[k] for k in self.grad_ctx]
        param_index = {id(p): i for i, p in enumerate(self.params)}
        param_grads: List[Optional[torch.Tensor]] = [None] * len(self.params)
        ctx_grads: List[Optional[torch.Tensor]] = [None] * len(leaves)

        def layer_of(k, dt):  # reversed index k at the start of a step of size dt
            return num_layers - k - round(dt / h)

        def step(lam, k, dt):
            leaf, f = graphs[layer_of(k, dt)]
            (g,) = torch.autograd.grad(f, leaf, dt * lam, retain_graph=True)
            return lam + g

        if graphs is None:
            raise RuntimeError(
                "backward through a layer-parallel forward a second time: its layer graphs were "
                "freed by the first backward; set `retain_graph = True` on the LayerParallel "
                "module to keep them")

        def final_step(lam, k, dt):
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

        with torch.no_grad():
            result = solve(step, grad_out, num_layers, h, module.mgrit,
                           max_iters=module.mgrit.bwd_iters,
                           initial_states=module._initial_states("adjoint", grad_out),
                           final_step=final_step)
        if not module.retain_graph:
            self.graphs = None
        module._remember("adjoint", result.states)
        module.stats = dataclasses.replace(module.stats, bwd_iters=result.iterations,
                                           bwd_residuals=result.residuals)
        return result.states[-1], ctx_grads, param_grads


def _accumulate(store, i, g):
    if g is not None:
        store[i] = g if store[i] is None else store[i] + g


class _MGRITFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: _Run, x, *inputs):
        ctx.run = run
        return run.forward(x, record=True)

    @staticmethod
    def backward(ctx, grad_out):
        run = ctx.run
        grad_x, ctx_grads, param_grads = run.adjoint(grad_out.contiguous())
        return (None, grad_x, *ctx_grads, *param_grads)

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
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..mgrit.comm import Communicator
from ..mgrit.comm_backends import as_communicator
from ..mgrit.config import MGRITConfig
from .blocks import Rhs
from .counts import SolveStats, StepCounts
from .dropout import DropoutSync
from ._coarse_view import CoarseViews
from ._stack_call import MGRITFunction, StackCall, WarmStarts, check_call
from .ownership import RemoteLayer, check_agreement, config_key, layer_key, partition_layers

__all__ = ["named_stacks", "find_stacks", "LayerParallel", "SolveStats"]


def _call_layer(layer: nn.Module, x: torch.Tensor, **ctx) -> torch.Tensor:
    return layer(x, **ctx)


def named_stacks(model: nn.Module) -> List[Tuple[str, "LayerParallel"]]:
    """(name, module) of the LayerParallel modules inside ``model`` (itself included: "")."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LayerParallel)]


def find_stacks(model: nn.Module) -> List["LayerParallel"]:
    """The LayerParallel modules inside ``model`` (itself included), in module order."""
    return [m for _, m in named_stacks(model)]


class LayerParallel(CoarseViews, nn.Module):
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

    comm: the layer-parallel group (None: this process alone; an xbt ``Communicator``, a
    torch.distributed process group or an mpi4py communicator). Rank r owns the r-th range of
    layers, ``layer_ranges[r]`` (``partition``: None balances the ranges to within one layer,
    ``"even"`` demands equal ranges, or a list of layer counts per rank); any MGRIT hierarchy that fits the layers
    runs on any number of ranks up to the number of layers (a coarse interval is evaluated by
    the rank that owns its first layer, so coarse levels live on fewer ranks when they have
    fewer points); the other layers become
    ``RemoteLayer`` placeholders without parameters. Every rank builds the same module and
    calls it with the same input; the output and the input gradient are the same on every
    rank. Serial mode relays the state along the ranks.

    check_inputs: with several ranks, every forward call checks that the ranks pass the same
    input (and keyword tensors) by a content checksum carried in the agreement collective that
    every call makes anyway; different data on different ranks is then a ``ValueError`` naming
    the ranks, not rank 0's answer everywhere. Its cost is two integer sums over the input per
    call; ``check_inputs=False`` (or setting the attribute) leaves only the shape check.
    """

    def __init__(self, layers: Sequence[nn.Module], rhs: Optional[Rhs] = None,
                 step_size: Optional[float] = None, mgrit: Optional[MGRITConfig] = None,
                 dropout_seed: Optional[int] = None, comm=None, partition=None,
                 check_inputs: bool = True):
        super().__init__()
        self.check_inputs = bool(check_inputs)
        self.layers = layers if isinstance(layers, nn.ModuleList) else nn.ModuleList(layers)
        num_layers = len(self.layers)
        if num_layers == 0:
            raise ValueError("LayerParallel needs at least one layer")
        self.comm = as_communicator(comm)
        self.layer_ranges = None   # the fine layers [(lo, hi)] of every rank when distributed
        self._num_layers = num_layers
        self.rhs = rhs or _call_layer
        self.step_size = 1.0 / num_layers if step_size is None else float(step_size)
        if not self.step_size > 0:
            raise ValueError(f"step_size must be positive, got {step_size}")
        config = mgrit if mgrit is not None else MGRITConfig()
        if self.comm.size > 1:
            self._distribute(config, partition, dropout_seed)
        self.mgrit = config
        self.dropout = DropoutSync(dropout_seed)
        if self.comm.size > 1 and dropout_seed is None:   # one seed for the whole group
            seed = torch.tensor([self.dropout.seed & ((1 << 63) - 1)], device=self.comm.device)
            self.dropout.seed = int(self.comm.broadcast(seed, root=0)[0])
        self._parallel = True
        self.retain_graph = False
        self.stats = SolveStats()
        self.counts = StepCounts()
        self.warm_starts = WarmStarts()

    def _distribute(self, config: MGRITConfig, partition, dropout_seed) -> None:
        comm, num_layers = self.comm, len(self.layers)
        # Agree first (a collective every rank reaches), so that a mismatch is reported on
        # every rank instead of leaving some of them waiting.
        check_agreement(comm, {
            "the number of layers": num_layers, "the step size": self.step_size,
            "the MGRIT options": config_key(config), "the partition": partition,
            "the layer structure": [layer_key(layer) for layer in self.layers],
            "the dropout seed": dropout_seed}, "when building LayerParallel")
        self.layer_ranges = partition_layers(num_layers, config.coarsest_spacing, comm.size, partition)
        lo, hi = self.layer_ranges[comm.rank]
        for n, layer in enumerate(self.layers):
            if not lo <= n < hi:
                owner = next(r for r, (a, b) in enumerate(self.layer_ranges) if a <= n < b)
                self.layers[n] = RemoteLayer(n, owner, layer)

    @property
    def owned_range(self) -> Tuple[int, int]:
        """The fine layers ``(lo, hi)`` this rank owns (all of them on a single process)."""
        if self.layer_ranges is None:
            return 0, len(self.layers)
        if len(self.layers) != self._num_layers:
            raise RuntimeError("the layers of a distributed LayerParallel cannot be replaced")
        return self.layer_ranges[self.comm.rank]

    @property
    def owned_layers(self) -> range:
        return range(*self.owned_range)

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
        # any layer ranges of the ranks fit: each coarse interval is evaluated by the owner of its
        # first layer, whichever rank that is (mgrit.layout)
        self._mgrit = config

    @property
    def parallel(self) -> bool:
        """Whether forward and backward are MGRIT solves (False: exact serial propagation)."""
        return self._parallel

    # deprecated names of the ranks' layer ranges (a "block" is a transformer block)
    @property
    def blocks(self):
        """Deprecated name of ``layer_ranges``."""
        warnings.warn("LayerParallel.blocks is now layer_ranges", DeprecationWarning, stacklevel=2)
        return self.layer_ranges

    @property
    def block(self) -> Tuple[int, int]:
        """Deprecated name of ``owned_range``."""
        warnings.warn("LayerParallel.block is now owned_range", DeprecationWarning, stacklevel=2)
        return self.owned_range

    def coarse_blocks(self, stride: int, offset: int = 0):
        """Deprecated name of ``coarse_ranges``."""
        warnings.warn("LayerParallel.coarse_blocks is now coarse_ranges", DeprecationWarning,
                      stacklevel=2)
        return self.coarse_ranges(stride, offset)

    def serial(self) -> "LayerParallel":
        """Exact training: the layers run one after another through autograd."""
        self._parallel = False
        return self

    def layer_parallel(self) -> "LayerParallel":
        self._parallel = True
        return self

    def set_parallel(self, parallel: bool) -> "LayerParallel":
        """``layer_parallel()`` when ``parallel`` is true, else ``serial()``."""
        return self.layer_parallel() if parallel else self.serial()

    # ------------------------------------------------------------------ extension points
    def wrap_comm(self, wrap: Callable[[Communicator], Communicator]) -> None:
        """Route this stack's messages through ``wrap(comm)`` (e.g. a virtual clock). The
        wrapper must keep the rank and the size: the layer ranges were split for them."""
        comm = wrap(self.comm)
        if (comm.rank, comm.size) != (self.comm.rank, self.comm.size):
            raise ValueError(f"wrap_comm: the wrapper changed (rank, size) from "
                             f"{(self.comm.rank, self.comm.size)} to {(comm.rank, comm.size)}")
        self.comm = comm

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
        with self.dropout.call_scope(micro_batch is not None, x.device):
            return self._forward(x, ctx, micro_batch)

    def _forward(self, x: torch.Tensor, ctx: dict, micro_batch: Optional[int]) -> torch.Tensor:
        h = self.step_size
        if not self.parallel and self.comm.size == 1:
            self.stats = SolveStats(mode="serial")
            self.counts.forward_fine += len(self.layers)
            for n in range(len(self.layers)):
                x = torch.add(x, self.rhs_at(n, x, ctx, micro_batch), alpha=h)
            return x
        run = StackCall(self, ctx, micro_batch)
        needs_grad = torch.is_grad_enabled() and bool(x.requires_grad or run.params or run.grad_ctx)
        if self.comm.size > 1:
            needs_grad = check_call(self, x, ctx, micro_batch, run, needs_grad)
        if needs_grad:
            return MGRITFunction.apply(run, x, *run.grad_ctx_values(), *run.params)
        return run.forward(x, record=False)

    def reset_warm_start(self) -> None:
        self.warm_starts.clear()

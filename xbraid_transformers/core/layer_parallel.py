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

import contextlib
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..mgrit import solve
from ..mgrit.comm import Communicator
from ..mgrit.comm_backends import as_communicator
from ..mgrit.config import MGRITConfig
from ..mgrit.layout import mirrored
from .blocks import Rhs
from .counts import StepCounts
from .dropout import DropoutSync
from .ownership import RemoteLayer, check_agreement, config_key, content_checksum, layer_key, partition_layers


def _call_layer(layer: nn.Module, x: torch.Tensor, **ctx) -> torch.Tensor:
    return layer(x, **ctx)


def named_stacks(model: nn.Module) -> List[Tuple[str, "LayerParallel"]]:
    """(name, module) of the LayerParallel modules inside ``model`` (itself included: "")."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LayerParallel)]


def find_stacks(model: nn.Module) -> List["LayerParallel"]:
    """The LayerParallel modules inside ``model`` (itself included), in module order."""
    return [m for _, m in named_stacks(model)]


@dataclass
class SolveStats:
    """Diagnostics of the last forward and backward solve (empty lists in serial mode)."""

    mode: str = "parallel"
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

    comm: the layer-parallel group (None: this process alone; an xbt ``Communicator``, a
    torch.distributed process group or an mpi4py communicator). Rank r owns the r-th block of
    layers (``partition``: None balances the blocks to within one layer, ``"even"`` demands
    equal blocks, or a list of layer counts per rank); any MGRIT hierarchy that fits the layers
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
        self.blocks = None   # [(lo, hi)] of every rank when distributed
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
        self._warm: Dict[str, List[torch.Tensor]] = {}

    def _distribute(self, config: MGRITConfig, partition, dropout_seed) -> None:
        comm, num_layers = self.comm, len(self.layers)
        # Agree first (a collective every rank reaches), so that a mismatch is reported on
        # every rank instead of leaving some of them waiting.
        check_agreement(comm, {
            "the number of layers": num_layers, "the step size": self.step_size,
            "the MGRIT options": config_key(config), "the partition": partition,
            "the layer structure": [layer_key(layer) for layer in self.layers],
            "the dropout seed": dropout_seed}, "when building LayerParallel")
        self.blocks = partition_layers(num_layers, config.coarsest_spacing, comm.size, partition)
        lo, hi = self.blocks[comm.rank]
        for n, layer in enumerate(self.layers):
            if not lo <= n < hi:
                owner = next(r for r, (a, b) in enumerate(self.blocks) if a <= n < b)
                self.layers[n] = RemoteLayer(n, owner, layer)

    @property
    def block(self):
        """The fine layers ``(lo, hi)`` this rank owns (all of them on a single process)."""
        if self.blocks is None:
            return 0, len(self.layers)
        if len(self.layers) != self._num_layers:
            raise RuntimeError("the layers of a distributed LayerParallel cannot be replaced")
        return self.blocks[self.comm.rank]

    @property
    def owned_layers(self) -> range:
        return range(*self.block)

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
        # any blocks of the ranks fit: each coarse interval is evaluated by the owner of its
        # first layer, whichever rank that is (mgrit.layout)
        self._mgrit = config

    @property
    def parallel(self) -> bool:
        """Whether forward and backward are MGRIT solves (False: exact serial propagation)."""
        return self._parallel

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
        wrapper must keep the rank and the size: the layer blocks were split for them."""
        comm = wrap(self.comm)
        if (comm.rank, comm.size) != (self.comm.rank, self.comm.size):
            raise ValueError(f"wrap_comm: the wrapper changed (rank, size) from "
                             f"{(self.comm.rank, self.comm.size)} to {(comm.rank, comm.size)}")
        self.comm = comm

    def coarse_layers(self, stride: int, offset: int = 0) -> List[int]:
        """The fine layers ``offset, offset + stride, ...`` of a coarse view (validated)."""
        num_layers = len(self.layers)
        if not isinstance(stride, int) or stride < 1 or not 0 <= offset < stride:
            raise ValueError(
                f"need stride >= 1 and 0 <= offset < stride, got stride={stride}, offset={offset}")
        if num_layers % stride:
            raise ValueError(f"{num_layers} layers cannot be coarsened by {stride}")
        return list(range(offset, num_layers, stride))

    def coarse_blocks(self, stride: int, offset: int = 0):
        """The ranks' blocks of a coarse view's layers (rank r keeps the selected layers it
        owns); None on a single process. Raises when a rank would be left without layers."""
        self.coarse_layers(stride, offset)
        if self.blocks is None:
            return None
        blocks = [(-(-(lo - offset) // stride), -(-(hi - offset) // stride))
                  for lo, hi in self.blocks]
        if any(lo == hi for lo, hi in blocks):
            raise ValueError(f"a coarse view with stride {stride} leaves a rank without layers "
                             f"(fine blocks {self.blocks}); use fewer ranks or a smaller stride")
        return blocks

    @contextlib.contextmanager
    def coarse_view(self, stride: int, offset: int = 0) -> Iterator["LayerParallel"]:
        """Inside the block this stack runs the layers ``offset::stride`` with step
        ``stride * h``: a coarser forward-Euler discretisation of the same ODE. The layer
        modules are shared, not copied. It stays layer-parallel when the MGRIT hierarchy fits
        the coarse layers and the ranks' coarse blocks, and otherwise runs serially (relayed
        along the ranks); each rank keeps the selected layers of its own block."""
        keep = self.coarse_layers(stride, offset)
        blocks = self.coarse_blocks(stride, offset)
        saved = (self.layers, self.step_size, self.mgrit, self.parallel, self.blocks,
                 self._num_layers)
        fits = len(keep) % self.mgrit.coarsest_spacing == 0
        self.layers = nn.ModuleList(self.layers[i] for i in keep)
        self.blocks, self._num_layers = blocks, len(keep)
        # through the setters: the options are checked against the coarse layers now in place
        self.mgrit = self.mgrit if fits else MGRITConfig(levels=1)
        self.step_size *= stride
        self.set_parallel(self.parallel and fits)
        self.reset_warm_start()
        try:
            yield self
        finally:
            layers, self.step_size, mgrit, parallel, self.blocks, self._num_layers = saved
            self.layers = layers
            self.mgrit = mgrit
            self.set_parallel(parallel)
            self.reset_warm_start()

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
        run = _Run(self, ctx, micro_batch)
        needs_grad = torch.is_grad_enabled() and bool(x.requires_grad or run.params or run.grad_ctx)
        if self.comm.size > 1:
            needs_grad = self._check_call(x, ctx, micro_batch, run, needs_grad)
        if needs_grad:
            return _MGRITFunction.apply(run, x, *run.grad_ctx_values(), *run.params)
        return run.forward(x, record=False)

    def _check_call(self, x, ctx, micro_batch, run, needs_grad) -> bool:
        """Every rank must make the same call; returns whether any rank needs gradients."""
        ctx_key = sorted((k, tuple(v.shape) if torch.is_tensor(v) else repr(v)) for k, v in ctx.items())
        fields = {
            "the mode": (self.parallel, self.training, micro_batch, len(self.layers)),
            "the MGRIT options": config_key(self.mgrit),
            "the input": (tuple(x.shape), str(x.dtype)),
            "the keyword arguments": (ctx_key, run.grad_ctx)}
        if self.check_inputs:    # same shapes but different data would give rank 0's answer everywhere
            fields["the input values"] = content_checksum(x)
            fields["the keyword tensors' values"] = [(k, content_checksum(v)) for k, v in sorted(ctx.items())
                                                     if torch.is_tensor(v)]
        check_agreement(self.comm, fields, "in a forward call",
                        hint="every rank of a layer-parallel group must make the same call with the "
                             "same input (the same batch; data parallelism splits the batch between "
                             "groups, not within one); LayerParallel(check_inputs=False) skips the "
                             "check of the values")
        return self.comm.allreduce_sum(float(needs_grad)) > 0

    def _warm_states(self, kind: str, like: torch.Tensor,
                        config: MGRITConfig) -> Optional[List[torch.Tensor]]:
        states = self._warm.get(kind)
        if not config.warm_start or states is None or states[0].shape != like.shape \
                or states[0].dtype != like.dtype or states[0].device != like.device:
            return None
        return states

    def _remember(self, kind: str, states: List[torch.Tensor], config: MGRITConfig) -> None:
        if config.warm_start:
            self._warm[kind] = [s.detach() for s in states]

    def reset_warm_start(self) -> None:
        self._warm.clear()


class _Run:
    """One forward call and its adjoint: the context, the masks and the recorded graphs."""

    def __init__(self, module: LayerParallel, ctx: dict, micro_batch: Optional[int]):
        self.module, self.micro_batch = module, micro_batch
        self.config = module.mgrit
        self.comm = module.comm
        self.block = module.block
        self.grad_ctx = [k for k, v in ctx.items() if torch.is_tensor(v) and v.requires_grad]
        self.ctx_in = ctx
        # Tensors that need gradients become leaves so that each layer's graph ends there.
        self.ctx = {k: (v.detach().requires_grad_() if k in self.grad_ctx else v) for k, v in ctx.items()}
        self.graphs: Dict[int, tuple] = {}
        # The parameters of this rank's layers as they are now (functional_call may swap them
        # before backward); the other layers are placeholders without any: O(N / P) per call.
        lo, hi = self.block
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
                           initial_states=module._warm_states("forward", x, config),
                           final_step=recording_step if record else None,
                           comm=comm, blocks=module.blocks)
            out = result.states[-1]
            if comm.size > 1:   # the last rank holds the output; every rank returns it
                out = comm.broadcast(out, root=comm.size - 1)
                comm.flush()
        module._remember("forward", result.states, config)
        module.stats = SolveStats(mode="parallel" if module.parallel else "serial",
                                  fwd_iters=result.iterations, fwd_residuals=result.residuals)
        return out

    def relay_forward(self, x: torch.Tensor, record: bool) -> torch.Tensor:
        """Serial mode over several ranks: each rank runs its block through autograd after the
        previous rank's, so the arithmetic is exactly that of one process."""
        module, comm = self.module, self.comm
        lo, hi = self.block
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

        blocks = None if module.blocks is None else mirrored(num_layers, module.blocks)
        with torch.no_grad():
            # the adjoint runs backwards through the same intervals: a coarse adjoint step uses
            # the graph of its interval's first layer, the last fine step in adjoint order
            result = solve(step, grad_out, num_layers, h, config,
                           max_iters=config.bwd_iters,
                           initial_states=module._warm_states("adjoint", grad_out, config),
                           final_step=final_step, comm=comm.reversed(), blocks=blocks,
                           anchor="last")
            grad_x = result.states[-1]
            if comm.size > 1:   # rank 0 holds the input gradient; context gradients are summed
                grad_x = comm.broadcast(grad_x, root=0)
                ctx_grads = [comm.allreduce(torch.zeros_like(leaf) if g is None else g)
                             for leaf, g in zip(leaves, ctx_grads)]
                comm.flush()
        if not module.retain_graph:
            self.graphs = None
        module._remember("adjoint", result.states, config)
        module.stats = dataclasses.replace(module.stats, bwd_iters=result.iterations,
                                           bwd_residuals=result.residuals)
        return grad_x, ctx_grads, param_grads


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

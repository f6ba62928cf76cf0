"""Multilevel training in depth: train coarse discretisations of the ODE, then the fine one.

A stack of N layers with step h is a forward-Euler discretisation of an ODE; every other layer
with step 2h is a coarser discretisation of the same ODE. A *coarse view* makes a model's
LayerParallel stacks use the layers ``offset, offset + stride, ...`` with step ``stride * h``.
The view shares the layer modules with the fine model, so restriction is the view itself and
prolongation (handing the trained coarse layers back) needs no copy: training the view updates
the fine model's layers in place, and the skipped layers stay untouched.

For nested iteration (train N/4 layers, then N/2, then N), ``prolongate`` fills the layers a
coarse view skipped, by copying the nearest trained layer before them or by linear
interpolation between the trained neighbours.

A ``MultilevelSchedule`` says which view every optimisation step uses. Choices it makes
explicit (arXiv 2504.18590 leaves them open):
- cycle lengths: ``coarse_steps`` per coarse view, ``fine_steps`` per fine phase;
- optimizer state at a phase change: ``"keep"`` (one optimizer throughout: momentum of the
  shared layers carries over), or ``"reset"`` (the state of every parameter is dropped when the
  phase changes);
- ``mgopt``: the MG/OPT first-order correction. At the start of a coarse phase the fine gradient
  g_h and the coarse gradient g_H are taken at the same point on one batch; during the phase the
  coarse gradient is replaced by g_H - (g_H(start) - R g_h(start)), so that the first coarse
  step follows the fine gradient. R is injection: a coarse layer's restricted gradient is the
  fine gradient of the same layer; parameters outside the stacks map one to one.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .config import MGRITConfig
from .layer_parallel import LayerParallel

FINE = (1, 0)


def stacks(model: nn.Module) -> List[LayerParallel]:
    found = [m for m in model.modules() if isinstance(m, LayerParallel)]
    if not found:
        raise ValueError(f"{type(model).__name__} contains no LayerParallel stack to coarsen")
    return found


def selected_layers(num_layers: int, stride: int, offset: int) -> List[int]:
    if stride < 1 or not 0 <= offset < stride:
        raise ValueError(f"need stride >= 1 and 0 <= offset < stride, got stride={stride}, offset={offset}")
    if num_layers % stride:
        raise ValueError(f"{num_layers} layers cannot be coarsened by {stride}")
    return list(range(offset, num_layers, stride))


@contextlib.contextmanager
def coarse_view(model: nn.Module, stride: int = 2, offset: int = 0):
    """Inside the block every LayerParallel stack of ``model`` runs the layers
    ``offset::stride`` with step ``stride * h`` (serially, unless the stack's MGRIT hierarchy
    also fits the coarse layer count). The layer modules are shared, not copied."""
    saved = []
    for stack in stacks(model):
        keep = selected_layers(len(stack.layers), stride, offset)
        saved.append((stack, stack.layers, stack.step_size, stack.mgrit, stack.parallel))
        coarse = nn.ModuleList(stack.layers[i] for i in keep)
        # Bypass the hierarchy check of LayerParallel.mgrit until the layers are swapped.
        stack._mgrit = MGRITConfig(levels=1)
        stack.layers = coarse
        stack.step_size = stack.step_size * stride
        fits = len(coarse) % saved[-1][3].coarsest_spacing == 0
        stack._mgrit = saved[-1][3] if fits else MGRITConfig(levels=1)
        stack.parallel = stack.parallel and fits
        stack.reset_warm_start()
    try:
        yield model
    finally:
        for stack, layers, step_size, mgrit, parallel in saved:
            stack.layers, stack.step_size, stack.parallel = layers, step_size, parallel
            stack._mgrit = mgrit
            stack.reset_warm_start()


@torch.no_grad()
def prolongate(model: nn.Module, stride: int, method: str = "copy") -> None:
    """Fill the layers a ``coarse_view(stride, offset=0)`` skipped from the trained ones.

    ``"copy"``: layer i takes the parameters of layer ``stride * (i // stride)``.
    ``"linear"``: layer i interpolates linearly between the trained layers before and after it
    (the last block, which has no trained layer after it, copies).
    """
    if method not in ("copy", "linear"):
        raise ValueError(f"method must be 'copy' or 'linear', got {method!r}")
    for stack in stacks(model):
        layers = stack.layers
        selected_layers(len(layers), stride, 0)
        for i in range(len(layers)):
            j = i % stride
            if j == 0:
                continue
            left = layers[i - j]
            right = layers[i - j + stride] if i - j + stride < len(layers) else None
            weight = j / stride if (method == "linear" and right is not None) else 0.0
            for (name, target), source_left in zip(layers[i].state_dict(keep_vars=True).items(),
                                                    left.state_dict(keep_vars=True).values()):
                if not torch.is_floating_point(target):
                    target.copy_(source_left)
                    continue
                value = source_left.detach()
                if weight:
                    value = torch.lerp(value, right.state_dict(keep_vars=True)[name].detach(), weight)
                target.copy_(value)


@dataclass(frozen=True)
class Phase:
    """``steps`` optimisation steps on the view (stride, offset); (1, 0) is the fine model."""

    stride: int
    offset: int
    steps: int
    prolongate_after: Optional[str] = None  # nested iteration: fill skipped layers afterwards

    @property
    def is_fine(self) -> bool:
        return self.stride == 1


@dataclass
class MultilevelSchedule:
    """Which view each optimisation step trains.

    ``v_cycle(coarse_steps, fine_steps, cycles)``: cycles of (even, odd, fine) phases.
    ``nested(steps_per_level, levels=3, method)``: N/4 -> N/2 -> N with prolongation between.
    """

    phases: Tuple[Phase, ...]
    optimizer_state: str = "keep"
    mgopt: bool = False

    def __post_init__(self):
        if self.optimizer_state not in ("keep", "reset"):
            raise ValueError(f"optimizer_state must be 'keep' or 'reset', got {self.optimizer_state!r}")
        if not self.phases or any(p.steps < 1 for p in self.phases):
            raise ValueError("a schedule needs phases of at least one step each")

    @classmethod
    def v_cycle(cls, coarse_steps: int, fine_steps: int, cycles: int, **options) -> "MultilevelSchedule":
        one = (Phase(2, 0, coarse_steps), Phase(2, 1, coarse_steps), Phase(1, 0, fine_steps))
        return cls(one * cycles, **options)

    @classmethod
    def nested(cls, steps_per_level: Sequence[int], method: str = "copy", **options) -> "MultilevelSchedule":
        """Coarsest first: steps_per_level[0] on every 2^(L-1)-th layer, ..., the last on all."""
        levels = len(steps_per_level)
        phases = []
        for k, steps in enumerate(steps_per_level):
            stride = 2 ** (levels - 1 - k)
            phases.append(Phase(stride, 0, steps, method if stride > 1 else None))
        return cls(tuple(phases), **options)

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def __iter__(self) -> Iterator[Phase]:
        return iter(self.phases)


def train_multilevel(model: nn.Module, optimizer: torch.optim.Optimizer,
                     loss_on: Callable[[nn.Module, int], torch.Tensor],
                     schedule: MultilevelSchedule,
                     on_step: Optional[Callable[[int, Phase, float], None]] = None) -> List[float]:
    """Run the schedule. ``loss_on(model, step)`` returns the loss of batch ``step`` for the model
    as it is (fine or inside a coarse view). Returns the losses of every step."""
    losses: List[float] = []
    step = 0
    for phase in schedule:
        if schedule.optimizer_state == "reset":
            optimizer.state.clear()
        fine_grads = _gradients(model, loss_on, step) if schedule.mgopt and not phase.is_fine else None
        view = contextlib.nullcontext(model) if phase.is_fine else coarse_view(model, phase.stride, phase.offset)
        with view:
            correction = None
            if fine_grads is not None:
                coarse_grads = _gradients(model, loss_on, step)
                correction = {p: coarse_grads[p] - fine_grads[p] for p in coarse_grads if p in fine_grads}
            for _ in range(phase.steps):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_on(model, step)
                loss.backward()
                if correction:
                    for p, c in correction.items():
                        if p.grad is not None:
                            p.grad.sub_(c)
                optimizer.step()
                losses.append(loss.item())
                if on_step is not None:
                    on_step(step, phase, losses[-1])
                step += 1
        if phase.prolongate_after:
            prolongate(model, phase.stride, phase.prolongate_after)
    return losses


def _gradients(model, loss_on, step):
    """Gradients of one batch's loss at the current parameters, by parameter (none stored)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_on(model, step), params, allow_unused=True)
    return {p: g for p, g in zip(params, grads) if g is not None}

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
- ``coarse_gradients``: a coarse layer's step is ``stride * h``, so its gradient carries that
  factor, and one SGD step on a view of stride s moves the ODE's output about s times as far
  as a fine step with the same learning rate (s^2 from the step size, 1/s from the layer
  count). ``"scaled"`` (default) divides the gradients of the view's layers by s, which makes
  a learning rate mean the same on every level (and the scaled gradient of a coarse layer
  close to the mean fine gradient of the layers it stands for); ``"raw"`` keeps autograd's.
  Adam-type optimizers are invariant to the scale, up to gradient clipping and epsilon;
- optimizer state at a phase change: ``"keep"`` (one optimizer throughout: momentum of the
  shared layers carries over), ``"reset"`` (the state of every parameter is dropped when the
  phase changes) or ``"transfer"`` (as keep, and a prolongation also gives each filled layer
  the optimizer state of the trained layer before it, whose weights it starts from);
- ``mgopt``: the MG/OPT first-order correction. At the start of a coarse phase the fine gradient
  g_h and the coarse gradient g_H are taken at the same point on one batch; during the phase the
  coarse gradient is replaced by g_H - (g_H(start) - R g_h(start)), so that the first coarse
  step follows the fine gradient. R is injection: a coarse layer's restricted gradient is the
  fine gradient of the same layer; parameters outside the stacks map one to one.
- ``line_search`` (with mgopt): MG/OPT's safeguard. The coarse phase moves the parameters from
  theta_0 to theta_1; afterwards the fine loss on the phase's first batch (model in eval mode)
  is compared at theta_0 + a (theta_1 - theta_0) for a = 1, 1/2, 1/4, 1/8, and the first a
  that lowers it below the value at theta_0 is kept (none: theta_0 is restored). When a < 1
  the optimizer state of the moved parameters is dropped: it was built along the rejected
  path.

``MultilevelConfig`` builds a schedule for a run of a given length (the trainer's and
``xbt train --schedule multilevel``'s form); ``MultilevelStepper`` applies a schedule one
optimisation step at a time inside any training loop; ``train_multilevel`` is the whole loop.
On several ranks every rank keeps the layers of its own block in every view.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .core.layer_parallel import LayerParallel, find_stacks

CYCLES = ("nested", "v")
PROLONGATIONS = ("copy", "linear")
OPTIMIZER_STATES = ("keep", "reset", "transfer")
COARSE_GRADIENTS = ("scaled", "raw")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def stacks(model: nn.Module) -> List[LayerParallel]:
    found = find_stacks(model)
    if not found:
        raise ValueError(f"{type(model).__name__} contains no LayerParallel stack to coarsen")
    return found


@contextlib.contextmanager
def coarse_view(model: nn.Module, stride: int = 2, offset: int = 0):
    """Inside the block every LayerParallel stack of ``model`` runs the layers
    ``offset::stride`` with step ``stride * h`` (``LayerParallel.coarse_view``: serially,
    unless the stack's MGRIT hierarchy also fits the coarse layer count and the ranks' blocks).
    The layer modules are shared, not copied; on several ranks each keeps the selected layers
    of its own block."""
    with contextlib.ExitStack() as views:
        for stack in stacks(model):
            views.enter_context(stack.coarse_view(stride, offset))
        yield model


def _entries(layer: nn.Module) -> dict:
    return layer.state_dict(keep_vars=True)


def _first_layer_of_next_rank(stack: LayerParallel) -> Optional[dict]:
    """Each rank sends its first layer to the previous rank (linear prolongation needs the
    trained layer after a block's last group); returns the next rank's, None on the last."""
    comm = stack.comm
    lo, hi = stack.block
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
    (the last block, which has no trained layer after it, copies). On several ranks, every
    rank fills its own layers (each block starts with a trained layer)."""
    _check_choice("method", method, PROLONGATIONS)
    for stack in stacks(model):
        layers = stack.layers
        stack.coarse_layers(stride, 0)
        lo, hi = stack.block
        if lo % stride or hi % stride:
            raise ValueError(f"the blocks {stack.blocks} do not start at trained layers of stride {stride}")
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
    lo, hi = stack.block
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
    line_search: bool = False
    coarse_gradients: str = "scaled"

    def __post_init__(self):
        if self.line_search and not self.mgopt:
            raise ValueError("line_search is MG/OPT's safeguard: it needs mgopt=True")
        _check_choice("optimizer_state", self.optimizer_state, OPTIMIZER_STATES)
        _check_choice("coarse_gradients", self.coarse_gradients, COARSE_GRADIENTS)
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

    def locate(self, step: int) -> Tuple[Phase, int]:
        """The phase of optimisation step ``step`` and the step that phase starts at."""
        first = 0
        for phase in self.phases:
            if step < first + phase.steps:
                return phase, first
            first += phase.steps
        raise IndexError(f"step {step} is past the schedule's {self.total_steps} steps")

    def __iter__(self) -> Iterator[Phase]:
        return iter(self.phases)


@dataclass
class MultilevelConfig:
    """A schedule over a run of ``steps`` optimisation steps (what ``xbt train --schedule
    multilevel`` builds).

    cycle ``"nested"``: ``coarse_steps`` on every 2^(levels-1)-th layer, the same on every
    2^(levels-2)-th, ..., with ``prolongation`` ("copy" or "linear") after each coarse level;
    the fine model takes the remaining steps. cycle ``"v"``: (even, odd, fine) phases of
    ``coarse_steps``, ``coarse_steps`` and ``fine_steps`` repeated until ``steps`` (the last
    phase is cut short). optimizer_state, mgopt, line_search and coarse_gradients: see
    :class:`MultilevelSchedule`.
    """

    cycle: str = "nested"
    coarse_steps: int = 25
    fine_steps: int = 25
    levels: int = 3
    prolongation: str = "copy"
    optimizer_state: str = "keep"
    mgopt: bool = False
    line_search: bool = False
    coarse_gradients: str = "scaled"

    def __post_init__(self):
        _check_choice("cycle", self.cycle, CYCLES)
        _check_choice("prolongation", self.prolongation, PROLONGATIONS)
        _check_choice("optimizer_state", self.optimizer_state, OPTIMIZER_STATES)
        _check_choice("coarse_gradients", self.coarse_gradients, COARSE_GRADIENTS)
        for name in ("coarse_steps", "fine_steps", "levels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.cycle == "nested" and self.levels < 2:
            raise ValueError("nested iteration needs levels >= 2")

    def schedule(self, steps: int) -> MultilevelSchedule:
        options = dict(optimizer_state=self.optimizer_state, mgopt=self.mgopt,
                       line_search=self.line_search, coarse_gradients=self.coarse_gradients)
        if self.cycle == "nested":
            fine = steps - (self.levels - 1) * self.coarse_steps
            if fine < 1:
                raise ValueError(f"{steps} steps leave no fine steps after {self.levels - 1} coarse "
                                 f"levels of {self.coarse_steps} steps")
            return MultilevelSchedule.nested([self.coarse_steps] * (self.levels - 1) + [fine],
                                             self.prolongation, **options)
        one = (Phase(2, 0, self.coarse_steps), Phase(2, 1, self.coarse_steps),
               Phase(1, 0, self.fine_steps))
        phases, left = [], steps
        while left > 0:
            for phase in one:
                if left > 0:
                    phases.append(dataclasses.replace(phase, steps=min(phase.steps, left)))
                    left -= phases[-1].steps
        return MultilevelSchedule(tuple(phases), **options)


class MultilevelStepper:
    """Applies a schedule to a model and its optimizer one optimisation step at a time:

        for step in range(schedule.total_steps):
            with stepper.step(step, loss_on) as phase:    # inside: the phase's view
                ... forward, backward ...
                stepper.correct_gradients()
                optimizer.step()

    ``correct_gradients()``, between backward and the optimizer step, makes the gradients the
    schedule's (coarse gradients scaled, MG/OPT's correction applied); call it once per step,
    after the last micro-batch. At a phase's first step the stepper resets the optimizer state
    (``optimizer_state="reset"``) and forms the MG/OPT correction (``mgopt``, coarse phases;
    ``loss_on(model, step)`` is the loss of that step's batch); after a phase's last step it
    runs the line search (``line_search``) and prolongates (nested iteration).
    ``state_dict()`` holds what a checkpoint taken mid-phase needs, by parameter name.
    ``extra_evaluations`` counts the fine-model passes beyond the training steps: gradients
    (forward + backward) and line-search losses (forward only)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: MultilevelSchedule):
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        for stack in stacks(model):           # every view exists, on every rank
            for phase in set(schedule.phases):
                stack.coarse_blocks(phase.stride, phase.offset)
        self.correction: dict = {}
        self._scale: Tuple[set, float] = (set(), 1.0)   # the current view's layers, their factor
        self.start: dict = {}                 # theta_0 of the phase (line search)
        self.start_loss: Optional[float] = None
        self.step_lengths: List[float] = []   # the line search's choice, per coarse phase
        self.extra_evaluations = {"fine_gradients": 0, "coarse_gradients": 0, "fine_losses": 0}

    @contextlib.contextmanager
    def step(self, step: int, loss_on: Callable[[nn.Module, int], torch.Tensor]):
        phase, first = self.schedule.locate(step)
        if step == first:
            self._begin(phase, step, loss_on)
        view = (contextlib.nullcontext(self.model) if phase.is_fine
                else coarse_view(self.model, phase.stride, phase.offset))
        with view:
            self._scale = self._gradient_scale(phase)
            try:
                yield phase
            finally:
                self._scale = (set(), 1.0)
        if step == first + phase.steps - 1:
            if self.start:
                self._line_search(loss_on, first)
            if phase.prolongate_after:
                prolongate(self.model, phase.stride, phase.prolongate_after)
                if self.schedule.optimizer_state == "transfer":
                    transfer_optimizer_state(self.model, self.optimizer, phase.stride)

    def _begin(self, phase: Phase, step: int, loss_on) -> None:
        if self.schedule.optimizer_state == "reset":
            self.optimizer.state.clear()
        self.correction, self.start, self.start_loss = {}, {}, None
        if not self.schedule.mgopt or phase.is_fine:
            return
        fine = _gradients(self.model, loss_on, step)
        with coarse_view(self.model, phase.stride, phase.offset):
            coarse = _gradients(self.model, loss_on, step)
            layers, factor = self._gradient_scale(phase)
        coarse = {p: g * factor if p in layers else g for p, g in coarse.items()}
        self.extra_evaluations["fine_gradients"] += 1
        self.extra_evaluations["coarse_gradients"] += 1
        self.correction = {p: coarse[p] - fine[p] for p in coarse if p in fine}
        if self.schedule.line_search:
            self.start = {p: p.detach().clone() for p in self.correction}
            self.start_loss = self._fine_loss(loss_on, step)

    @torch.no_grad()
    def _fine_loss(self, loss_on, step: int) -> float:
        training = self.model.training
        self.model.eval()
        try:
            self.extra_evaluations["fine_losses"] += 1
            return float(loss_on(self.model, step))
        finally:
            self.model.train(training)

    @torch.no_grad()
    def _line_search(self, loss_on, first: int) -> None:
        """theta_0 + a (theta_1 - theta_0) for the first a in 1, 1/2, 1/4, 1/8 that lowers the
        fine loss of the phase's first batch; theta_0 when none does."""
        moved = {p: p.detach().clone() for p in self.start}
        chosen = 0.0
        for a in (1.0, 0.5, 0.25, 0.125):
            for p, theta0 in self.start.items():
                p.copy_(torch.lerp(theta0, moved[p], a))
            if self._fine_loss(loss_on, first) < self.start_loss:
                chosen = a
                break
        if chosen == 0.0:
            for p, theta0 in self.start.items():
                p.copy_(theta0)
        if chosen < 1.0:     # the momentum of a shortened or undone phase points the wrong way
            for p in self.start:
                self.optimizer.state.pop(p, None)
        self.step_lengths.append(chosen)
        self.start, self.start_loss = {}, None

    def _gradient_scale(self, phase: Phase) -> Tuple[set, float]:
        """Inside the phase's view: the parameters of its layers and their gradient factor."""
        if phase.is_fine or self.schedule.coarse_gradients == "raw":
            return set(), 1.0
        return {p for stack in stacks(self.model) for p in stack.layers.parameters()}, 1 / phase.stride

    @torch.no_grad()
    def correct_gradients(self) -> None:
        """The gradients of the current phase, after backward: in a coarse view the layers'
        gradients scaled by 1/stride (``coarse_gradients="scaled"``), then MG/OPT's
        g_H - (g_H(start) - R g_h(start))."""
        layers, factor = self._scale
        for p in layers:
            if p.grad is not None:
                p.grad.mul_(factor)
        for p, c in self.correction.items():
            if p.grad is not None:
                p.grad.sub_(c)

    def state_dict(self) -> dict:
        """Per-parameter tensors by name (``correction``, ``start``) and the start loss."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {"correction": {names[id(p)]: c for p, c in self.correction.items()},
                "start": {names[id(p)]: t for p, t in self.start.items()},
                "start_loss": self.start_loss, "step_lengths": list(self.step_lengths)}

    def load_state_dict(self, state: dict) -> None:
        params = dict(self.model.named_parameters())

        def by_param(values):
            return {params[n]: t.to(params[n].device) for n, t in values.items() if n in params}

        self.correction, self.start = by_param(state["correction"]), by_param(state["start"])
        self.start_loss, self.step_lengths = state["start_loss"], list(state["step_lengths"])


def train_multilevel(model: nn.Module, optimizer: torch.optim.Optimizer,
                     loss_on: Callable[[nn.Module, int], torch.Tensor],
                     schedule: MultilevelSchedule,
                     on_step: Optional[Callable[[int, Phase, float], None]] = None) -> List[float]:
    """Run the schedule. ``loss_on(model, step)`` returns the loss of batch ``step`` for the model
    as it is (fine or inside a coarse view). Returns the losses of every step."""
    stepper = MultilevelStepper(model, optimizer, schedule)
    losses: List[float] = []
    for step in range(schedule.total_steps):
        with stepper.step(step, loss_on) as phase:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_on(model, step)
            loss.backward()
            stepper.correct_gradients()
            optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, phase, losses[-1])
    return losses


def _gradients(model, loss_on, step):
    """Gradients of one batch's loss at the current parameters, by parameter (none stored)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_on(model, step), params, allow_unused=True)
    return {p: g for p, g in zip(params, grads) if g is not None}

"""Applying a multilevel schedule one optimisation step at a time (``MultilevelStepper``),
and the whole loop (``train_multilevel``)."""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from ._schedule import Phase, MultilevelSchedule
from ._views import coarse_view, prolongate, stacks, transfer_optimizer_state

__all__ = ["MultilevelStepper", "train_multilevel"]


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
                stack.coarse_ranges(phase.stride, phase.offset)
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

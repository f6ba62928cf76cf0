"""The training step's protocol: what the trainer calls on each of a run's step hooks, in one
order, so that a policy (the adaptive controller, a multilevel schedule, one of your own) plugs
in without changing the trainer.

For each optimizer step the trainer calls, on every hook in the run's order:

1. ``scope(step)``: a context entered before the step's forward passes and left after the
   optimizer step (the adaptive controller: a probe's iteration counts; a multilevel
   schedule: the phase's coarse view);
2. ``after_backward()``, after the step's micro-batches have run backward, before clipping:
   True asks for the micro-batches to run again (the gradient trigger's reference pass);
3. ``before_update()``, after the last backward, before clipping and the optimizer step
   (a multilevel schedule's gradient correction);
4. ``after_update()``, after the scopes are left: fields for the step's metrics record
   (the controller's probe and decision, the multilevel phase).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

from ..control import AdaptiveController
from ..multilevel import MultilevelStepper

__all__ = ["StepHooks", "ControllerHooks", "MultilevelHooks"]


class StepHooks:
    """The protocol, with do-nothing defaults: a hook overrides what it needs."""

    def scope(self, step: int):
        return contextlib.nullcontext()

    def after_backward(self) -> bool:
        return False

    def before_update(self) -> None:
        pass

    def after_update(self) -> dict:
        return {}


class ControllerHooks(StepHooks):
    """The adaptive controller on the steps ``watches(step)`` accepts (all by default; with a
    multilevel schedule, its fine steps: the controller judges the fine model's solves, and its
    probe schedule counts the run's steps)."""

    def __init__(self, controller: AdaptiveController,
                 watches: Optional[Callable[[int], bool]] = None):
        self.controller, self.watches = controller, watches
        self._active = self._probe = False

    @contextlib.contextmanager
    def scope(self, step: int):
        self._active = self.watches is None or self.watches(step)
        self._probe = False
        if self._active:
            if self.watches is not None:        # the controller counted only the steps it saw
                self.controller.step = step
            self._probe = self.controller.before_step()
        yield

    def after_backward(self) -> bool:
        return self._active and self.controller.after_backward()

    def after_update(self) -> dict:
        fields = {"probe": self._probe}
        decision = self.controller.after_step() if self._active else None
        if decision is not None:
            rho = decision.rho
            fields.update(rho_forward=rho["forward"], rho_backward=rho["backward"],
                          action=decision.action, reason=decision.reason)
            if decision.gradient is not None:
                fields["grad_error"] = decision.grad_error
        return fields


class MultilevelHooks(StepHooks):
    """A multilevel schedule (``MultilevelStepper``): each step in its phase's view, the
    schedule's gradients, the phase and the line search's step length in the record."""

    def __init__(self, stepper: MultilevelStepper, loss_on: Callable):
        self.stepper, self.loss_on = stepper, loss_on
        self._phase, self._searches = None, 0

    @contextlib.contextmanager
    def scope(self, step: int):
        self._searches = len(self.stepper.step_lengths)
        with self.stepper.step(step, self.loss_on) as phase:
            self._phase = phase
            yield

    def before_update(self) -> None:
        self.stepper.correct_gradients()

    def after_update(self) -> dict:
        fields = {"stride": self._phase.stride, "offset": self._phase.offset}
        if len(self.stepper.step_lengths) > self._searches:     # a coarse phase ended
            fields["line_search_step"] = self.stepper.step_lengths[-1]
        return fields

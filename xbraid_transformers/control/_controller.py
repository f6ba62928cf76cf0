"""The adaptive controller: the step protocol that schedules probes, gathers their evidence
(``_evidence.Probe``), applies the policy's decision (``_policy.decide``) on every rank alike,
and saves its state."""
from __future__ import annotations

import dataclasses
import logging
from typing import List, Optional

import torch
from torch import nn

from ..core.layer_parallel import LayerParallel, find_stacks
from ..formatting import format_number
from ._config import ControlConfig
from ._evidence import Decision, Measurement, Probe
from ._policy import decide

__all__ = ["AdaptiveController"]

logger = logging.getLogger("xbraid_transformers.control")


class AdaptiveController:
    """Watches the MGRIT convergence factor of every ``LayerParallel`` in ``model`` and acts.

    ``model``: any module; its ``LayerParallel`` submodules are found with ``model.modules()``
    (several are handled together: a decision applies to all of them, except ``"increase"``,
    which raises the count of the module and direction that crossed).
    Keyword arguments are the fields of :class:`ControlConfig`, or pass ``config=``.
    """

    def __init__(self, model: nn.Module, config: Optional[ControlConfig] = None, **options):
        if config is not None and options:
            raise TypeError("pass either config= or keyword options, not both")
        self.config = config if config is not None else ControlConfig(**options)
        self.modules: List[LayerParallel] = find_stacks(model)
        if not self.modules:
            raise ValueError("the model contains no LayerParallel module to control")
        self.step = 0
        self.mode = "parallel" if any(m.parallel for m in self.modules) else "serial"
        self.switch_step: Optional[int] = None
        self.decisions: List[Decision] = []
        self.iters: List[List[int]] = [[m.mgrit.fwd_iters, m.mgrit.bwd_iters] for m in self.modules]
        self._probing = False
        self._probe = Probe(model, self.modules, self.config.floor, self.config.probe_iters)
        # the gradient trigger's probe: "reference" pass (production counts), then "probe" pass
        self._pass: Optional[str] = None
        self._snapshot: Optional[dict] = None
        self._reference: Optional[List[Optional[torch.Tensor]]] = None
        self._gradient: Optional[dict] = None

    # ------------------------------------------------------------------ the step protocol
    @property
    def probing(self) -> bool:
        """Whether the current step (between before_step and after_step) is a probe."""
        return self._probing

    def is_probe_step(self, step: Optional[int] = None) -> bool:
        step = self.step if step is None else step
        return self.mode == "parallel" and step % self.config.probe_every == 0

    def before_step(self) -> bool:
        """Prepare step ``self.step``; returns True when it is a probe."""
        if self._probing:
            raise RuntimeError("before_step called twice without after_step")
        self._probing = self.is_probe_step()
        self._gradient = None
        if self._probing:
            if self.config.trigger == "gradient":
                # the reference pass runs at the production counts; after_backward starts the probe
                self._pass, self._snapshot = "reference", self._probe.random_state()
            else:
                self._probe.start(self.iters)
        return self._probing

    def after_backward(self) -> bool:
        """Call when the step's micro-batches have run their backward passes, before clipping
        and the optimizer. Returns True when they must run again: after the reference pass of a
        gradient-trigger probe (its gradients are stored and cleared, the random state and the
        dropout masks rewound, the probe counts set). Otherwise (always with the rho trigger)
        a no-op that returns False."""
        if not self._probing or self._pass is None:
            return False
        params = self._probe.params()
        if self._pass == "reference":
            self._reference = [None if p.grad is None else p.grad.detach().clone() for p in params]
            for p in params:
                p.grad = None
            self._probe.restore_random_state(self._snapshot)
            self._probe.start(self.iters)
            self._pass = "probe"
            return True
        self._gradient = self._probe.gradient_error(self._reference, self.iters,
                                                    self.config.grad_threshold)
        self._reference, self._snapshot, self._pass = None, None, None
        return False

    def after_step(self) -> Optional[Decision]:
        """Finish step ``self.step``: on a probe, measure, restore iterations and act."""
        decision = None
        if self._probing:
            if self.config.trigger == "gradient" and self._gradient is None:
                self._pass, self._reference, self._snapshot, self._probing = None, None, None, False
                self._probe.finish(self.iters, measure=False)
                raise RuntimeError("trigger='gradient': a probe step must call after_backward() "
                                   "after each pass of its micro-batches (see the module docstring)")
            decision = self.decide(self._probe.finish(self.iters), self._gradient)
            self._probing, self._gradient = False, None
        self.step += 1
        return decision

    # ------------------------------------------------------------------ deciding
    def decide(self, measurements: List[Measurement], gradient: Optional[dict] = None) -> Decision:
        """Act on the measurements of the probe at ``self.step`` (and, with the gradient
        trigger, on ``gradient``: the evidence of ``after_backward``) and record the decision."""
        before = [list(it) for it in self.iters]
        action, reason, iters = decide(self.config, measurements, gradient, self.iters)
        self._set_iters(iters)
        if action == "serial":
            self._go_serial()
        decision = Decision(self.step, action, reason, measurements, before,
                            [list(it) for it in self.iters], self.mode, gradient)
        decision = self._agree(decision)
        self.decisions.append(decision)
        rho = decision.rho
        logger.log(logging.WARNING if action in ("serial", "increase", "at-cap") else logging.INFO,
                   "step %d probe: rho forward %s, backward %s%s -> %s (%s)", self.step,
                   format_number(rho["forward"], missing="n/a"),
                   format_number(rho["backward"], missing="n/a"),
                   "" if gradient is None else
                   f", gradient error {format_number(gradient['relative_error'], missing='n/a')}",
                   action, reason)
        return decision

    def _set_iters(self, iters: List[List[int]]) -> None:
        self.iters = [list(it) for it in iters]
        for module, (fwd, bwd) in zip(self.modules, self.iters):
            module.configure(fwd_iters=fwd, bwd_iters=bwd)

    def _go_serial(self) -> None:
        for module in self.modules:
            module.serial()
        self.mode = "serial"
        self.switch_step = self.step

    def _agree(self, decision: Decision) -> Decision:
        """All ranks of the model's layer-parallel group take rank 0's action (their residuals
        agree; this guards round-off)."""
        comm = self.modules[0].comm
        if comm.size == 1:
            return decision
        code = torch.tensor([float(self.mode == "serial")] + [float(v) for it in self.iters for v in it],
                            device=comm.device)
        code = comm.broadcast(code, root=0).cpu()
        if bool(code[0]) and self.mode != "serial":
            self._go_serial()
            decision.action, decision.mode_after = "serial", "serial"
        values = code[1:].long().tolist()
        self._set_iters([values[2 * i:2 * i + 2] for i in range(len(self.modules))])
        return decision

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain data (weights_only-loadable): step, mode, iterations, decisions, dropout counters."""
        return {"config": dataclasses.asdict(self.config), "step": self.step, "mode": self.mode,
                "switch_step": self.switch_step, "iters": [list(it) for it in self.iters],
                "decisions": [d.as_dict() for d in self.decisions],
                "dropout": [m.dropout.state_dict() for m in self.modules]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["iters"]) != len(self.modules):
            raise ValueError(f"controller state is for {len(state['iters'])} LayerParallel modules, "
                             f"this model has {len(self.modules)}")
        self.step, self.switch_step = int(state["step"]), state["switch_step"]
        self._set_iters([[int(a), int(b)] for a, b in state["iters"]])
        self.decisions = [Decision.from_dict(d) for d in state["decisions"]]
        for module, drop in zip(self.modules, state["dropout"]):
            module.dropout.load_state_dict(drop)
        self.mode = state["mode"]
        for module in self.modules:
            module.set_parallel(self.mode != "serial")
        saved = state.get("config", {}).get("trigger", "rho")
        if saved != self.config.trigger:
            logger.warning("controller state was recorded with trigger %r; continuing with %r",
                           saved, self.config.trigger)

    @property
    def grad_errors(self) -> List[tuple]:
        """(step, estimated relative gradient error) of every gradient-trigger probe so far."""
        return [(d.step, d.grad_error) for d in self.decisions if d.gradient is not None]

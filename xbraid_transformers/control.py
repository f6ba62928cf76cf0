"""Adaptive control of layer-parallel training: the convergence-factor indicator
(docs/algorithm.md, "Adaptive control").

Production steps run MGRIT with few iterations (1-2), too few to measure a convergence factor.
Every ``probe_every`` optimizer steps the controller turns the next step into a *probe*: the
same batch, the same dropout masks, the same update rule, but with enough MGRIT iterations to
read the convergence factor of the final iteration, rho = r_k / r_{k-1}, for the forward and
the backward solve. When rho exceeds the threshold the controller acts:

- ``"serial"``: exact serial training from the next step on (never switches back);
- ``"increase"``: double the iteration count of the offending direction, up to ``max_iters``;
- ``"increase-then-serial"``: increase while below the cap, then switch to serial;
- ``"monitor"``: measure and log only (for plots of a pure layer-parallel run).

Usage (exactly this order; the trainer in ``train.py`` does it)::

    ctl = AdaptiveController(model, probe_every=500, threshold=1.0, action="serial")
    for batch in batches:
        ctl.before_step()                   # sets probe iterations when this step is a probe
        for micro_batch in batch:           # gradient accumulation: any number of backwards
            loss(model, micro_batch).backward()
        optimizer.step()
        decision = ctl.after_step()         # reads the last solve, restores iterations, acts
        optimizer.zero_grad()

``after_step`` reads the statistics of the last forward/backward solve of each
``LayerParallel`` module (the last micro-batch of the step) and returns the
:class:`Decision` of a probe step, or None. Dropout masks need no refresh call: each
``LayerParallel`` keys its masks by a per-forward counter, which the controller's
``state_dict`` saves and restores with its own state.

Round-off guard: near the float32 floor rho drifts toward 1 even for a converged solve, so rho
is ignored when the final residual is below ``floor`` times the norm of the states. The state
norm is estimated during the probe as sqrt(#fine C-points) * ||u_N|| for the forward (u_N: the
module's output) and sqrt(#fine C-points) * ||lambda_N|| for the adjoint (lambda_N: the
gradient arriving at the output); the residual sums over the same C-points.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from .core.layer_parallel import LayerParallel, find_stacks

logger = logging.getLogger(__name__)

ACTIONS = ("serial", "increase", "increase-then-serial", "monitor")


@dataclass
class ControlConfig:
    """Options of the adaptive controller.

    probe_every: steps between probes; steps 0, probe_every, 2*probe_every, ... are probes.
    threshold: act when the convergence factor rho is strictly above it.
    action: what to do then (see the module docstring).
    max_iters: cap of the production iteration count for ``"increase"``.
    floor: relative round-off floor; rho is ignored when the final residual is below
        ``floor * ||states||``.
    probe_iters: iterations of a probe (default: twice the production count, and at least the
        number needed for two residuals).
    """

    probe_every: int = 500
    threshold: float = 1.0
    action: str = "serial"
    max_iters: int = 16
    floor: float = 1e-5
    probe_iters: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.probe_every, int) or isinstance(self.probe_every, bool) \
                or self.probe_every < 1:
            raise ValueError(f"probe_every must be an integer >= 1, got {self.probe_every!r}")
        if not (isinstance(self.threshold, (int, float)) and self.threshold > 0):
            raise ValueError(f"threshold must be a positive number, got {self.threshold!r}")
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}; got {self.action!r}")
        if not isinstance(self.max_iters, int) or isinstance(self.max_iters, bool) \
                or self.max_iters < 1:
            raise ValueError(f"max_iters must be an integer >= 1, got {self.max_iters!r}")
        if not (isinstance(self.floor, (int, float)) and self.floor >= 0):
            raise ValueError(f"floor must be a number >= 0, got {self.floor!r}")
        if self.probe_iters is not None and (not isinstance(self.probe_iters, int)
                                             or self.probe_iters < 2):
            raise ValueError(f"probe_iters must be an integer >= 2 or None, got {self.probe_iters!r}")


@dataclass
class Measurement:
    """One direction of one module in one probe: the evidence for a decision."""

    module: int
    direction: str                  # "forward" or "backward"
    iterations: int
    residuals: List[float]
    state_norm: float               # proxy of ||states|| over the residual's C-points
    floor: float                    # the relative floor in force

    @property
    def rho(self) -> Optional[float]:
        """Convergence factor of the final iteration (None with fewer than two residuals)."""
        r = self.residuals
        if len(r) < 2:
            return None
        return r[-1] / r[-2] if r[-2] > 0 else math.inf if r[-1] > 0 else None

    @property
    def below_floor(self) -> bool:
        return bool(self.residuals) and self.residuals[-1] <= self.floor * self.state_norm

    @property
    def usable(self) -> bool:
        """rho exists, is finite or infinite but not NaN, and the residual is above the floor."""
        rho = self.rho
        return rho is not None and not math.isnan(rho) and not self.below_floor

    def as_dict(self) -> dict:
        return {"module": self.module, "direction": self.direction, "iterations": self.iterations,
                "residuals": list(self.residuals), "state_norm": self.state_norm,
                "floor": self.floor, "rho": self.rho, "below_floor": self.below_floor, "usable": self.usable}


@dataclass
class Decision:
    """What a probe measured and what the controller did about it."""

    step: int
    action: str                     # "none", "serial", "increase", "at-cap", "monitor"
    reason: str
    measurements: List[Measurement] = field(default_factory=list)
    iters_before: List[List[int]] = field(default_factory=list)   # [fwd, bwd] per module
    iters_after: List[List[int]] = field(default_factory=list)
    mode_after: str = "parallel"

    @property
    def rho(self) -> Dict[str, Optional[float]]:
        """Largest usable rho per direction over the modules (None when none is usable)."""
        out: Dict[str, Optional[float]] = {"forward": None, "backward": None}
        for m in self.measurements:
            if m.usable and (out[m.direction] is None or m.rho > out[m.direction]):
                out[m.direction] = m.rho
        return out

    def as_dict(self) -> dict:
        return {"step": self.step, "action": self.action, "reason": self.reason,
                "rho": self.rho, "measurements": [m.as_dict() for m in self.measurements],
                "iters_before": self.iters_before, "iters_after": self.iters_after,
                "mode_after": self.mode_after}


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
        self._hooks: list = []
        self._norms: Dict[int, Dict[str, float]] = {}

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
        if self._probing:
            for i, module in enumerate(self.modules):
                fwd, bwd = self.iters[i]
                module.configure(fwd_iters=self._probe_iters(module, fwd),
                                 bwd_iters=self._probe_iters(module, bwd))
                self._hooks.append(module.register_forward_hook(self._norm_hook(i)))
            self._norms = {}
        return self._probing

    def after_step(self) -> Optional[Decision]:
        """Finish step ``self.step``: on a probe, measure, restore iterations and act."""
        decision = None
        if self._probing:
            for hook in self._hooks:
                hook.remove()
            self._hooks = []
            measurements = self._measure()
            for module, (fwd, bwd) in zip(self.modules, self.iters):
                module.configure(fwd_iters=fwd, bwd_iters=bwd)
            decision = self.decide(measurements)
            self._probing = False
        self.step += 1
        return decision

    # ------------------------------------------------------------------ measuring
    def _probe_iters(self, module: LayerParallel, production: int) -> int:
        if self.config.probe_iters is not None:
            return max(self.config.probe_iters, production)
        needed = 3 if module.mgrit.skip_first_downcycle else 2
        return max(2 * production, needed)

    def _norm_hook(self, index: int):
        def hook(module, args, output):
            norms = self._norms.setdefault(index, {})
            norms["forward"] = output.detach().norm()
            if output.requires_grad:
                def grad_hook(grad):
                    norms["backward"] = grad.detach().norm()
                output.register_hook(grad_hook)
        return hook

    def _measure(self) -> List[Measurement]:
        out = []
        for i, module in enumerate(self.modules):
            stats = module.stats
            cfactor = module.mgrit.cfactors[0] if module.mgrit.cfactors else 1
            c_points = max(1, len(module.layers) // cfactor)
            norms = self._norms.get(i, {})
            for direction, iters, residuals in (
                    ("forward", stats.fwd_iters, stats.fwd_residuals),
                    ("backward", stats.bwd_iters, stats.bwd_residuals)):
                norm = norms.get(direction)
                norm = float(norm) * math.sqrt(c_points) if norm is not None else 0.0
                out.append(Measurement(i, direction, iters, list(residuals), norm, self.config.floor))
        return out

    # ------------------------------------------------------------------ deciding
    def decide(self, measurements: List[Measurement]) -> Decision:
        """Act on the measurements of the probe at ``self.step`` and record the decision."""
        cfg = self.config
        before = [list(it) for it in self.iters]
        crossed = [m for m in measurements if m.usable and m.rho > cfg.threshold]
        unusable = [m for m in measurements if not m.usable]
        if not crossed:
            action = "none"
            if len(unusable) == len(measurements):
                reason = ("no usable rho: every final residual is below the round-off floor or "
                          "fewer than two residuals were computed")
            else:
                reason = (f"rho <= {cfg.threshold:g} for every usable measurement"
                          + (f" ({len(unusable)} unusable: below the round-off floor or fewer "
                             "than two residuals)" if unusable else ""))
        elif cfg.action == "monitor":
            action, reason = "monitor", self._crossed(crossed) + "; monitoring only"
        elif cfg.action == "serial":
            action, reason = "serial", self._crossed(crossed)
        else:
            grown = self._increase(crossed)
            if grown:
                action, reason = "increase", self._crossed(crossed) + "; doubled " + ", ".join(grown)
            elif cfg.action == "increase-then-serial":
                action = "serial"
                reason = self._crossed(crossed) + f"; iterations at the cap {cfg.max_iters}"
            else:
                action = "at-cap"
                reason = self._crossed(crossed) + f"; iterations already at the cap {cfg.max_iters}"
        if action == "serial":
            self._go_serial()
        decision = Decision(self.step, action, reason, measurements, before,
                            [list(it) for it in self.iters], self.mode)
        decision = self._agree(decision)
        self.decisions.append(decision)
        rho = decision.rho
        logger.log(logging.WARNING if action in ("serial", "increase", "at-cap") else logging.INFO,
                   "step %d probe: rho forward %s, backward %s -> %s (%s)", self.step,
                   _fmt(rho["forward"]), _fmt(rho["backward"]), action, reason)
        return decision

    def _crossed(self, crossed: List[Measurement]) -> str:
        parts = [f"module {m.module} {m.direction} rho {m.rho:.4g} > {self.config.threshold:g} "
                 f"(residuals {', '.join(f'{r:.3e}' for r in m.residuals[-2:])})" for m in crossed]
        return "; ".join(parts)

    def _increase(self, crossed: List[Measurement]) -> List[str]:
        grown = []
        for m in crossed:
            d = 0 if m.direction == "forward" else 1
            old = self.iters[m.module][d]
            new = min(max(2 * old, 1), self.config.max_iters)
            if new > old:
                self.iters[m.module][d] = new
                module = self.modules[m.module]
                module.configure(**{("fwd_iters", "bwd_iters")[d]: new})
                grown.append(f"module {m.module} {m.direction} iterations {old} -> {new}")
        return grown

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
        self.iters = [values[2 * i:2 * i + 2] for i in range(len(self.modules))]
        for module, (fwd, bwd) in zip(self.modules, self.iters):
            module.configure(fwd_iters=fwd, bwd_iters=bwd)
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
        self.iters = [[int(a), int(b)] for a, b in state["iters"]]
        self.decisions = [_decision_from_dict(d) for d in state["decisions"]]
        for module, (fwd, bwd), drop in zip(self.modules, self.iters, state["dropout"]):
            module.configure(fwd_iters=fwd, bwd_iters=bwd)
            module.dropout.load_state_dict(drop)
        self.mode = state["mode"]
        for module in self.modules:
            module.set_parallel(self.mode != "serial")


def _decision_from_dict(d: dict) -> Decision:
    ms = [Measurement(m["module"], m["direction"], m["iterations"], list(m["residuals"]),
                      m["state_norm"], m["floor"]) for m in d["measurements"]]
    return Decision(d["step"], d["action"], d["reason"], ms, d["iters_before"], d["iters_after"],
                    d["mode_after"])


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4g}"

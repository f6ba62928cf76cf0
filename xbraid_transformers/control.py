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

What crosses the threshold is the ``trigger``:

- ``"rho"`` (default): the convergence factor of the probe's final iteration, rho > ``threshold``.
- ``"gradient"``: the relative error of the production gradient, estimated at the probe:
  the probe step first runs its micro-batches at the *production* iteration counts (a
  reference pass, gradient g_k), then again, from the same random state and dropout masks, at
  the probe counts (g_p, the gradient the optimizer uses, as with the rho trigger). The
  estimate is e = ||g_k - g_p|| / ||g_p||, and the controller acts when e > ``grad_threshold``.
  Why: the bias of the training step is g_k - g*, not rho; e estimates ||g_k - g*|| / ||g*||
  to within ||g_p - g*|| (the triangle inequality), which the probe's extra iterations make
  small. And e < 1 is what keeps g_k a descent direction (<g_k, g*> >= ||g*|| (||g*|| - ||g_k - g*||)),
  so a threshold below 1 (default 0.5: an angle under 30 degrees) leaves a margin. rho is
  still measured and logged at every probe. The cost: one extra pass at the production counts
  per probe. The optimizer's trajectory is that of the rho trigger until the first switch
  (with ``warm_start`` the probe pass starts from the reference pass's states instead).

Usage (exactly this order; the trainer in ``train.py`` does it)::

    ctl = AdaptiveController(model, probe_every=500, threshold=1.0, action="serial")
    for batch in batches:
        ctl.before_step()                   # sets probe iterations when this step is a probe
        again = True
        while again:                        # twice on a probe of the gradient trigger
            for micro_batch in batch:       # gradient accumulation: any number of backwards
                loss(model, micro_batch).backward()
            again = ctl.after_backward()    # before clipping: the trigger reads raw gradients
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
TRIGGERS = ("rho", "gradient")


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
    trigger: ``"rho"`` (act when rho > ``threshold``) or ``"gradient"`` (act when the probe's
        estimate of the production gradient's relative error exceeds ``grad_threshold``; the
        probe then runs a reference pass at the production counts; see the module docstring).
        With ``"gradient"``, ``"increase"`` doubles both directions of every module.
    grad_threshold: the relative gradient error above which the gradient trigger acts.
    """

    probe_every: int = 500
    threshold: float = 1.0
    action: str = "serial"
    max_iters: int = 16
    floor: float = 1e-5
    probe_iters: Optional[int] = None
    trigger: str = "rho"
    grad_threshold: float = 0.5

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
        if self.trigger not in TRIGGERS:
            raise ValueError(f"trigger must be one of {', '.join(TRIGGERS)}; got {self.trigger!r}")
        if isinstance(self.grad_threshold, bool) or not (
                isinstance(self.grad_threshold, (int, float)) and 0 < self.grad_threshold < math.inf):
            raise ValueError(f"grad_threshold must be a positive finite number, got {self.grad_threshold!r}")


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
    gradient: Optional[dict] = None  # the gradient trigger's evidence (relative_error, cosine, ...)

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
                "mode_after": self.mode_after, "gradient": self.gradient}

    @property
    def grad_error(self) -> Optional[float]:
        """The estimated relative error of the production gradient (gradient trigger only)."""
        return None if self.gradient is None else self.gradient["relative_error"]


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
        self._model = model
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
                self._pass, self._snapshot = "reference", self._random_state()
            else:
                self._start_probe_pass()
        return self._probing

    def _start_probe_pass(self) -> None:
        for i, module in enumerate(self.modules):
            fwd, bwd = self.iters[i]
            module.configure(fwd_iters=self._probe_iters(module, fwd),
                             bwd_iters=self._probe_iters(module, bwd))
            self._hooks.append(module.register_forward_hook(self._norm_hook(i)))
        self._norms = {}

    def after_backward(self) -> bool:
        """Call when the step's micro-batches have run their backward passes, before clipping
        and the optimizer. Returns True when they must run again: after the reference pass of a
        gradient-trigger probe (its gradients are stored and cleared, the random state and the
        dropout masks rewound, the probe counts set). Otherwise (always with the rho trigger)
        a no-op that returns False."""
        if not self._probing or self._pass is None:
            return False
        params = self._params()
        if self._pass == "reference":
            self._reference = [None if p.grad is None else p.grad.detach().clone() for p in params]
            for p in params:
                p.grad = None
            self._restore_random_state(self._snapshot)
            self._start_probe_pass()
            self._pass = "probe"
            return True
        self._gradient = self._gradient_error(params, self._reference)
        self._reference, self._snapshot, self._pass = None, None, None
        return False

    def after_step(self) -> Optional[Decision]:
        """Finish step ``self.step``: on a probe, measure, restore iterations and act."""
        decision = None
        if self._probing:
            if self.config.trigger == "gradient" and self._gradient is None:
                self._pass, self._reference, self._snapshot, self._probing = None, None, None, False
                for hook in self._hooks:
                    hook.remove()
                self._hooks = []
                for module, (fwd, bwd) in zip(self.modules, self.iters):
                    module.configure(fwd_iters=fwd, bwd_iters=bwd)
                raise RuntimeError("trigger='gradient': a probe step must call after_backward() "
                                   "after each pass of its micro-batches (see the module docstring)")
            for hook in self._hooks:
                hook.remove()
            self._hooks = []
            measurements = self._measure()
            for module, (fwd, bwd) in zip(self.modules, self.iters):
                module.configure(fwd_iters=fwd, bwd_iters=bwd)
            decision = self.decide(measurements, self._gradient)
            self._probing, self._gradient = False, None
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

    def _params(self) -> List[nn.Parameter]:
        return [p for p in self._model.parameters() if p.requires_grad]

    def _random_state(self) -> dict:
        """What the reference pass consumes: torch's generators and the dropout counters."""
        state = {"cpu": torch.get_rng_state(),
                 "dropout": [m.dropout.state_dict() for m in self.modules]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _restore_random_state(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state_all(state["cuda"])
        for module, drop in zip(self.modules, state["dropout"]):
            module.dropout.load_state_dict(drop)

    def _gradient_error(self, params, reference) -> dict:
        """||g_k - g_p|| / ||g_p|| and the cosine of g_k and g_p over the whole model: the
        stacks' layers summed over the group's ranks, the replicated parameters counted once."""
        inside = {id(p) for m in self.modules for p in m.layers.parameters()}
        sums = torch.zeros(2, 3, dtype=torch.float64)      # rows: split, replicated
        for p, ref in zip(params, reference):
            probe = None if p.grad is None else p.grad.detach().double()
            ref = None if ref is None else ref.double()
            if probe is None and ref is None:
                continue
            probe = torch.zeros_like(ref) if probe is None else probe
            ref = torch.zeros_like(probe) if ref is None else ref
            row = 1 - int(id(p) in inside)
            sums[row] += torch.stack([(ref - probe).pow(2).sum(), probe.pow(2).sum(),
                                      (ref * probe).sum()]).cpu()
        comm = self.modules[0].comm
        if comm.size > 1:
            sums[0] = comm.allreduce(sums[0].to(comm.device), "sum").cpu()
        diff2, probe2, dot = (sums[0] + sums[1]).tolist()
        ref2 = diff2 - probe2 + 2 * dot                    # ||g_k||^2 = ||g_k - g_p||^2 - ||g_p||^2 + 2<g_k, g_p>
        norm_p, norm_k = math.sqrt(probe2), math.sqrt(max(ref2, 0.0))
        relative = math.sqrt(diff2) / norm_p if norm_p > 0 else (0.0 if diff2 == 0 else math.inf)
        cosine = dot / (norm_p * norm_k) if norm_p > 0 and norm_k > 0 else None
        return {"relative_error": relative, "cosine": cosine, "norm_production": norm_k,
                "norm_probe": norm_p, "production_iters": [list(it) for it in self.iters],
                "probe_iters": [[self._probe_iters(m, f), self._probe_iters(m, b)]
                                for m, (f, b) in zip(self.modules, self.iters)],
                "threshold": self.config.grad_threshold}

    # ------------------------------------------------------------------ deciding
    def decide(self, measurements: List[Measurement], gradient: Optional[dict] = None) -> Decision:
        """Act on the measurements of the probe at ``self.step`` (and, with the gradient
        trigger, on ``gradient``: the evidence of ``after_backward``) and record the decision."""
        cfg = self.config
        before = [list(it) for it in self.iters]
        if cfg.trigger == "gradient":
            return self._decide_gradient(measurements, gradient, before)
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
        return self._record(action, reason, measurements, before)

    def _record(self, action: str, reason: str, measurements: List[Measurement], before,
                gradient: Optional[dict] = None) -> Decision:
        if action == "serial":
            self._go_serial()
        decision = Decision(self.step, action, reason, measurements, before,
                            [list(it) for it in self.iters], self.mode, gradient)
        decision = self._agree(decision)
        self.decisions.append(decision)
        rho = decision.rho
        logger.log(logging.WARNING if action in ("serial", "increase", "at-cap") else logging.INFO,
                   "step %d probe: rho forward %s, backward %s%s -> %s (%s)", self.step,
                   _fmt(rho["forward"]), _fmt(rho["backward"]),
                   "" if gradient is None else f", gradient error {_fmt(gradient['relative_error'])}",
                   action, reason)
        return decision

    def _decide_gradient(self, measurements: List[Measurement], gradient: Optional[dict],
                         before) -> Decision:
        cfg = self.config
        if gradient is None:
            raise ValueError("trigger='gradient' decides on the gradient evidence of after_backward()")
        error = gradient["relative_error"]
        evidence = (f"relative gradient error {error:.4g} "
                    f"(iterations {gradient['production_iters']} vs probe {gradient['probe_iters']}, "
                    f"cosine {_fmt(gradient['cosine'])})")
        if math.isnan(error) or not error > cfg.grad_threshold:
            action, reason = "none", evidence.replace(" (", f" <= {cfg.grad_threshold:g} (", 1)
        else:
            crossed = evidence.replace(" (", f" > {cfg.grad_threshold:g} (", 1)
            if cfg.action == "monitor":
                action, reason = "monitor", crossed + "; monitoring only"
            elif cfg.action == "serial":
                action, reason = "serial", crossed
            else:
                grown = self._increase(measurements)       # both directions of every module
                if grown:
                    action, reason = "increase", crossed + "; doubled " + ", ".join(grown)
                elif cfg.action == "increase-then-serial":
                    action, reason = "serial", crossed + f"; iterations at the cap {cfg.max_iters}"
                else:
                    action = "at-cap"
                    reason = crossed + f"; iterations already at the cap {cfg.max_iters}"
        return self._record(action, reason, measurements, before, gradient)

    def _crossed(self, crossed: List[Measurement]) -> str:
        parts = [f"module {m.module} {m.direction} rho {m.rho:.4g} > {self.config.threshold:g} "
                 f"(residuals {', '.join(f'{r:.3e}' for r in m.residuals[-2:])})" for m in crossed]
        return "; ".join(parts)

    def _increase(self, crossed: List[Measurement]) -> List[str]:
        grown, seen = [], set()
        for m in crossed:
            if (m.module, m.direction) in seen:
                continue
            seen.add((m.module, m.direction))
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
        saved = state.get("config", {}).get("trigger", "rho")
        if saved != self.config.trigger:
            logger.warning("controller state was recorded with trigger %r; continuing with %r",
                           saved, self.config.trigger)

    @property
    def grad_errors(self) -> List[tuple]:
        """(step, estimated relative gradient error) of every gradient-trigger probe so far."""
        return [(d.step, d.grad_error) for d in self.decisions if d.gradient is not None]


def _decision_from_dict(d: dict) -> Decision:
    ms = [Measurement(m["module"], m["direction"], m["iterations"], list(m["residuals"]),
                      m["state_norm"], m["floor"]) for m in d["measurements"]]
    return Decision(d["step"], d["action"], d["reason"], ms, d["iters_before"], d["iters_after"],
                    d["mode_after"], d.get("gradient"))


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4g}"

"""The controller's evidence: what a probe measures (convergence factors per module and
direction, the gradient error of the gradient trigger) and the records of its decisions."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..core.layer_parallel import LayerParallel

__all__ = ["Measurement", "Decision", "Probe", "probe_iters"]


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

    @classmethod
    def from_dict(cls, d: dict) -> "Decision":
        """The inverse of :meth:`as_dict` (a saved controller state)."""
        ms = [Measurement(m["module"], m["direction"], m["iterations"], list(m["residuals"]),
                          m["state_norm"], m["floor"]) for m in d["measurements"]]
        return cls(d["step"], d["action"], d["reason"], ms, d["iters_before"], d["iters_after"],
                   d["mode_after"], d.get("gradient"))


def probe_iters(module: LayerParallel, production: int, configured: Optional[int]) -> int:
    """A probe's iteration count: ``configured``, else twice the production count and at least
    the number needed for two residuals."""
    if configured is not None:
        return max(configured, production)
    needed = 3 if module.mgrit.skip_first_downcycle else 2
    return max(2 * production, needed)


class Probe:
    """The mechanics of one probe over the model's stacks: raise their iteration counts and
    watch their output norms (:meth:`start`), read the measurements and set the counts back
    (:meth:`finish`); for the gradient trigger, snapshot and rewind the random state of the
    reference pass and compare its gradient with the probe's."""

    def __init__(self, model: nn.Module, modules: Sequence[LayerParallel], floor: float,
                 configured_iters: Optional[int]):
        self.model, self.modules = model, list(modules)
        self.floor, self.configured_iters = floor, configured_iters
        self._hooks: list = []
        self._norms: Dict[int, Dict[str, torch.Tensor]] = {}

    def iters_for(self, iters: List[List[int]]) -> List[List[int]]:
        return [[probe_iters(m, f, self.configured_iters), probe_iters(m, b, self.configured_iters)]
                for m, (f, b) in zip(self.modules, iters)]

    def start(self, iters: List[List[int]]) -> None:
        """Run the stacks at the probe counts of the production ``iters`` and watch them."""
        for i, (module, (fwd, bwd)) in enumerate(zip(self.modules, self.iters_for(iters))):
            module.configure(fwd_iters=fwd, bwd_iters=bwd)
            self._hooks.append(module.register_forward_hook(self._norm_hook(i)))
        self._norms = {}

    def finish(self, iters: List[List[int]], measure: bool = True) -> List[Measurement]:
        """Stop watching, set the production ``iters`` back; the measurements of the last solve."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        measurements = self._measure() if measure else []
        for module, (fwd, bwd) in zip(self.modules, iters):
            module.configure(fwd_iters=fwd, bwd_iters=bwd)
        return measurements

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
                out.append(Measurement(i, direction, iters, list(residuals), norm, self.floor))
        return out

    # ------------------------------------------------------------------ the gradient trigger
    def params(self) -> List[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def random_state(self) -> dict:
        """What the reference pass consumes: torch's generators and the dropout counters."""
        state = {"cpu": torch.get_rng_state(),
                 "dropout": [m.dropout.state_dict() for m in self.modules]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def restore_random_state(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state_all(state["cuda"])
        for module, drop in zip(self.modules, state["dropout"]):
            module.dropout.load_state_dict(drop)

    def gradient_error(self, reference: List[Optional[torch.Tensor]], iters: List[List[int]],
                       threshold: float) -> dict:
        """||g_k - g_p|| / ||g_p|| and the cosine of g_k (``reference``) and g_p (the current
        gradients) over the whole model: the stacks' layers summed over the group's ranks, the
        replicated parameters counted once."""
        inside = {id(p) for m in self.modules for p in m.layers.parameters()}
        sums = torch.zeros(2, 3, dtype=torch.float64)      # rows: split, replicated
        for p, ref in zip(self.params(), reference):
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
                "norm_probe": norm_p, "production_iters": [list(it) for it in iters],
                "probe_iters": self.iters_for(iters), "threshold": threshold}

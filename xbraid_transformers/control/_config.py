"""The adaptive controller's options, validated in one place."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

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

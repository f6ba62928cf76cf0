"""The controller's policy: a probe's evidence in, an action out, as data (changes nothing).

One action sequence serves both triggers: when the evidence crosses its threshold, ``monitor``
only records it, ``serial`` switches, and the increasing actions double the iteration counts of
what crossed (the rho trigger: that module and direction; the gradient trigger: every module,
both directions) until the cap, where ``increase-then-serial`` switches and ``increase`` stays.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

from ..formatting import format_number
from ._config import ControlConfig
from ._evidence import Measurement

__all__ = ["decide"]


def decide(config: ControlConfig, measurements: List[Measurement], gradient: Optional[dict],
           iters: List[List[int]]) -> Tuple[str, str, List[List[int]]]:
    """(action, reason, the production iteration counts after it) for one probe."""
    if config.trigger == "gradient":
        if gradient is None:
            raise ValueError("trigger='gradient' decides on the gradient evidence of after_backward()")
        error = gradient["relative_error"]
        evidence = (f"relative gradient error {error:.4g} "
                    f"(iterations {gradient['production_iters']} vs probe {gradient['probe_iters']}, "
                    f"cosine {format_number(gradient['cosine'], missing='n/a')})")
        if math.isnan(error) or not error > config.grad_threshold:
            return "none", evidence.replace(" (", f" <= {config.grad_threshold:g} (", 1), iters
        return _act(config, evidence.replace(" (", f" > {config.grad_threshold:g} (", 1),
                    measurements, iters)
    crossed = [m for m in measurements if m.usable and m.rho > config.threshold]
    if crossed:
        return _act(config, _crossed(crossed, config.threshold), crossed, iters)
    unusable = [m for m in measurements if not m.usable]
    if len(unusable) == len(measurements):
        return "none", ("no usable rho: every final residual is below the round-off floor or "
                        "fewer than two residuals were computed"), iters
    return "none", (f"rho <= {config.threshold:g} for every usable measurement"
                    + (f" ({len(unusable)} unusable: below the round-off floor or fewer than two "
                       "residuals)" if unusable else "")), iters


def _act(config: ControlConfig, evidence: str, grow: Sequence[Measurement],
         iters: List[List[int]]) -> Tuple[str, str, List[List[int]]]:
    if config.action == "monitor":
        return "monitor", evidence + "; monitoring only", iters
    if config.action == "serial":
        return "serial", evidence, iters
    doubled, grown = _doubled(iters, grow, config.max_iters)
    if grown:
        return "increase", evidence + "; doubled " + ", ".join(grown), doubled
    if config.action == "increase-then-serial":
        return "serial", evidence + f"; iterations at the cap {config.max_iters}", iters
    return "at-cap", evidence + f"; iterations already at the cap {config.max_iters}", iters


def _doubled(iters: List[List[int]], grow: Sequence[Measurement], cap: int):
    """The counts with each (module, direction) of ``grow`` doubled up to ``cap``, and what grew."""
    out, grown, seen = [list(it) for it in iters], [], set()
    for m in grow:
        if (m.module, m.direction) in seen:
            continue
        seen.add((m.module, m.direction))
        d = 0 if m.direction == "forward" else 1
        old = out[m.module][d]
        new = min(max(2 * old, 1), cap)
        if new > old:
            out[m.module][d] = new
            grown.append(f"module {m.module} {m.direction} iterations {old} -> {new}")
    return out, grown


def _crossed(crossed: List[Measurement], threshold: float) -> str:
    return "; ".join(f"module {m.module} {m.direction} rho {m.rho:.4g} > {threshold:g} "
                     f"(residuals {', '.join(f'{r:.3e}' for r in m.residuals[-2:])})" for m in crossed)

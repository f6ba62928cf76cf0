"""Multilevel schedules: which view of the model each optimisation step trains (``Phase``,
``MultilevelSchedule``), and ``MultilevelConfig``, the schedule of a run of given length."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple

__all__ = ["CYCLES", "PROLONGATIONS", "OPTIMIZER_STATES", "COARSE_GRADIENTS", "check_choice",
           "Phase", "MultilevelSchedule", "MultilevelConfig"]

CYCLES = ("nested", "v")
PROLONGATIONS = ("copy", "linear")
OPTIMIZER_STATES = ("keep", "reset", "transfer")
COARSE_GRADIENTS = ("scaled", "raw")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


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
        check_choice("optimizer_state", self.optimizer_state, OPTIMIZER_STATES)
        check_choice("coarse_gradients", self.coarse_gradients, COARSE_GRADIENTS)
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
        check_choice("cycle", self.cycle, CYCLES)
        check_choice("prolongation", self.prolongation, PROLONGATIONS)
        check_choice("optimizer_state", self.optimizer_state, OPTIMIZER_STATES)
        check_choice("coarse_gradients", self.coarse_gradients, COARSE_GRADIENTS)
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

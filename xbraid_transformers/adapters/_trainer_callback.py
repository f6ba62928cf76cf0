"""``AdaptiveCallback``: the adaptive controller inside ``transformers.Trainer``.

Trainer's step, with the callback's hooks (gradient accumulation as in the library's trainer)::

    on_step_begin          -> controller.before_step()     probe iterations on a probe step
    micro-batches: forward + backward (each of them)
    clip gradients
    on_pre_optimizer_step  -> controller.after_backward()  (a no-op for the rho trigger)
    optimizer.step()
    on_optimizer_step      -> controller.after_step()      measure rho, restore iterations, act
    on_step_end / on_log   -> the decision in the step's log record

What a callback cannot do, refused with a clear error instead of a wrong run:

- ``trigger="gradient"``: its probe runs the step's micro-batches twice (a reference pass at
  the production iteration counts, then the probe pass); Trainer runs each micro-batch once.
  Trainer also clips before the first hook that sees the gradients, where the trigger needs
  them raw. The rho trigger reads the solves' residuals only, so clipping does not matter to it.
- several processes: Trainer's data parallelism (torchrun / accelerate, or several GPUs in one
  process) shards the batches and reduces every gradient over all processes, while a stack
  split over layer-parallel ranks needs the same batch on every rank of its group and owns
  different parameters on each. Neither combination is supported; both are refused.

The controller's state (step, mode, iteration counts, decisions, dropout counters) is saved in
``trainer_state.json`` of every Trainer checkpoint and loaded when training resumes from one,
so the resumed run makes the decisions the uninterrupted run would have made.

This module imports transformers; ``xbraid_transformers.adapters`` imports it only when
``AdaptiveCallback`` is first used.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..control import AdaptiveController, ControlConfig, Decision
from ..core.layer_parallel import find_stacks

logger = logging.getLogger(__name__)

# Keys of a probe's decision in Trainer's log records.
PREFIX = "xbt_"


def decision_record(decision: Decision) -> dict:
    """The decision as log-record entries: numbers, the action and the mode in ``logs`` (what
    Trainer's reporters see), plus the reason (in ``state.log_history`` only)."""
    rho = decision.rho
    fwd, bwd = (max(it[d] for it in decision.iters_after) for d in (0, 1))
    record = {f"{PREFIX}probe_step": decision.step, f"{PREFIX}action": decision.action,
              f"{PREFIX}mode": decision.mode_after, f"{PREFIX}fwd_iters": fwd,
              f"{PREFIX}bwd_iters": bwd}
    for direction in ("forward", "backward"):
        if rho[direction] is not None:
            record[f"{PREFIX}rho_{direction}"] = rho[direction]
    return record


class AdaptiveCallback(TrainerCallback, ExportableState):
    """Runs ``xbt.AdaptiveController`` on the layer-parallel stacks of the model that
    ``transformers.Trainer`` trains (make it layer-parallel with ``xbt.make_layer_parallel``
    first). Keyword options are the fields of ``xbt.ControlConfig`` (``probe_every``,
    ``threshold``, ``action``, ...); the rho trigger only (see the module docstring).

    Every probe's decision goes into the record Trainer logs at that step (a probe step is
    always logged): ``xbt_rho_forward``, ``xbt_rho_backward``, ``xbt_action``, ``xbt_mode``,
    ``xbt_fwd_iters``, ``xbt_bwd_iters``, ``xbt_probe_step`` (the controller's 0-based step; the
    record's ``step`` is Trainer's ``global_step``, one more) and, in ``state.log_history``,
    ``xbt_reason``. ``callback.controller`` holds the controller (``.decisions``, ``.mode``).
    """

    def __init__(self, controller_state: Optional[dict] = None, **options):
        self.config = ControlConfig(**options)
        if self.config.trigger != "rho":
            raise ValueError(
                f"AdaptiveCallback supports trigger='rho' only, got {self.config.trigger!r}: the "
                "gradient trigger's probe runs the step's micro-batches twice (a reference pass at "
                "the production iteration counts, then the probe pass) and reads the gradients "
                "before clipping, and transformers.Trainer runs each micro-batch once and clips "
                "before any callback sees the gradients. Use trigger='rho' with Trainer, or a "
                "loop of your own with xbt.AdaptiveController for the gradient trigger")
        self.controller: Optional[AdaptiveController] = None
        # The state a resumed run starts from: set by Trainer when it restores callbacks
        # (restore_callback_states_from_checkpoint), else read from the checkpoint's state.
        self.controller_state = controller_state
        self._pending: Optional[dict] = None

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        """What Trainer writes into ``trainer_state.json`` (plain JSON data)."""
        controller = (self.controller.state_dict() if self.controller is not None
                      else self.controller_state)
        return {"args": dataclasses.asdict(self.config),
                "attributes": {"controller_state": controller}}

    def _saved_state(self, state) -> Optional[dict]:
        if self.controller_state is not None:
            return self.controller_state
        if state.global_step == 0:
            return None
        stored = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(stored, list):      # several callbacks of this class: not supported
            raise ValueError("the checkpoint holds the states of several AdaptiveCallbacks; "
                             "train with one")
        return None if stored is None else stored.get("attributes", {}).get("controller_state")

    # ------------------------------------------------------------------ Trainer's events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        refuse_several_processes(args, model)
        self.controller = AdaptiveController(model, self.config)
        saved = self._saved_state(state)
        if saved is not None:
            if int(saved["step"]) != state.global_step:
                raise ValueError(
                    f"the adaptive controller's saved state is at step {saved['step']}, the "
                    f"checkpoint at step {state.global_step}: resume from a checkpoint written "
                    "by a Trainer run with this callback")
            self.controller.load_state_dict(saved)
        elif state.global_step > 0:
            logger.warning("resuming at step %d from a checkpoint without an adaptive controller "
                           "state: the controller starts there, in parallel mode",
                           state.global_step)
            self.controller.step = state.global_step
        self.controller_state = None
        self._pending = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.controller.step != state.global_step:
            raise RuntimeError(f"the adaptive controller is at step {self.controller.step}, "
                               f"Trainer at step {state.global_step}")
        self.controller.before_step()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.controller.after_backward():       # only the gradient trigger asks for a rerun
            raise RuntimeError("the controller asked to rerun the step's micro-batches, which "
                               "Trainer cannot do")

    def on_optimizer_step(self, args, state, control, **kwargs):
        decision = self.controller.after_step()
        if decision is not None:
            self._pending = dict(decision_record(decision), **{f"{PREFIX}reason": decision.reason})

    def on_step_end(self, args, state, control, **kwargs):
        if self._pending is not None:
            control.should_log = True          # a probe step is always logged
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Put the probe's decision into the record Trainer has just appended to
        ``state.log_history`` (and into ``logs``, which the callbacks after this one see)."""
        if self._pending is None or not state.log_history:
            return
        record = state.log_history[-1]
        if record.get("step") != state.global_step:
            return
        record.update(self._pending)
        if logs is not None:
            logs.update({k: v for k, v in self._pending.items() if k != f"{PREFIX}reason"})
        self._pending = None


def refuse_several_processes(args, model) -> None:
    """Trainer's data parallelism and layer-parallel groups do not mix; say so before step 0."""
    world = int(getattr(args, "world_size", 1) or 1)
    gpus = int(getattr(args, "n_gpu", 1) or 1)
    if world > 1 or gpus > 1:
        raise RuntimeError(
            f"AdaptiveCallback runs with one Trainer process on one device; this run has "
            f"{world} processes and {gpus} GPUs per process. Trainer's data parallelism gives "
            "each process its own batches and reduces every gradient over all of them, which "
            "neither a layer-parallel group (same batch on every rank, different blocks per "
            "rank) nor the controller's decisions (taken per group) are built for. Train with "
            "one process (CUDA_VISIBLE_DEVICES=0 for one GPU); for layer-parallel ranks "
            "write the loop with xbt.AdaptiveController (docs/adapters.md)")
    split = [stack for stack in find_stacks(model) if stack.comm.size > 1]
    if split:
        raise RuntimeError(
            f"the model's layer-parallel stack is split over {split[0].comm.size} ranks; "
            "transformers.Trainer drives one process and cannot keep the ranks of a "
            "layer-parallel group in step. Write the loop with xbt.AdaptiveController for "
            "layer-parallel ranks (docs/adapters.md)")

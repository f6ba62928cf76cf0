"""The training loop used by the ``xbt`` command and the examples.

    task = build_task(TaskConfig(name="synthetic", layers=8))
    summary = Trainer(task, TrainConfig(mode="adaptive", steps=200, out_dir="runs/a")).fit()

One optimizer step = ``grad_accum`` micro-batches (forward + backward each), gradient
clipping, AdamW or SGD with momentum, a linear-warmup + cosine LR schedule. Modes: ``serial``
(exact), ``parallel`` (MGRIT with the configured iterations throughout) and ``adaptive``
(parallel under an :class:`~xbraid_transformers.control.AdaptiveController`). Batches are a
pure function of the step, so ranks stay in step and a resumed run sees the batches it would
have seen.

Outputs under ``out_dir`` (rank 0 only): ``metrics.jsonl`` (one record per logged step),
``summary.json``, ``checkpoint.pt`` (atomic; ``resume=`` continues from it) and, with
``tensorboard=True``, TensorBoard event files.

Failures leave a run that can be continued: a diverged run (a non-finite loss, a diverging
solve, non-finite weights) stops, records ``diverged`` in the summary and never writes a
checkpoint of the diverged state, so the last good one stays. Resuming drops the metrics
records of the steps it replays (a run killed after its last checkpoint) and any damaged line
(``app/rundir.py``); it refuses a checkpoint of a different network or of a run it would not
continue (seed, batch, dropout), and applies changed schedule and optimizer options from the
resumed step on, with a warning (``app/resume.py``). Each step runs the run's step hooks in the
order of ``app/steps.py``: the adaptive controller and the multilevel schedule plug in there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch

from ..control import AdaptiveController, ControlConfig
from ..core.layer_parallel import LayerParallel, find_stacks
from ..distributed import clip_grad_norm_
from ..mgrit.comm import SERIAL, Communicator
from ..mgrit.solver import MGRITDivergenceError
from ..multilevel import MultilevelConfig, MultilevelStepper
from ..perf import VirtualClock, attach_clock
from .defaults import DEFAULTS
from .optim import OPTIMIZERS, make_optimizer
from .rundir import CHECKPOINT, RunFiles
from .steps import ControllerHooks, MultilevelHooks, StepHooks
from ._trainer_checkpoints import TrainerCheckpoints
from ._trainer_output import TrainerOutput, tensorboard_writer
from .tasks import Task

__all__ = ["MODES", "TrainConfig", "Trainer", "seed_everything"]

logger = logging.getLogger(__name__)

MODES = ("serial", "parallel", "adaptive")


@dataclass
class TrainConfig:
    """Options of one training run (defaults from ``app.defaults``).

    optimizer: ``"adamw"`` or ``"sgd"`` (``momentum``: SGD's, 0 for plain SGD).
    lr: peak learning rate; warmup: linear warm-up steps; min_lr_ratio: the cosine decays to
    ``lr * min_lr_ratio`` at ``steps``. clip: max gradient norm (0: off). eval_every: steps
    between evaluations (0: only at the end); evaluation runs the exact (serial) network.
    checkpoint_every: steps between checkpoints (0: only at the end; needs out_dir).
    resume: a checkpoint path, or "auto" for ``out_dir/checkpoint.pt``.
    progress: tqdm bar (None: when stderr is a terminal); otherwise a log line every
    ``print_every`` steps.
    monitor: in ``parallel`` mode, probe on the controller's schedule and record rho without
    ever acting (the probes' extra iterations are the only change to the run).
    virtual_time: record each step's virtual time (``perf.attach_clock``): the rank's CPU time
    plus message waits under an NVLink model, the step time with a core or device per rank;
    CPU models only.
    multilevel: train coarse views of the model on the schedule it describes (evaluation always
    uses the fine model; in adaptive mode the controller watches the fine steps only, so nested
    iteration followed by adaptive layer-parallel training is one run).
    """

    mode: str = DEFAULTS["mode"]
    steps: int = DEFAULTS["steps"]
    optimizer: str = DEFAULTS["optimizer"]
    momentum: float = DEFAULTS["momentum"]
    lr: float = DEFAULTS["lr"]
    warmup: int = DEFAULTS["warmup"]
    min_lr_ratio: float = DEFAULTS["min_lr_ratio"]
    weight_decay: float = DEFAULTS["weight_decay"]
    grad_accum: int = DEFAULTS["grad_accum"]
    clip: float = DEFAULTS["clip"]
    eval_every: int = DEFAULTS["eval_every"]
    eval_batches: int = DEFAULTS["eval_batches"]
    log_every: int = DEFAULTS["log_every"]
    print_every: int = DEFAULTS["print_every"]
    checkpoint_every: int = DEFAULTS["checkpoint_every"]
    out_dir: Optional[str] = None
    resume: Optional[str] = None
    seed: int = DEFAULTS["seed"]
    progress: Optional[bool] = None
    tensorboard: bool = False
    monitor: bool = False
    virtual_time: bool = True
    control: ControlConfig = field(default_factory=ControlConfig)
    multilevel: Optional[MultilevelConfig] = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum!r}")
        for name in ("steps", "grad_accum", "log_every", "print_every", "eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("warmup", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("lr", "clip", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not math.isfinite(self.lr):     # an infinite step ends every run in NaN
            raise ValueError(f"lr must be finite, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        if self.resume is not None and self.resume == "auto" and self.out_dir is None:
            raise ValueError("resume='auto' needs out_dir")
        if self.multilevel is not None:
            self.multilevel.schedule(self.steps)      # enough steps for the schedule


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _layer_parallel_group(modules: List[LayerParallel]) -> Communicator:
    """The one layer-parallel group of a model's stacks (the trainer keeps every stack's ranks
    in step, so all must share it)."""
    comms = {(m.comm.rank, m.comm.size) for m in modules}
    if len(comms) > 1:
        raise ValueError(f"the model's LayerParallel stacks are split over different groups "
                         f"(rank, size): {sorted(comms)}; the trainer needs one group")
    return modules[0].comm if modules else SERIAL


class Trainer(TrainerCheckpoints, TrainerOutput):
    """Trains ``task.model`` on ``task``'s batches; see the module docstring. ``hooks``: step
    hooks of your own (``app.steps.StepHooks``), called after the run's controller and
    multilevel schedule."""

    def __init__(self, task: Task, config: TrainConfig, hooks: Sequence[StepHooks] = ()):
        self.task, self.config = task, config
        self.model = task.model
        self.modules: List[LayerParallel] = find_stacks(self.model)
        self.clock: Optional[VirtualClock] = None
        if config.virtual_time and not any(p.is_cuda for p in self.model.parameters()):
            timer = time.thread_time if torch.get_num_threads() == 1 else time.process_time
            self.clock = attach_clock(self.model, clock=VirtualClock(timer))
        self.comm = _layer_parallel_group(self.modules)
        self.rank = self.comm.rank
        for module in self.modules:
            module.serial() if config.mode == "serial" else module.layer_parallel()
        self.controller = None
        if config.mode == "adaptive":
            self.controller = AdaptiveController(self.model, config.control)
        elif config.mode == "parallel" and config.monitor:
            self.controller = AdaptiveController(
                self.model, dataclasses.replace(config.control, action="monitor"))
        self.optimizer, self.scheduler = make_optimizer(self.model, config)
        self.multilevel: Optional[MultilevelStepper] = None
        self.hooks: List[StepHooks] = []      # the step protocol (app/steps.py), in call order
        if config.multilevel is not None:
            self.multilevel = MultilevelStepper(self.model, self.optimizer,
                                                config.multilevel.schedule(config.steps))
        if self.controller is not None:
            self.hooks.append(ControllerHooks(self.controller, self._fine_step if self.multilevel else None))
        if self.multilevel is not None:
            self.hooks.append(MultilevelHooks(
                self.multilevel, lambda model, step: task.loss(task.batch("train", step))))
        self.hooks += list(hooks)
        self.step = 0
        self.history: List[dict] = []
        self.evals: List[dict] = []
        self.train_seconds = 0.0
        self.virtual_seconds: Optional[float] = None
        self.diverged: Optional[str] = None
        self._resumed_record: Optional[dict] = None   # the last metrics record before a resume
        self._saved_at: Optional[int] = None          # the step of the last checkpoint written
        self._writer = None
        self.files = RunFiles(config.out_dir, writer=self.rank == 0)
        if config.resume is not None:
            path = (os.path.join(config.out_dir, CHECKPOINT) if config.resume == "auto"
                    else config.resume)
            self.load(path)
        else:
            seed_everything(config.seed)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        """One optimizer step at ``self.step``; returns its metrics record."""
        cfg, task = self.config, self.task
        self.model.train()
        start = time.perf_counter()
        if self.clock is not None:
            self.clock.resume()        # the time between steps (evaluation, files) is not counted
            virtual_start = self.clock.time
        with contextlib.ExitStack() as scopes:
            for hook in self.hooks:
                scopes.enter_context(hook.scope(self.step))
            again = True
            while again:    # twice on a probe of the gradient trigger (its reference pass first)
                total = 0.0
                for micro in range(cfg.grad_accum):
                    loss = task.loss(task.batch("train", self.step, micro)) / cfg.grad_accum
                    loss.backward()
                    total += loss.item()
                again = any([hook.after_backward() for hook in self.hooks])
            for hook in self.hooks:
                hook.before_update()
            grad_norm = clip_grad_norm_(self.model, cfg.clip).item() if cfg.clip > 0 else None
            stats = self.modules[0].stats if self.modules else None
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
        fields = {}
        for hook in self.hooks:
            fields.update(hook.after_update())
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.train_seconds += time.perf_counter() - start
        if self.clock is not None:
            if self.comm.size > 1:    # the step ends when the slowest rank is done
                self.comm.allreduce(torch.zeros(1, device=self.comm.device), "max")
            else:
                self.clock.tick()
            self.virtual_seconds = (self.virtual_seconds or 0.0) + self.clock.time - virtual_start
        record = {"step": self.step, "loss": total, "lr": lr, "grad_norm": grad_norm,
                  "time": self.train_seconds, "virtual_time": self.virtual_seconds,
                  "mode": stats.mode if stats else "serial", "probe": False,
                  "fwd_iters": stats.fwd_iters if stats else 0,
                  "bwd_iters": stats.bwd_iters if stats else 0,
                  "fwd_residuals": list(stats.fwd_residuals) if stats else [],
                  "bwd_residuals": list(stats.bwd_residuals) if stats else [],
                  "rho_forward": None, "rho_backward": None, **fields}
        if not math.isfinite(total):
            raise FloatingPointError(f"loss became {total} at step {self.step}")
        self.step += 1
        return record

    def _fine_step(self, step: int) -> bool:
        """Whether the multilevel schedule trains the fine model at ``step``."""
        return self.multilevel.schedule.locate(step)[0].is_fine

    @torch.no_grad()
    def evaluate(self, split: str = "val") -> float:
        """Mean loss of the exact (serial) network over ``eval_batches`` fixed batches. It is
        measurement, not training: the virtual clock is set back to where it was (on every rank
        alike, so the messages of a split evaluation do not skew the next step's start)."""
        modes = [m.parallel for m in self.modules]
        was_training = self.model.training
        clock_before = self.clock.time if self.clock is not None else None
        self.model.eval()
        for m in self.modules:
            m.serial()
        try:
            losses = [self.task.loss(self.task.batch(split, i)).item()
                      for i in range(self.config.eval_batches)]
        finally:
            for m, parallel in zip(self.modules, modes):
                m.set_parallel(parallel)
            self.model.train(was_training)
            if self.clock is not None:
                self.clock.time = clock_before
                self.clock.resume()
        return sum(losses) / len(losses)

    # ------------------------------------------------------------------ the loop
    def fit(self, until: Optional[int] = None) -> dict:
        """Train to ``config.steps`` (or stop before step ``until``: an interruption that leaves
        a checkpoint, for resuming). Returns the summary (also written to summary.json)."""
        cfg = self.config
        stop = cfg.steps if until is None else min(until, cfg.steps)
        if self.step >= stop and cfg.resume is not None:
            logger.warning("the checkpoint is at step %d and the run stops at step %d: nothing to "
                           "train (raise steps to continue)", self.step, stop)
        if cfg.tensorboard and self.is_main and cfg.out_dir:
            self._writer = tensorboard_writer(cfg.out_dir)
        bar = self._progress(stop)
        first = self.step
        try:
            while self.step < stop:
                try:
                    record = self.train_step()
                except (MGRITDivergenceError, FloatingPointError) as error:
                    self._diverge(error)
                    break
                step = record["step"]
                if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                    record["eval_loss"] = self.evaluate()
                    self.evals.append({"step": step, "loss": record["eval_loss"]})
                if record.get("action") in ("serial", "increase", "at-cap"):
                    logger.warning("step %d: controller -> %s (%s)", step, record["action"],
                                   record["reason"])
                if step % cfg.log_every == 0 or step == stop - 1 or "eval_loss" in record:
                    self.history.append(record)
                    self._write_record(record)
                self._report(bar, record, stop)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    if not self._checkpoint():
                        break
        finally:
            if bar is not None:
                bar.close()
        if cfg.out_dir and not self.diverged and self.step > first and self._saved_at != self.step:
            self._checkpoint()
        if self.step >= cfg.steps or self.diverged:
            return self.finish()
        return self.summary()

    def _checkpoint(self) -> bool:
        """Save; non-finite weights end the run as diverged instead (nothing written)."""
        try:
            self.save()
        except FloatingPointError as error:
            self._diverge(error)
            return False
        self._saved_at = self.step
        return True

    def _diverge(self, error: Exception) -> None:
        self.diverged = f"step {self.step}: {error}"
        logger.error("training diverged at %s; no checkpoint of the diverged state is written",
                     self.diverged)

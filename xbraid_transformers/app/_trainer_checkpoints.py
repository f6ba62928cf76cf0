"""A training run's checkpoints: the state it saves (gathered from every rank), saving only
finite weights, and loading a checkpoint to resume (``app/resume.py`` decides which runs may
continue it)."""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..distributed import gather_named, gather_optimizer_state, gather_state_dict, load_optimizer_state
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .resume import adjustments, check_resumable, run_identity
from .rundir import CHECKPOINT

__all__ = ["TrainerCheckpoints"]

logger = logging.getLogger("xbraid_transformers.app.trainer")   # the trainer's own logger


class TrainerCheckpoints:
    """Checkpoint and resume of ``Trainer`` (a mixin: it reads and restores the trainer's
    model, optimizer, schedule, hooks' state and counters)."""

    def state_dict(self) -> dict:
        return {"step": self.step, "model": gather_state_dict(self.model),
                "optimizer": gather_optimizer_state(self.model, self.optimizer),
                "scheduler": self.scheduler.state_dict(),
                "controller": self.controller.state_dict() if self.controller else None,
                "dropout": [m.dropout.state_dict() for m in self.modules],
                "modes": [m.parallel for m in self.modules],
                "multilevel": self._multilevel_state(),
                "rng": rng_state(), "data": {"next_step": self.step},
                "train_seconds": self.train_seconds, "virtual_seconds": self.virtual_seconds,
                **run_identity(self.task.config, self.config)}

    def _multilevel_state(self) -> Optional[dict]:
        """The stepper's state, its per-parameter tensors gathered from every rank."""
        if self.multilevel is None:
            return None
        return {k: gather_named(self.model, v) if isinstance(v, dict) else v
                for k, v in self.multilevel.state_dict().items()}

    def weights_finite(self) -> bool:
        """Whether every parameter of the model, on every rank, is finite (collective)."""
        bad = sum(int(not torch.isfinite(p).all()) for p in self.model.parameters())
        if self.comm.size > 1:
            bad = self.comm.allreduce_sum(float(bad))
        return bad == 0

    def save(self, path: Optional[str] = None) -> Optional[str]:
        """Write the checkpoint (every rank calls it; rank 0 writes). Raises FloatingPointError,
        writing nothing, when a weight is not finite: the previous checkpoint stays the one to
        resume from."""
        path = path or self.files.path(CHECKPOINT)
        if path is None:
            return None
        if not self.weights_finite():
            raise FloatingPointError(f"the weights are not finite after step {self.step - 1}; "
                                     f"no checkpoint written")
        state = self.state_dict()          # every rank: gathering the model is collective
        if not self.is_main:
            return None
        save_checkpoint(path, state)
        logger.info("checkpoint at step %d written to %s", self.step, path)
        return path

    def load(self, path: str) -> None:
        state = load_checkpoint(path)
        check_resumable(state, path, self.task.config, self.config)
        self.model.load_state_dict(state["model"])
        load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.multilevel is not None and state.get("multilevel") is not None:
            self.multilevel.load_state_dict(state["multilevel"])
        if self.controller is not None and state.get("controller"):
            self.controller.load_state_dict(state["controller"])
        for module, drop in zip(self.modules, state["dropout"]):
            module.dropout.load_state_dict(drop)
        set_rng_state(state["rng"])
        self.step = int(state["data"]["next_step"])
        self.train_seconds = float(state.get("train_seconds") or 0.0)
        self.virtual_seconds = state.get("virtual_seconds")
        self._resume_learning_rate(state, path)
        self._resumed_record = self.files.trim_metrics(self.step, self.config.log_every)
        logger.info("resumed from %s at step %d", path, self.step)

    def _resume_learning_rate(self, state: dict, path: str) -> None:
        """The loaded optimizer carries the checkpoint's learning rate; the schedule restarts
        from this run's options (the same unless they were changed, which is said)."""
        changes = adjustments(state, self.task.config, self.config, self.step)
        if changes:
            logger.warning("resuming %s with %s", path, changes)
        scheduler = self.scheduler
        scheduler.base_lrs = [self.config.lr for _ in scheduler.base_lrs]
        for group, factor in zip(self.optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"] = self.config.lr
            group["lr"] = self.config.lr * factor(scheduler.last_epoch)

"""What a checkpoint records about its run, and which runs may continue it.

A checkpoint carries the run's identity (:func:`run_identity`): the mode, optimizer, task,
multilevel schedule, the network's options and the options that decide what a resumed run
continues. :func:`check_resumable` refuses a run that would not continue the checkpoint's
(``ResumeError``, naming each option with both values); :func:`adjustments` names the options
a resumed run may change, with the learning rate before and after.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from .optim import lr_factor

__all__ = ["ResumeError", "ARCHITECTURE", "CONTINUATION", "ADJUSTABLE", "run_identity",
           "check_resumable", "adjustments"]


class ResumeError(ValueError):
    """A checkpoint that this run cannot continue (another mode, optimizer, schedule, task or
    network, or other batches)."""


# TaskConfig fields that define the network: a checkpoint resumes only into the same ones.
ARCHITECTURE = ("name", "layers", "d_model", "heads", "vocab", "seq_len", "step_size", "tokenizer")
# Options that decide what a resumed run continues: the batches it sees (seed, batch size,
# accumulation) and the function it trains (dropout). A resume that changes one is refused.
CONTINUATION = ("seed", "batch_size", "grad_accum", "dropout")
# Options a resumed run may change, with a warning naming the change (the learning-rate
# schedule's: lr, steps, warmup, min_lr_ratio; the optimizer's: weight_decay, momentum, clip).
# Every other option (evaluation, logging, checkpoints, MGRIT and controller settings) changes
# freely.
ADJUSTABLE = ("lr", "steps", "warmup", "min_lr_ratio", "weight_decay", "momentum", "clip")
_SCHEDULE = ("lr", "steps", "warmup", "min_lr_ratio")


def _options(task_cfg, train_cfg) -> dict:
    """The values of ``CONTINUATION`` and ``ADJUSTABLE`` (the task's config first)."""
    return {name: getattr(task_cfg if hasattr(task_cfg, name) else train_cfg, name)
            for name in CONTINUATION + ADJUSTABLE}


def _schedule_key(train_cfg) -> Optional[dict]:
    return None if train_cfg.multilevel is None else dataclasses.asdict(train_cfg.multilevel)


def run_identity(task_cfg, train_cfg) -> dict:
    """The checkpoint fields that say which run wrote it."""
    return {"mode": train_cfg.mode, "optimizer_name": train_cfg.optimizer, "task": task_cfg.name,
            "schedule": _schedule_key(train_cfg),
            "architecture": {k: getattr(task_cfg, k) for k in ARCHITECTURE},
            "options": _options(task_cfg, train_cfg), "lr": train_cfg.lr}


def _flags(names, values) -> str:
    return ", ".join(f"--{k.replace('_', '-')} {values[k]}" for k in names)


def check_resumable(state: dict, path: str, task_cfg, train_cfg) -> None:
    """Raise ``ResumeError`` unless the run of ``task_cfg``/``train_cfg`` continues the run that
    wrote ``state`` (fields an older checkpoint lacks are not checked)."""
    if state.get("mode") not in (None, train_cfg.mode):
        raise ResumeError(f"checkpoint {path!r} is of a {state['mode']!r} run, this run is "
                          f"{train_cfg.mode!r}")
    saved_optimizer = state.get("optimizer_name", "adamw")   # older checkpoints: AdamW
    if saved_optimizer != train_cfg.optimizer:
        raise ResumeError(f"checkpoint {path!r} was trained with {saved_optimizer!r}, "
                          f"this run uses {train_cfg.optimizer!r}")
    if state.get("schedule") != _schedule_key(train_cfg):
        raise ResumeError(f"checkpoint {path!r} was trained with the multilevel schedule "
                          f"{state.get('schedule')}, this run has {_schedule_key(train_cfg)}")
    if state.get("task") not in (None, task_cfg.name):
        raise ResumeError(f"checkpoint {path!r} is of the {state['task']!r} task, this run is "
                          f"{task_cfg.name!r}")
    saved = state.get("architecture") or {}
    differ = [k for k in ARCHITECTURE if k in saved and saved[k] != getattr(task_cfg, k)]
    if differ:
        raise ResumeError(
            f"checkpoint {path!r} is of a different network: " + ", ".join(
                f"--{k.replace('_', '-')} {saved[k]} there, {getattr(task_cfg, k)} here"
                for k in differ) + "; resume with the checkpoint's options or start a new run")
    saved, mine = state.get("options") or {}, _options(task_cfg, train_cfg)
    differ = [k for k in CONTINUATION if k in saved and saved[k] != mine[k]]
    if differ:
        raise ResumeError(
            f"checkpoint {path!r} continues a run with {_flags(differ, saved)}; this run has "
            f"{_flags(differ, mine)}: a resumed run must see the batches and train the network the "
            f"checkpoint's run would have; resume with the checkpoint's values or start a new run")


def adjustments(state: dict, task_cfg, train_cfg, step: int) -> Optional[str]:
    """The adjustable options this run changes, with the learning rate at ``step`` before and
    after (None when nothing changed)."""
    saved = dict(state.get("options") or {})
    saved.setdefault("lr", state.get("lr", (state["scheduler"].get("base_lrs") or [None])[0]))
    mine = _options(task_cfg, train_cfg)
    changed = [k for k in ADJUSTABLE if saved.get(k) is not None and saved[k] != mine[k]]
    if not changed:
        return None
    old = {**mine, **{k: saved[k] for k in _SCHEDULE if k in saved}}

    def lr_at(o):
        return o["lr"] * lr_factor(step, o["warmup"], o["steps"], o["min_lr_ratio"])
    return (", ".join(f"--{k.replace('_', '-')} {mine[k]:g} (was {saved[k]:g})" for k in changed)
            + f"; the learning rate at step {step} is {lr_at(mine):.3g} (it was {lr_at(old):.3g})")

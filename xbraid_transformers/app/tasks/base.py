"""What every task shares: its options, the ``Task`` interface and the data helpers.

A task bundles a model, a deterministic batch source and a loss. Batches are a pure function of
(seed, split, step, micro-batch index), so the data position of a checkpoint is just the step
number and a resumed run (on any number of ranks) sees exactly the batches it would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ...data.sources import DataSourceMissing
from ...distributed import broadcast_replicated_
from ...mgrit.config import MGRITConfig
from ..defaults import DEFAULTS, default_mgrit

__all__ = ["TaskUnavailable", "TaskConfig", "Task", "SampledTask", "replicated_from_rank0",
           "load_data", "final_time", "parallel_config", "token_rows"]


class TaskUnavailable(RuntimeError):
    """A task's model code or data source is not installed."""


@dataclass
class TaskConfig:
    """Size of a task's model and batches (the options the CLI exposes; defaults from
    ``app.defaults``).

    ``step_size``: ODE step h of the layer-parallel stack (None: 1 / layers).
    ``mgrit``: solver options of every LayerParallel module in the model.
    ``tokenizer``: ``"char"`` or ``"bpe"`` (text tasks); ``data_path``: a user's own data file
    in place of the packaged source.
    """

    name: str = "synthetic"
    layers: int = DEFAULTS["layers"]
    d_model: int = DEFAULTS["d_model"]
    heads: int = DEFAULTS["heads"]
    seq_len: int = DEFAULTS["seq_len"]
    batch_size: int = DEFAULTS["batch_size"]
    vocab: int = DEFAULTS["vocab"]
    dropout: float = DEFAULTS["dropout"]
    step_size: Optional[float] = DEFAULTS["step_size"]
    seed: int = DEFAULTS["seed"]
    tokenizer: str = DEFAULTS["tokenizer"]
    data_path: Optional[str] = DEFAULTS["data_path"]
    mgrit: MGRITConfig = field(default_factory=default_mgrit)


class Task:
    """A model and its data: ``batch(split, step, micro)`` and ``loss(batch)``."""

    name = "task"

    def __init__(self, config: TaskConfig, model: nn.Module):
        self.config, self.model = config, model

    def generator(self, split: str, step: int, micro: int) -> torch.Generator:
        split_id = {"train": 0, "val": 1, "test": 2}[split]
        seed = (self.config.seed * 1_000_003 + split_id * 7_919 + step) * 131 + micro
        return torch.Generator().manual_seed(seed & ((1 << 63) - 1))

    def batch(self, split: str, step: int, micro: int = 0):
        raise NotImplementedError

    def loss(self, batch) -> torch.Tensor:
        raise NotImplementedError


class SampledTask(Task):
    """Batches are random rows of fixed per-split tensors (``self.splits``)."""

    splits: dict

    def batch(self, split, step, micro=0):
        tensors = self.splits[split if split in self.splits else "val"]
        idx = torch.randint(len(tensors[0]), (self.config.batch_size,),
                            generator=self.generator(split, step, micro))
        return tuple(t[idx] for t in tensors) + (self.generator(split, step, micro),)


def replicated_from_rank0(model: nn.Module) -> nn.Module:
    """Across ranks, the replicated parts (embeddings, heads) start from rank 0's values."""
    return broadcast_replicated_(model)


def load_data(load):
    """Run a data loader, turning a missing source into TaskUnavailable."""
    try:
        return load()
    except (DataSourceMissing, ImportError) as error:
        raise TaskUnavailable(str(error)) from error


def final_time(config: TaskConfig) -> float:
    return 1.0 if config.step_size is None else config.step_size * config.layers


def parallel_config(config: TaskConfig):
    """The models' ``ParallelConfig`` of a task: its MGRIT options, T and dropout seed."""
    from ...models import ParallelConfig
    return ParallelConfig(mgrit=config.mgrit, final_time=final_time(config),
                          dropout_seed=config.seed)


def token_rows(stream, width: int, start_token: int) -> torch.Tensor:
    """Cut a token stream into rows of ``width`` led by ``start_token``: (rows, width)."""
    n = len(stream) // (width - 1)
    body = torch.from_numpy(stream[: n * (width - 1)].astype("int64")).view(n, width - 1)
    return torch.cat([torch.full((n, 1), start_token), body], 1)

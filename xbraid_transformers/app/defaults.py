"""The one table of defaults of the application: the ``xbt`` options, ``TaskConfig``,
``TrainConfig`` and the README's table all read it. Tasks override entries for their own
sizes (``TaskSpec.defaults``); the command line overrides both.

The controller's options (probe_every, trigger, threshold, grad_threshold, action, max_iters,
floor) are ``ControlConfig``'s own defaults, read from there so that the library and the
application cannot disagree.
"""
from __future__ import annotations

import dataclasses

from ..control import ControlConfig
from ..mgrit.config import MGRITConfig

__all__ = ["TABLE", "DEFAULTS", "default_mgrit", "markdown_table"]

_CONTROL = {f.name: f.default for f in dataclasses.fields(ControlConfig)
            if f.name in ("probe_every", "trigger", "threshold", "grad_threshold", "action", "max_iters",
                          "floor")}

#: option -> (default, what it means)
TABLE = {
    # task and model
    "layers": (8, "transformer layers (ODE steps)"),
    "d_model": (32, "model width"),
    "heads": (4, "attention heads"),
    "seq_len": (32, "tokens per sequence"),
    "batch_size": (16, "sequences per micro-batch"),
    "vocab": (8, "vocabulary of the synthetic task"),
    "dropout": (0.0, "dropout probability (masks synchronised across MGRIT evaluations)"),
    "step_size": (None, "ODE step h (None: 1/layers)"),
    "tokenizer": ("char", "char or bpe (text tasks)"),
    "data_path": (None, "your own data file instead of the packaged source"),
    # MGRIT
    "levels": (2, "MGRIT levels"),
    "cfactor": (4, "coarsening factor"),
    "relax": ("F", "relaxation: F, FCF or FCFCF"),
    "fwd_iters": (2, "forward MGRIT iterations"),
    "bwd_iters": (1, "adjoint MGRIT iterations"),
    # training
    "mode": ("adaptive", "serial, parallel or adaptive"),
    "steps": (100, "optimizer steps"),
    "optimizer": ("adamw", "adamw or sgd"),
    "momentum": (0.9, "SGD's momentum"),
    "lr": (1e-3, "peak learning rate"),
    "warmup": (0, "linear warm-up steps"),
    "min_lr_ratio": (0.1, "the cosine decays to lr * min_lr_ratio"),
    "weight_decay": (0.0, "weight decay"),
    "grad_accum": (1, "micro-batches per optimizer step"),
    "clip": (1.0, "max gradient norm (0: off)"),
    "eval_every": (0, "steps between evaluations (0: at the end)"),
    "eval_batches": (2, "batches per evaluation"),
    "log_every": (1, "steps between metrics records"),
    "print_every": (10, "steps between log lines (without a progress bar)"),
    "checkpoint_every": (0, "steps between checkpoints (0: at the end)"),
    "seed": (0, "seed of data, initialisation and dropout"),
    # adaptive control (ControlConfig's)
    **{name: (value, "adaptive control: see ControlConfig") for name, value in _CONTROL.items()},
    # multilevel training in depth
    "schedule": ("single", "single or multilevel"),
    "cycle": ("nested", "nested or v"),
    "coarse_steps": (25, "steps of each coarse phase"),
    "fine_steps": (25, "fine steps per V-cycle"),
    "ml_levels": (3, "nested: levels, N/2^(L-1) first"),
    "prolongation": ("copy", "copy or linear"),
    "optimizer_state": ("keep", "keep, reset or transfer at a phase change"),
    "mgopt": (False, "MG/OPT correction of coarse gradients"),
    "line_search": (False, "MG/OPT line search after each coarse phase"),
    "coarse_gradients": ("scaled", "scaled or raw"),
}

DEFAULTS = {name: value for name, (value, _) in TABLE.items()}


def default_mgrit(values: dict = DEFAULTS) -> MGRITConfig:
    """The MGRIT options of a table of values (the defaults unless given)."""
    return MGRITConfig(levels=values["levels"], cfactor=values["cfactor"], relax=values["relax"],
                       fwd_iters=values["fwd_iters"], bwd_iters=values["bwd_iters"])


def markdown_table() -> str:
    """The defaults as the README shows them."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    rows += [f"| `--{name.replace('_', '-')}` | {value!r} | {meaning} |"
             for name, (value, meaning) in TABLE.items()]
    return "\n".join(rows)

"""The trainer's optimizers and learning-rate schedule (linear warm-up, then cosine decay)."""
from __future__ import annotations

import math

import torch

__all__ = ["OPTIMIZERS", "lr_factor", "make_optimizer"]

# name -> (params, config) -> optimizer; the peak lr is the config's, the schedule scales it.
OPTIMIZERS = {
    "adamw": lambda params, cfg: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
    "sgd": lambda params, cfg: torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                               weight_decay=cfg.weight_decay),
}


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg):
    """The optimizer of ``cfg`` (a ``TrainConfig``) over the model and its LR schedule."""
    optimizer = OPTIMIZERS[cfg.optimizer](model.parameters(), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup, cfg.steps, cfg.min_lr_ratio))
    return optimizer, scheduler

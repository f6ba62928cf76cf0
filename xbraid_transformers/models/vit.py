"""ViT: an image classifier whose transformer stack is an ODE solved by MGRIT.

    model = ViT(ViTConfig(image_size=28, patch_size=7, channels=1, num_classes=10))
    logits = model(images)                      # images: (B, C, H, W) -> logits (B, classes)

Patches -> linear embedding (a strided convolution) + [CLS] token + learned positions ->
pre-LN encoder (step T/N) -> final LayerNorm -> linear head on the mean patch state (or the
[CLS] state with ``pool="cls"``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .common import LayerParallelModel, ParallelConfig, encoder_stack, initialise_

__all__ = ["ViTConfig", "ViT"]


@dataclass
class ViTConfig:
    image_size: int = 28
    patch_size: int = 7
    channels: int = 1
    num_classes: int = 10
    d_model: int = 64
    n_heads: int = 4
    num_layers: int = 8
    d_ff: Optional[int] = None     # default 4 * d_model
    dropout: float = 0.0
    pool: str = "mean"             # "mean" of the patch states or the "cls" token's state
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        if self.pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {self.pool!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size "
                             f"{self.patch_size}")


class ViT(LayerParallelModel):
    def __init__(self, config: ViTConfig, comm=None):
        super().__init__()
        self.config = c = config
        num_patches = (c.image_size // c.patch_size) ** 2
        self.patch = nn.Conv2d(c.channels, c.d_model, c.patch_size, stride=c.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, c.d_model))
        self.pos = nn.Parameter(0.02 * torch.randn(1, num_patches + 1, c.d_model))
        self.drop = nn.Dropout(c.dropout)
        self.encoder = encoder_stack(c, comm)       # step T/N, MGRIT, buffers, final LayerNorm
        self.head = nn.Linear(c.d_model, c.num_classes)
        initialise_(self, self.encoder, c.parallel, c.num_layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        if images.dim() != 4 or images.shape[1:] != (c.channels, c.image_size, c.image_size):
            raise ValueError(f"images must be (B, {c.channels}, {c.image_size}, {c.image_size}), "
                             f"got {tuple(images.shape)}")
        x = self.patch(images).flatten(2).transpose(1, 2)      # (B, patches, d)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1)  # (B, 1 + patches, d)
        x = self.encoder(self.drop(x + self.pos))              # (B, 1 + patches, d)
        pooled = x[:, 0] if c.pool == "cls" else x[:, 1:].mean(1)  # (B, d)
        return self.head(pooled)                               # (B, classes)

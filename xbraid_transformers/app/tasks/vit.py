"""Fashion-MNIST (or MNIST-5k) classification with ``models.ViT``."""
from __future__ import annotations

import logging

from torch import nn

from ...data.sources import DataSourceMissing
from .base import SampledTask, TaskConfig, load_data, parallel_config, replicated_from_rank0

__all__ = ["ViTTask"]


class ViTTask(SampledTask):
    """Fashion-MNIST classification with ``models.ViT`` (MNIST-5k when Fashion-MNIST is absent)."""

    name = "vit"

    def __init__(self, config: TaskConfig, comm=None):
        from ...data.images import image_splits, images_to_float
        from ...models import ViT, ViTConfig
        c = config
        try:
            parts = image_splits("fashion_mnist")
        except DataSourceMissing as error:
            logging.getLogger(__name__).warning("%s; using MNIST-5k instead", error)
            parts = load_data(lambda: image_splits("mnist_5k"))
        self.splits = {s: (images_to_float(x), y) for s, (x, y) in parts.items()}
        model = ViT(ViTConfig(d_model=c.d_model, n_heads=c.heads, num_layers=c.layers,
                              dropout=c.dropout, parallel=parallel_config(c)), comm=comm)
        super().__init__(config, replicated_from_rank0(model))

    def loss(self, batch):
        images, labels, _ = batch
        return nn.functional.cross_entropy(self.model(images), labels)

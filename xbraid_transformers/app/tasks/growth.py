"""A linear ODE fit whose MGRIT convergence degrades as it learns: the controller's showcase."""
from __future__ import annotations

import torch
from torch import nn

from ...core.layer_parallel import LayerParallel
from .base import Task, TaskConfig

__all__ = ["GrowthTask"]


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

"""What the four model files share: the layer-parallel options, the pre-LN torch layers they
stack, the stack itself and the initialisation."""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from torch import nn

from ..mgrit.config import MGRITConfig
from ..nn import LayerParallelTransformerEncoder, ODEStack

__all__ = ["ParallelConfig", "deepnet_gain", "scale_residual_branches_", "pre_ln_layer",
           "encoder_stack", "initialise_", "LayerParallelModel"]


@dataclass
class ParallelConfig:
    """How the transformer stack is solved.

    mgrit: MGRIT options (used in layer-parallel mode). final_time: T; the ODE layers take the
    step T / (number of ODE layers). buffer_layers: (k_front, k_back) serial layers with step 1
    around the ODE part. deepnet_init: scale the value, output-projection and MLP weights by
    ``deepnet_gain(num_layers)`` at initialisation (for deep stacks). autocast: e.g.
    ``torch.bfloat16`` for mixed-precision layer evaluations. compile: ``torch.compile`` the rhs.
    dropout_seed: seed of the synchronised dropout masks (None: ``torch.initial_seed()``).
    """

    mgrit: MGRITConfig = field(default_factory=MGRITConfig)   # the library's defaults
    final_time: float = 1.0
    buffer_layers: Tuple[int, int] = (0, 0)
    deepnet_init: bool = False
    autocast: Optional[torch.dtype] = None
    compile: bool = False
    dropout_seed: Optional[int] = None

    def __post_init__(self):
        if not self.final_time > 0:
            raise ValueError(f"final_time must be positive, got {self.final_time}")

    def stack_options(self, num_layers: int) -> dict:
        """Keyword arguments of the drop-ins for a stack of ``num_layers`` layers."""
        ode_layers = num_layers - sum(self.buffer_layers)
        return dict(mgrit=self.mgrit, step_size=self.final_time / max(ode_layers, 1),
                    dropout_seed=self.dropout_seed, buffer_layers=self.buffer_layers,
                    autocast=self.autocast, compile=self.compile)


def deepnet_gain(num_layers: int) -> float:
    """sqrt(log(2 L)): the depth-dependent init gain the paper cites for deep pre-LN stacks."""
    return math.sqrt(math.log(2 * num_layers))


@torch.no_grad()
def scale_residual_branches_(layers, gain: float) -> None:
    """Multiply value projections, attention output projections and MLP weights by ``gain``."""
    for layer in layers:
        for attn in (getattr(layer, "self_attn", None), getattr(layer, "multihead_attn", None)):
            if attn is None:
                continue
            d = attn.embed_dim
            if attn.in_proj_weight is not None:
                attn.in_proj_weight[2 * d:].mul_(gain)
            else:
                attn.v_proj_weight.mul_(gain)
            attn.out_proj.weight.mul_(gain)
        layer.linear1.weight.mul_(gain)
        layer.linear2.weight.mul_(gain)


@torch.no_grad()
def _init_weights_(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2 style init: normal(0, std) for linear and embedding weights, zero biases.

    Every weight draws from its own generator, seeded by one draw of the global generator and
    the weight's name: a layer gets the same values whichever rank owns it and however many
    layers the other ranks hold (their placeholders draw nothing)."""
    base = int(torch.randint(0, 2 ** 62, (1,)))

    def normal_(name: str, weight: torch.Tensor) -> None:
        generator = torch.Generator(device=weight.device)
        generator.manual_seed((base + 1_000_003 * zlib.crc32(name.encode())) % 2 ** 63)
        weight.normal_(0.0, std, generator=generator)

    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            normal_(f"{name}.weight", m.weight)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            normal_(f"{name}.in_proj_weight", m.in_proj_weight)
            nn.init.zeros_(m.in_proj_bias)


def pre_ln_layer(kind, d_model: int, n_heads: int, d_ff: Optional[int], dropout: float):
    """A pre-LN torch layer (``nn.TransformerEncoderLayer`` or ``DecoderLayer``) with GELU,
    batch first: the ODE step of every model here (``d_ff`` None: 4 * d_model)."""
    return kind(d_model, n_heads, d_ff or 4 * d_model, dropout, activation="gelu",
                batch_first=True, norm_first=True)


def encoder_stack(config, comm=None) -> LayerParallelTransformerEncoder:
    """``config.num_layers`` pre-LN encoder layers solved as one ODE (step T/N, MGRIT and buffer
    layers from ``config.parallel``) and a final LayerNorm; ``config``: a model config with
    ``d_model``, ``n_heads``, ``d_ff``, ``dropout``, ``num_layers`` and ``parallel``."""
    c = config
    layer = pre_ln_layer(nn.TransformerEncoderLayer, c.d_model, c.n_heads, c.d_ff, c.dropout)
    return LayerParallelTransformerEncoder(layer, c.num_layers, nn.LayerNorm(c.d_model), comm=comm,
                                           **c.parallel.stack_options(c.num_layers))


def initialise_(model: nn.Module, stack: ODEStack, parallel: "ParallelConfig", num_layers: int) -> None:
    """The models' initialisation (``_init_weights_``), then, with ``parallel.deepnet_init``,
    the residual branches of the stack's layers scaled for a depth of ``num_layers``."""
    _init_weights_(model)
    if parallel.deepnet_init:
        scale_residual_branches_(stack.layers, deepnet_gain(num_layers))


class LayerParallelModel(nn.Module):
    """Mode switches for a model holding drop-in stacks: the training code stays the same.

    The models take ``comm`` (the layer-parallel process group; None: this process alone) and
    pass it to their stacks."""

    def stacks(self):
        return [m for m in self.modules() if isinstance(m, ODEStack)]

    def serial(self):
        for s in self.stacks():
            s.serial()
        return self

    def layer_parallel(self):
        for s in self.stacks():
            s.layer_parallel()
        return self

    @property
    def stats(self):
        """The last solve's statistics (of the first stack)."""
        return self.stacks()[0].stats

    def configure(self, **changes) -> None:
        for s in self.stacks():
            s.configure(**changes)

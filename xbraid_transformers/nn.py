"""Drop-in replacements for ``torch.nn`` transformer stacks, solved layer-parallel."""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from .config import MGRITConfig
from .layer_parallel import LayerParallel
from .ode.blocks import check_pre_ln, encoder_rhs


class LayerParallelTransformerEncoder(nn.Module):
    """Layer-parallel counterpart of ``torch.nn.TransformerEncoder``.

    Built like the torch class from a pre-LN ``nn.TransformerEncoderLayer`` that is cloned
    ``num_layers`` times; ``.layers[i]`` are those torch layers, so torch checkpoints load
    layer by layer. Layer i computes x + h F_i(x); ``step_size=1.0`` is exactly the torch
    encoder, the default ``1 / num_layers`` is the neural-ODE form that MGRIT needs.
    """

    def __init__(self, encoder_layer: nn.TransformerEncoderLayer, num_layers: int,
                 norm: Optional[nn.Module] = None, *, mgrit: Optional[MGRITConfig] = None,
                 step_size: Optional[float] = None, dropout_seed: Optional[int] = None):
        super().__init__()
        check_pre_ln(encoder_layer)
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        self.batch_first = encoder_layer.self_attn.batch_first
        layers = nn.ModuleList(copy.deepcopy(encoder_layer) for _ in range(num_layers))
        self.stack = LayerParallel(layers, rhs=encoder_rhs, step_size=step_size, mgrit=mgrit,
                                   dropout_seed=dropout_seed)
        self.num_layers = num_layers
        self.norm = norm

    @property
    def layers(self) -> nn.ModuleList:
        return self.stack.layers

    @property
    def stats(self):
        return self.stack.stats

    def serial(self):
        self.stack.serial()
        return self

    def layer_parallel(self):
        self.stack.layer_parallel()
        return self

    def forward(self, src: torch.Tensor, mask: Optional[torch.Tensor] = None,
                src_key_padding_mask: Optional[torch.Tensor] = None,
                is_causal: Optional[bool] = None) -> torch.Tensor:
        if src.dim() not in (2, 3) or src.shape[-1] != self.layers[0].self_attn.embed_dim:
            raise ValueError(f"src must be (seq, batch, {self.layers[0].self_attn.embed_dim}) or "
                             f"(batch, seq, d_model) for batch_first, got {tuple(src.shape)}")
        seq_len = src.shape[-2] if (self.batch_first and src.dim() == 3) else src.shape[0]
        if is_causal and mask is None:
            mask = nn.Transformer.generate_square_subsequent_mask(seq_len, device=src.device,
                                                                   dtype=src.dtype)
        out = self.stack(src, mask=mask, src_key_padding_mask=src_key_padding_mask,
                         is_causal=bool(is_causal))
        return self.norm(out) if self.norm is not None else out

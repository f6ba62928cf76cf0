"""Transformer layers written as ODE right-hand sides F(x; theta).

A pre-LN layer computes x + phi1(x) + phi2(x + phi1(x)); the ODE step of size h is
x + h * F(x) with F(x) = phi1(x) + phi2(x + phi1(x)), so h = 1 reproduces the torch layer.
The right-hand sides below read the parameters of the torch layer modules themselves, so a
layer's state dict is exactly that of ``torch.nn.TransformerEncoderLayer`` /
``torch.nn.TransformerDecoderLayer``.

Also here: the encoder-decoder right-hand side on the joint state Z = [X, Y] (one ODE for
both stacks, docs/algorithm.md) and the opt-in wrappers for mixed precision and
``torch.compile``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Rhs", "check_pre_ln", "encoder_rhs", "decoder_rhs", "encoder_decoder_rhs", "wrap_rhs"]

Rhs = Callable[..., torch.Tensor]


def check_pre_ln(layer: nn.Module) -> None:
    if not getattr(layer, "norm_first", False):
        raise ValueError(
            f"{type(layer).__name__} has norm_first=False (post-LN): a post-LN layer "
            "LN(x + F(x)) is not a forward-Euler step x + h F(x), so it cannot be solved as an "
            "ODE. Build the layer with norm_first=True.")


def _self_attention(layer, x, mask, key_padding_mask, is_causal):
    out = layer.self_attn(x, x, x, attn_mask=mask, key_padding_mask=key_padding_mask,
                          need_weights=False, is_causal=is_causal)[0]
    return layer.dropout1(out)


def _feed_forward(layer, x, last_dropout):
    return last_dropout(layer.linear2(layer.dropout(layer.activation(layer.linear1(x)))))


def encoder_rhs(layer: nn.TransformerEncoderLayer, x: torch.Tensor, mask=None,
                src_key_padding_mask=None, is_causal: bool = False) -> torch.Tensor:
    """F(x) of a pre-LN ``nn.TransformerEncoderLayer``: phi1(x) + phi2(x + phi1(x))."""
    phi1 = _self_attention(layer, layer.norm1(x), mask, src_key_padding_mask, is_causal)
    return phi1 + _feed_forward(layer, layer.norm2(x + phi1), layer.dropout2)


def decoder_rhs(layer: nn.TransformerDecoderLayer, y: torch.Tensor, memory: torch.Tensor,
                tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> torch.Tensor:
    """F(y; memory) of a pre-LN ``nn.TransformerDecoderLayer``.

    phi1 = SelfAttn(LN1 y), phi3 = CrossAttn(LN2(y + phi1), memory),
    phi2 = MLP(LN3(y + phi1 + phi3)); F = phi1 + phi3 + phi2.
    """
    phi1 = _self_attention(layer, layer.norm1(y), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
    y1 = y + phi1
    phi3 = layer.multihead_attn(layer.norm2(y1), memory, memory, attn_mask=memory_mask,
                                key_padding_mask=memory_key_padding_mask,
                                is_causal=memory_is_causal, need_weights=False)[0]
    phi3 = layer.dropout2(phi3)
    return phi1 + phi3 + _feed_forward(layer, layer.norm3(y1 + phi3), layer.dropout3)


def encoder_decoder_rhs(layer: nn.Module, z: torch.Tensor, *, src_len: int, seq_dim: int,
                        src_mask=None, src_key_padding_mask=None, src_is_causal=False,
                        tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                        memory_key_padding_mask=None, tgt_is_causal=False,
                        memory_is_causal=False, memory_norm_weight=None,
                        memory_norm_bias=None, memory_norm_eps=None) -> torch.Tensor:
    """F on the joint state Z = [X, Y] (X: source, Y: target, concatenated along ``seq_dim``).

    Encoder layers: F = [F_enc(X), 0] (Y waits at its initial value). Decoder layers:
    F = [0, F_dec(Y; memory)] with memory = LayerNorm(X) when ``memory_norm_eps`` is given (the
    final encoder norm of ``nn.Transformer``), else X; X is frozen during the decoder layers.
    """
    x, y = z.split([src_len, z.shape[seq_dim] - src_len], dim=seq_dim)
    if isinstance(layer, nn.TransformerDecoderLayer):
        memory = x
        if memory_norm_eps is not None:
            memory = F.layer_norm(x, x.shape[-1:], memory_norm_weight, memory_norm_bias,
                                  memory_norm_eps)
        f = decoder_rhs(layer, y, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
                        memory_key_padding_mask, tgt_is_causal, memory_is_causal)
        return torch.cat([torch.zeros_like(x), f], dim=seq_dim)
    f = encoder_rhs(layer, x, src_mask, src_key_padding_mask, src_is_causal)
    return torch.cat([f, torch.zeros_like(y)], dim=seq_dim)


def _with_autocast(rhs: Rhs, dtype: torch.dtype) -> Rhs:
    """Evaluate ``rhs`` under ``torch.autocast(dtype)``; F is returned in the state's dtype, so
    the states (and MGRIT's residuals) stay in full precision."""

    def autocast_rhs(layer, x, **ctx):
        with torch.autocast(x.device.type, dtype=dtype):
            f = rhs(layer, x, **ctx)
        return f.to(x.dtype)

    return autocast_rhs


def wrap_rhs(rhs: Rhs, autocast: Optional[torch.dtype] = None, compile: bool = False) -> Rhs:
    """The opt-in switches: mixed precision (``autocast=torch.bfloat16``) and ``torch.compile``.

    The compiled function takes the layer module as an argument; layers of one stack share their
    structure, so one compiled graph serves all of them.
    """
    if autocast is not None:
        if not isinstance(autocast, torch.dtype) or not autocast.is_floating_point:
            raise ValueError(f"autocast must be a floating-point torch.dtype such as "
                             f"torch.bfloat16, got {autocast!r}")
        rhs = _with_autocast(rhs, autocast)
    if compile:
        rhs = torch.compile(rhs)
    return rhs

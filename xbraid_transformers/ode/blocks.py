"""Transformer layers written as ODE right-hand sides F(x; theta).

A pre-LN layer computes x + phi1(x) + phi2(x + phi1(x)); the ODE step of size h is
x + h * F(x) with F(x) = phi1(x) + phi2(x + phi1(x)), so h = 1 reproduces the torch layer.
The right-hand sides below read the parameters of the torch layer modules themselves, so a
layer's state dict is exactly that of ``torch.nn.TransformerEncoderLayer``.
"""
from __future__ import annotations

import torch
from torch import nn


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


def _feed_forward(layer, x):
    return layer.dropout2(layer.linear2(layer.dropout(layer.activation(layer.linear1(x)))))


def encoder_rhs(layer: nn.TransformerEncoderLayer, x: torch.Tensor, mask=None,
                src_key_padding_mask=None, is_causal: bool = False) -> torch.Tensor:
    """F(x) of a pre-LN ``nn.TransformerEncoderLayer``: phi1(x) + phi2(x + phi1(x))."""
    phi1 = _self_attention(layer, layer.norm1(x), mask, src_key_padding_mask, is_causal)
    return phi1 + _feed_forward(layer, layer.norm2(x + phi1))

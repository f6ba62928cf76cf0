"""Drop-in replacements for ``torch.nn`` transformer stacks, solved layer-parallel.

- ``LayerParallelTransformerEncoder``: ``torch.nn.TransformerEncoder``'s signature.
- ``LayerParallelTransformerDecoder``: ``torch.nn.TransformerDecoder``'s signature.
- ``LayerParallelTransformer``: encoder and decoder as *one* ODE (``torch.nn.Transformer``'s
  forward signature), so one MGRIT solve covers both stacks.

Each is built from a pre-LN torch layer instance cloned ``num_layers`` times; ``.layers`` are
those torch layers (checkpoints load layer by layer, or use ``from_torch``). Layer i computes
x + h F_i(x): ``step_size=1.0`` in serial mode is exactly the torch class, the default
``1 / (number of ODE layers)`` is the neural-ODE form that MGRIT needs. Optional buffer layers
(``buffer_layers=(k_front, k_back)``) run serially with step 1 before and after the ODE part.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import nn

from .core.blocks import Rhs, check_pre_ln, decoder_rhs, encoder_decoder_rhs, encoder_rhs, wrap_rhs
from .core.layer_parallel import LayerParallel
from .mgrit.config import MGRITConfig

__all__ = ["ODEStack", "LayerParallelTransformerEncoder", "LayerParallelTransformerDecoder",
           "LayerParallelTransformer"]


def _clones(layer: nn.Module, num_layers: int, what: str) -> list:
    check_pre_ln(layer)
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise ValueError(f"{what} must be a positive integer, got {num_layers!r}")
    return [copy.deepcopy(layer) for _ in range(num_layers)]


def _buffers(buffer_layers, num_layers: int) -> Tuple[int, int]:
    try:
        front, back = (int(k) for k in buffer_layers)
    except (TypeError, ValueError):
        raise ValueError(f"buffer_layers must be a pair (k_front, k_back), got {buffer_layers!r}")
    if front < 0 or back < 0 or front + back >= num_layers:
        raise ValueError(f"buffer_layers={tuple(buffer_layers)} must be >= 0 and leave at least "
                         f"one ODE layer of the {num_layers}")
    return front, back


def _check_boundary(num_encoder_layers: int, config: MGRITConfig) -> None:
    """The encoder/decoder boundary of a one-ODE transformer must be a C-point of every level."""
    spacing = config.coarsest_spacing
    if num_encoder_layers % spacing:
        raise ValueError(
            f"the encoder/decoder boundary (after layer {num_encoder_layers}) must be a C-point of "
            f"every MGRIT level: num_encoder_layers must be a multiple of the product of the "
            f"cfactors {config.cfactors} = {spacing}; choose cfactors whose product divides "
            f"{num_encoder_layers}")


def _seq_len(x: torch.Tensor, batch_first: bool) -> int:
    return x.shape[-2] if (batch_first and x.dim() == 3) else x.shape[0]


def _check_input(name: str, x: torch.Tensor, d_model: int) -> None:
    if not torch.is_tensor(x) or x.dim() not in (2, 3) or x.shape[-1] != d_model:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} must be (seq, batch, {d_model}) or (batch, seq, {d_model}) for "
                         f"batch_first, or unbatched (seq, {d_model}); got {shape}")


def _causal(mask, is_causal, size, like):
    """torch needs an explicit mask with ``is_causal=True``; build it when it is missing."""
    if is_causal and mask is None:  # True: may not attend (bool, like the usual padding masks)
        mask = torch.ones(size, size, dtype=torch.bool, device=like.device).triu(1)
    return mask, bool(is_causal)


class ODEStack(nn.Module):
    """Front buffer layers (serial, step 1) -> ODE layers (MGRIT, step h) -> back buffers.

    The base of the drop-ins. Subclasses define ``state_and_context(*inputs)``: the ODE state
    and the keyword arguments every layer evaluation receives; ``ode_rhs(layer, x, **ctx)``
    is F itself and ``steps()`` lists (layer, step size) in order (what diagnostics walk)."""

    def __init__(self, layers: Sequence[nn.Module], rhs: Rhs, *, step_size: Optional[float],
                 mgrit: Optional[MGRITConfig], dropout_seed: Optional[int],
                 buffer_layers=(0, 0), autocast: Optional[torch.dtype] = None,
                 compile: bool = False, comm=None):
        super().__init__()
        front, back = _buffers(buffer_layers, len(layers))
        self.ode_rhs = rhs  # F itself; ``rhs`` adds the autocast / compile switches
        self.rhs = wrap_rhs(rhs, autocast, compile)
        self.front = nn.ModuleList(layers[:front])
        self.stack = LayerParallel(layers[front:len(layers) - back], rhs=self.rhs,
                                   step_size=step_size, mgrit=mgrit, dropout_seed=dropout_seed,
                                   comm=comm)
        self.back = nn.ModuleList(layers[len(layers) - back:])
        self.buffer_layers = (front, back)

    @property
    def layers(self) -> nn.ModuleList:
        """All layers in order (buffers and ODE layers): the torch layer modules."""
        return nn.ModuleList([*self.front, *self.stack.layers, *self.back])

    @property
    def num_layers(self) -> int:
        return len(self.front) + len(self.stack.layers) + len(self.back)

    @property
    def step_size(self) -> float:
        return self.stack.step_size

    @property
    def mgrit(self) -> MGRITConfig:
        return self.stack.mgrit

    @property
    def stats(self):
        return self.stack.stats

    # The inner stack's switches, readable and settable on the drop-in itself: an attribute set
    # here must reach the stack, or ``enc.retain_graph = True`` would silently do nothing.
    @property
    def retain_graph(self) -> bool:
        """Keep the per-layer graphs after a backward (see ``LayerParallel``)."""
        return self.stack.retain_graph

    @retain_graph.setter
    def retain_graph(self, value: bool) -> None:
        self.stack.retain_graph = bool(value)

    @property
    def check_inputs(self) -> bool:
        """Check that every rank passes the same input values (see ``LayerParallel``)."""
        return self.stack.check_inputs

    @check_inputs.setter
    def check_inputs(self, value: bool) -> None:
        self.stack.check_inputs = bool(value)

    def serial(self):
        self.stack.serial()
        return self

    def layer_parallel(self):
        self.stack.layer_parallel()
        return self

    def configure(self, **changes) -> None:
        """Change MGRIT options, e.g. ``configure(fwd_iters=4)``."""
        self.stack.configure(**changes)

    def reset_warm_start(self) -> None:
        self.stack.reset_warm_start()

    def _output(self, x: torch.Tensor, **ctx) -> torch.Tensor:
        return self.norm(x) if self.norm is not None else x

    def steps(self):
        """(layer, step size) of every layer in order: buffers step 1, ODE layers step h."""
        h = self.stack.step_size
        return ([(layer, 1.0) for layer in self.front] + [(layer, h) for layer in self.stack.layers]
                + [(layer, 1.0) for layer in self.back])

    def propagate(self, x: torch.Tensor, ctx: Optional[dict] = None, **kwargs) -> torch.Tensor:
        """The state through the front buffers, the ODE layers and the back buffers; ``ctx``
        (and ``kwargs``) reach every layer evaluation."""
        ctx = dict(ctx or {}, **kwargs)
        for layer in self.front:
            x = x + self.rhs(layer, x, **ctx)
        x = self.stack(x, **ctx)
        for layer in self.back:
            x = x + self.rhs(layer, x, **ctx)
        return x


class _TorchLayerStack(ODEStack):
    """``num_layers`` clones of one pre-LN torch layer and an optional final norm: what the
    encoder and decoder drop-ins share. ``layer_rhs`` is F of one layer.

    norm: optional final norm. mgrit: solver options. step_size: h of the ODE layers (default
    1 / number of ODE layers). buffer_layers: (k_front, k_back) serial layers with step 1.
    dropout_seed: seed of the synchronised dropout masks. autocast: e.g. ``torch.bfloat16`` to
    evaluate the layers in mixed precision. compile: ``torch.compile`` the layer function.
    comm: the layer-parallel process group (see ``LayerParallel``; None: this process alone).
    """

    layer_rhs: Callable

    def __init__(self, layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None, *,
                 mgrit: Optional[MGRITConfig] = None, step_size: Optional[float] = None,
                 dropout_seed: Optional[int] = None, buffer_layers=(0, 0),
                 autocast: Optional[torch.dtype] = None, compile: bool = False, comm=None):
        super().__init__(_clones(layer, num_layers, "num_layers"), type(self).layer_rhs,
                         step_size=step_size, mgrit=mgrit, dropout_seed=dropout_seed,
                         buffer_layers=buffer_layers, autocast=autocast, compile=compile,
                         comm=comm)
        self.batch_first = layer.self_attn.batch_first
        self.d_model = layer.self_attn.embed_dim
        self.norm = norm

    @classmethod
    def from_torch(cls, torch_stack: nn.Module, **options):
        """The same network with the weights of a torch ``TransformerEncoder`` (encoder) or
        ``TransformerDecoder`` (decoder)."""
        norm = copy.deepcopy(torch_stack.norm) if torch_stack.norm is not None else None
        ours = cls(torch_stack.layers[0], len(torch_stack.layers), norm, **options)
        for mine, theirs in zip(ours.layers, torch_stack.layers):
            mine.load_state_dict(theirs.state_dict())
        return ours


class LayerParallelTransformerEncoder(_TorchLayerStack):
    """Layer-parallel counterpart of ``torch.nn.TransformerEncoder``, built from a pre-LN
    ``nn.TransformerEncoderLayer`` (cloned ``num_layers`` times); the options are those of
    ``_TorchLayerStack`` (norm, mgrit, step_size, buffer_layers, dropout_seed, autocast,
    compile, comm)."""

    layer_rhs = staticmethod(encoder_rhs)

    def __init__(self, encoder_layer: nn.TransformerEncoderLayer, num_layers: int,
                 norm: Optional[nn.Module] = None, **options):
        super().__init__(encoder_layer, num_layers, norm, **options)

    def forward(self, src: torch.Tensor, mask: Optional[torch.Tensor] = None,
                src_key_padding_mask: Optional[torch.Tensor] = None,
                is_causal: Optional[bool] = None) -> torch.Tensor:
        return self._output(self.propagate(*self.state_and_context(src, mask, src_key_padding_mask,
                                                          is_causal)))

    def state_and_context(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        _check_input("src", src, self.d_model)
        mask, is_causal = _causal(mask, is_causal, _seq_len(src, self.batch_first), src)
        return src, dict(mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)


class LayerParallelTransformerDecoder(_TorchLayerStack):
    """Layer-parallel counterpart of ``torch.nn.TransformerDecoder``.

    Same options as ``LayerParallelTransformerEncoder``, built from a pre-LN
    ``nn.TransformerDecoderLayer``. ``memory`` and the masks reach every layer evaluation on
    every level and in the adjoint; ``memory`` receives its gradient.
    """

    layer_rhs = staticmethod(decoder_rhs)

    def __init__(self, decoder_layer: nn.TransformerDecoderLayer, num_layers: int,
                 norm: Optional[nn.Module] = None, **options):
        super().__init__(decoder_layer, num_layers, norm, **options)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor,
                tgt_mask: Optional[torch.Tensor] = None,
                memory_mask: Optional[torch.Tensor] = None,
                tgt_key_padding_mask: Optional[torch.Tensor] = None,
                memory_key_padding_mask: Optional[torch.Tensor] = None,
                tgt_is_causal: Optional[bool] = None,
                memory_is_causal: bool = False) -> torch.Tensor:
        return self._output(self.propagate(*self.state_and_context(
            tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
            tgt_is_causal, memory_is_causal)))

    def state_and_context(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False):
        _check_input("tgt", tgt, self.d_model)
        _check_input("memory", memory, self.d_model)
        if tgt.dim() != memory.dim():
            raise ValueError(f"tgt {tuple(tgt.shape)} and memory {tuple(memory.shape)} must both "
                             "be batched or both unbatched")
        tgt_mask, tgt_is_causal = _causal(tgt_mask, tgt_is_causal,
                                          _seq_len(tgt, self.batch_first), tgt)
        return tgt, dict(memory=memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                         tgt_key_padding_mask=tgt_key_padding_mask,
                         memory_key_padding_mask=memory_key_padding_mask,
                         tgt_is_causal=tgt_is_causal, memory_is_causal=bool(memory_is_causal))


class LayerParallelTransformer(ODEStack):
    """Encoder and decoder as one ODE on Z = [X, Y] (source and target along the sequence).

    Encoder layers advance X (F = [F_enc(X), 0]), decoder layers advance Y with cross-attention
    to LayerNorm(X) (F = [0, F_dec(Y; X)]), so one MGRIT solve covers all
    ``num_encoder_layers + num_decoder_layers`` layers. The encoder/decoder boundary must be a
    C-point of every level: ``num_encoder_layers`` a multiple of the product of the cfactors
    (6 + 6 layers: cfactor 2 or 3; 40 + 40: 2, 4, 8...). ``encoder_norm`` (a LayerNorm, or None)
    is applied to X wherever the decoder reads it, as ``torch.nn.Transformer`` does; in serial
    mode with ``step_size=1.0`` this is exactly ``nn.Transformer(norm_first=True)``.
    """

    def __init__(self, encoder_layer: nn.TransformerEncoderLayer,
                 decoder_layer: nn.TransformerDecoderLayer, num_encoder_layers: int,
                 num_decoder_layers: int, encoder_norm: Optional[nn.LayerNorm] = None,
                 decoder_norm: Optional[nn.Module] = None, *,
                 mgrit: Optional[MGRITConfig] = None, step_size: Optional[float] = None,
                 dropout_seed: Optional[int] = None, autocast: Optional[torch.dtype] = None,
                 compile: bool = False, comm=None):
        layers = (_clones(encoder_layer, num_encoder_layers, "num_encoder_layers")
                  + _clones(decoder_layer, num_decoder_layers, "num_decoder_layers"))
        if encoder_layer.self_attn.batch_first != decoder_layer.self_attn.batch_first or \
                encoder_layer.self_attn.embed_dim != decoder_layer.self_attn.embed_dim:
            raise ValueError("encoder_layer and decoder_layer must agree on d_model and "
                             "batch_first")
        if encoder_norm is not None and not isinstance(encoder_norm, nn.LayerNorm):
            raise ValueError(f"encoder_norm must be an nn.LayerNorm or None (it is evaluated inside "
                             f"the decoder's right-hand side), got {type(encoder_norm).__name__}")
        _check_boundary(num_encoder_layers, mgrit if mgrit is not None else MGRITConfig())
        super().__init__(layers, encoder_decoder_rhs, step_size=step_size, mgrit=mgrit,
                         dropout_seed=dropout_seed, autocast=autocast, compile=compile, comm=comm)
        self.batch_first = encoder_layer.self_attn.batch_first
        self.d_model = encoder_layer.self_attn.embed_dim
        self.encoder_norm, self.decoder_norm = encoder_norm, decoder_norm
        self.num_encoder_layers = num_encoder_layers

    @classmethod
    def from_torch(cls, transformer: nn.Transformer, **options):
        """The same network with the weights of a torch ``nn.Transformer(norm_first=True)``."""
        enc, dec = transformer.encoder, transformer.decoder
        ours = cls(enc.layers[0], dec.layers[0], len(enc.layers), len(dec.layers),
                   copy.deepcopy(enc.norm), copy.deepcopy(dec.norm), **options)
        for mine, theirs in zip(ours.layers, [*enc.layers, *dec.layers]):
            mine.load_state_dict(theirs.state_dict())
        return ours

    def configure(self, **changes) -> None:
        _check_boundary(self.num_encoder_layers, dataclasses.replace(self.stack.mgrit, **changes))
        self.stack.configure(**changes)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor,
                src_mask: Optional[torch.Tensor] = None, tgt_mask: Optional[torch.Tensor] = None,
                memory_mask: Optional[torch.Tensor] = None,
                src_key_padding_mask: Optional[torch.Tensor] = None,
                tgt_key_padding_mask: Optional[torch.Tensor] = None,
                memory_key_padding_mask: Optional[torch.Tensor] = None,
                src_is_causal: Optional[bool] = None, tgt_is_causal: Optional[bool] = None,
                memory_is_causal: bool = False) -> torch.Tensor:
        z, ctx = self.state_and_context(src, tgt, src_mask, tgt_mask, memory_mask, src_key_padding_mask,
                              tgt_key_padding_mask, memory_key_padding_mask, src_is_causal,
                              tgt_is_causal, memory_is_causal)
        return self._output(self.propagate(z, **ctx), **ctx)

    def state_and_context(self, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None,
                src_key_padding_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, src_is_causal=None, tgt_is_causal=None,
                memory_is_causal=False):
        _check_input("src", src, self.d_model)
        _check_input("tgt", tgt, self.d_model)
        _check_boundary(self.num_encoder_layers, self.stack.mgrit)
        seq_dim = 1 if (self.batch_first and src.dim() == 3) else 0
        batch_dim = 1 - seq_dim
        if src.dim() != tgt.dim() or (src.dim() == 3 and src.shape[batch_dim] != tgt.shape[batch_dim]):
            raise ValueError(f"src {tuple(src.shape)} and tgt {tuple(tgt.shape)} must have the same "
                             "batch size")
        src_len = src.shape[seq_dim]
        src_mask, src_is_causal = _causal(src_mask, src_is_causal, src_len, src)
        tgt_mask, tgt_is_causal = _causal(tgt_mask, tgt_is_causal, tgt.shape[seq_dim], tgt)
        norm = self.encoder_norm
        return torch.cat([src, tgt], dim=seq_dim), dict(
            src_len=src_len, seq_dim=seq_dim, src_mask=src_mask,
            src_key_padding_mask=src_key_padding_mask, src_is_causal=src_is_causal,
            tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
            memory_is_causal=bool(memory_is_causal),
            memory_norm_weight=None if norm is None else norm.weight,
            memory_norm_bias=None if norm is None else norm.bias,
            memory_norm_eps=None if norm is None else norm.eps)

    def _output(self, z, src_len, seq_dim, **ctx):
        out = z.narrow(seq_dim, src_len, z.shape[seq_dim] - src_len)
        return self.decoder_norm(out) if self.decoder_norm is not None else out

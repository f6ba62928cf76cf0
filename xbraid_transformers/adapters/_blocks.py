"""The stand-in for a model's block list: one layer-parallel ODE stack.

``LayerParallelBlockList`` takes the place of the ``nn.ModuleList`` / ``nn.Sequential`` of blocks
inside a user's model. The model's own forward keeps working because the stand-in is a
one-element sequence holding the whole stack: ``for block in self.h``, ``self.layers[:n]`` and
``self.blocks(x)`` all run every block once, as one ODE solve. The arguments the model passes
to a block (masks, position ids, rotary embeddings, ...) are bound to the block's signature and
reach every evaluation of every block.

The right-hand side is ``F(x) = block(x, ...) - x``: every supported block computes
``x + F(x)`` with no norm after the residual sum, so ``x + h F(x)`` is exactly the block for
``h = 1`` (up to one rounding) and a forward-Euler step of size h otherwise. Subtracting the
input keeps the adapter independent of the blocks' internals, which change between library
versions.

State-dict keys are those of the original block list (``transformer.h.3.attn...``), not the
module path (``transformer.h.stack.layers.3.attn...``), so checkpoints load in both directions.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from ..core.ownership import RemoteLayer
from ..mgrit.config import MGRITConfig
from ..nn import ODEStack

# Arguments through which a block reads or extends a key/value cache.
CACHE_ARGUMENTS = ("cache", "past_key_value", "past_key_values", "layer_past")
# A tuple of tensors argument (Llama's rotary (cos, sin)) travels as one entry per tensor, so
# that LayerParallel sees the tensors (their gradients, their shapes across ranks).
TUPLE_MARK = "#"


@functools.lru_cache(maxsize=None)
def block_signature(block_class: type) -> inspect.Signature:
    """The signature of ``block_class.forward`` without ``self`` (decorators unwrapped)."""
    signature = inspect.signature(block_class.forward)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


def bind_call(signature: inspect.Signature, state, args, kwargs) -> dict:
    """The keyword arguments of a block call ``block(state, *args, **kwargs)``."""
    bound = signature.bind(state, *args, **kwargs)
    context = {}
    for i, (name, value) in enumerate(bound.arguments.items()):
        kind = signature.parameters[name].kind
        if i == 0:
            continue
        if kind is inspect.Parameter.VAR_KEYWORD:
            context.update(value)
        elif kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY):
            if kind is inspect.Parameter.POSITIONAL_ONLY or value:
                raise TypeError(f"the block takes {name!r} positionally only; a layer-parallel "
                                "stack passes the block's arguments by keyword")
        else:
            context[name] = value
    return context


def pack_tuples(context: dict) -> dict:
    packed = {}
    for name, value in context.items():
        if isinstance(value, tuple) and value and all(torch.is_tensor(v) for v in value):
            packed.update({f"{name}{TUPLE_MARK}{i}": v for i, v in enumerate(value)})
        else:
            packed[name] = value
    return packed


def unpack_tuples(context: dict) -> dict:
    kwargs: Dict[str, object] = {}
    parts: Dict[str, Dict[int, torch.Tensor]] = {}
    for key, value in context.items():
        name, mark, index = key.rpartition(TUPLE_MARK)
        if mark and index.isdigit():
            parts.setdefault(name, {})[int(index)] = value
        else:
            kwargs[key] = value
    for name, items in parts.items():
        kwargs[name] = tuple(items[i] for i in range(len(items)))
    return kwargs


def rename_after_state_dict(module, state_dict, prefix, local_metadata) -> None:
    module.rename_state_keys(state_dict, prefix)


def rename_before_load(module, state_dict, prefix, *args) -> None:
    module.internal_state_keys(state_dict, prefix)


class LayerParallelBlockList(ODEStack):
    """A model's block list as one ODE stack: ``front`` buffer blocks (serial, step 1), the
    ``stack`` (a ``LayerParallel``, step h, MGRIT or serial) and ``back`` buffer blocks.

    blocks: the model's blocks, in order. container_type: the class of the list they came in
    (restored by ``plain_blocks``). family: the adapter's name (for messages). The remaining
    options are those of ``xbt.make_layer_parallel``.
    """

    def __init__(self, blocks: Sequence[nn.Module], *, container_type: type, family: str,
                 mgrit: Optional[MGRITConfig] = None, step_size: Optional[float] = None,
                 buffer_layers=(0, 0), dropout_seed: Optional[int] = None, comm=None):
        super().__init__(list(blocks), self.block_rhs, step_size=step_size, mgrit=mgrit,
                         dropout_seed=dropout_seed, buffer_layers=buffer_layers, comm=comm)
        self.block_class = type(blocks[0])
        self.container_type = container_type
        self.family = family
        self.tuple_output: Optional[bool] = None   # older transformers blocks return tuples
        self.saved_use_cache: Optional[bool] = None
        self.hooks_warned = False
        self.register_state_dict_post_hook(rename_after_state_dict)
        self.register_load_state_dict_pre_hook(rename_before_load)

    # ------------------------------------------------------------------ a sequence of one
    def __len__(self) -> int:
        return 1

    def __iter__(self):
        yield self

    def __getitem__(self, index):
        return [self][index]

    # ------------------------------------------------------------------ evaluation
    def block_rhs(self, block: nn.Module, x: torch.Tensor, **context) -> torch.Tensor:
        """F(x) = block(x) - x."""
        out = block(x, **unpack_tuples(context))
        self.tuple_output = isinstance(out, tuple)
        return (out[0] if self.tuple_output else out) - x

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        context = pack_tuples(bind_call(block_signature(self.block_class), hidden_states, args,
                                        kwargs))
        self.refuse_cache(context)
        self.warn_about_hooks()
        x = self.propagate(hidden_states, context)
        return (x,) if self.tuple_output else x

    def refuse_cache(self, context: dict) -> None:
        """Caches work only in serial mode on one process, where each block runs once."""
        if not self.stack.parallel and self.stack.comm.size == 1:
            return
        used = [name for name in CACHE_ARGUMENTS if context.get(name) is not None]
        used += ["use_cache=True"] if context.get("use_cache") else []
        if used:
            mode = "layer-parallel mode" if self.stack.parallel else "a distributed stack"
            raise ValueError(
                f"a key/value cache ({', '.join(used)}) cannot be used in {mode}: MGRIT "
                "evaluates every block several times per forward pass (and each process holds "
                "only its own blocks), so each evaluation would extend the cache. Call the model "
                "without use_cache / past_key_values (make_layer_parallel set config.use_cache "
                "to False), or switch to serial mode on one process to generate "
                "(xbt.adapters.set_parallel(model, False)).")

    def warn_about_hooks(self) -> None:
        """Forward hooks inside the blocks (transformers records ``output_hidden_states`` /
        ``output_attentions`` with them) see every evaluation of ``block(x)``: under MGRIT
        several per block, and never the step's output x + h F(x) unless h = 1. Said once."""
        if self.hooks_warned or (not self.stack.parallel and self.step_size == 1.0):
            return
        blocks = [b for b in self.layers if not isinstance(b, RemoteLayer)]
        if any(m._forward_hooks or m._forward_pre_hooks for b in blocks for m in b.modules()):
            self.hooks_warned = True
            warnings.warn(
                "forward hooks are attached inside the layer-parallel blocks (for example by "
                "output_hidden_states=True or output_attentions=True): they run at every block "
                "evaluation, several per block under MGRIT, and see block(x) = x + F(x), not "
                "the step x + h F(x), so what they record is not the per-layer states",
                stacklevel=2)

    # ------------------------------------------------------------------ state-dict keys
    def sections(self):
        """(module-path part, index of its first block) of the front, ODE and back parts."""
        front, ode = len(self.front), len(self.stack.layers)
        return (("front.", 0), ("stack.layers.", front), ("back.", front + ode))

    def rename_state_keys(self, state: dict, prefix: str = "") -> None:
        """Rename, in place and in order, the entries of this stack in ``state`` (keys under
        ``prefix``) from module paths (``stack.layers.j.``) to block indices (``front + j.``),
        the keys of the original block list. Also the hook ``xbt.gather_state_dict`` calls."""
        def original(key: str) -> str:
            if not key.startswith(prefix):
                return key
            rest = key[len(prefix):]
            for part, first in self.sections():
                index, dot, tail = rest[len(part):].partition(".")
                if rest.startswith(part) and dot and index.isdigit():
                    return f"{prefix}{first + int(index)}.{tail}"
            return key

        items = [(original(k), v) for k, v in state.items()]
        state.clear()
        state.update(items)

    def internal_state_keys(self, state: dict, prefix: str = "") -> None:
        """The inverse of ``rename_state_keys`` (before loading); other keys are left as they
        are, so the module-path keys load too."""
        sections = self.sections()
        for key in [k for k in state if k.startswith(prefix)]:
            index, dot, tail = key[len(prefix):].partition(".")
            if not (dot and index.isdigit()) or int(index) >= self.num_layers:
                continue
            part, first = next((p, f) for p, f in reversed(sections) if int(index) >= f)
            state[f"{prefix}{part}{int(index) - first}.{tail}"] = state.pop(key)

    # ------------------------------------------------------------------ back to plain blocks
    def plain_blocks(self) -> nn.Module:
        """The blocks in a container of their original type (the same modules, trained)."""
        remote = [layer.index for layer in self.stack.layers if isinstance(layer, RemoteLayer)]
        if remote:
            raise ValueError(
                f"this rank holds only placeholders for the blocks {remote} of other ranks, so "
                "it cannot put plain blocks back. Gather the full state instead: "
                "state = xbt.gather_state_dict(model) on every rank, then on rank 0 load it "
                "into a plain model (its keys are the original model's)")
        blocks = list(self.layers)
        if issubclass(self.container_type, nn.Sequential):
            return self.container_type(*blocks)
        return self.container_type(blocks)

"""Which block stacks ``make_layer_parallel`` knows, and which it refuses.

A family names the classes of its blocks, where its models keep the block list (dotted paths,
tried in order: they moved between library versions; transformers models are found through
their ``_no_split_modules`` first, see ``_locate``) and a structural check that a block is the
pre-norm residual block the family is known to be. Every supported block computes
``x + F(x)`` with no normalisation after the residual sum, so it is a forward-Euler step of
step 1 and ``F(x) = block(x) - x`` (see ``_blocks``). Families are recognised by the class of
the blocks, not of the model, so ``GPT2Model``, ``GPT2LMHeadModel`` and user subclasses all
work.

Post-norm blocks (BERT and its relatives, ``nn.TransformerEncoderLayer(norm_first=False)``,
OPT with ``do_layer_norm_before=False``) compute ``LayerNorm(x + F(x))``: not ``x + h F(x)``
for any F, so they are refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from torch import nn

from ..core.blocks import check_pre_ln


@dataclass(frozen=True)
class Family:
    """A supported model family.

    name: short name used in messages. package: module prefix of its block classes.
    block_classes: the class names of its blocks. block_paths: dotted paths of the block list
    inside its models, tried in order. parts: submodules every block must have (the norms
    before attention and MLP, which make it pre-norm).
    """

    name: str
    package: str
    block_classes: Tuple[str, ...]
    block_paths: Tuple[str, ...]
    parts: Tuple[str, ...]

    def owns(self, block: nn.Module) -> bool:
        cls = type(block)
        return cls.__name__ in self.block_classes and cls.__module__.startswith(self.package)

    def check(self, block: nn.Module, path: str) -> None:
        missing = [p for p in self.parts if not isinstance(getattr(block, p, None), nn.Module)]
        if missing:
            raise ValueError(
                f"{type(block).__name__} at {path!r} lacks {', '.join(missing)}: it is not the "
                f"pre-norm {self.name} block this adapter knows (x + F(x) with the norms "
                f"{', '.join(self.parts)} inside F); this library version may have changed it")


# Class names of post-norm blocks of transformers (BERT, RoBERTa, ELECTRA, ALBERT, DistilBERT,
# BART, Marian); HF blocks with an ``output.LayerNorm`` are caught by structure as well.
POST_NORM_BLOCKS = ("BertLayer", "RobertaLayer", "XLMRobertaLayer", "ElectraLayer",
                    "CamembertLayer", "AlbertLayer", "TransformerBlock", "BartEncoderLayer",
                    "BartDecoderLayer", "MarianEncoderLayer", "MarianDecoderLayer")


# Blocks whose norm placement is an option of the model, as (attribute, post-norm value):
# OPT's ``do_layer_norm_before`` (False in OPT-350m: LayerNorm after each residual sum) and
# BLOOM's ``apply_residual_connection_post_layernorm`` (the residual is the normalised input).
POST_NORM_FLAGS = (("do_layer_norm_before", False), ("apply_residual_connection_post_layernorm", True))


def post_norm_reason(block: nn.Module) -> Optional[str]:
    """Why ``block`` cannot be an ODE step (None when it is not a known post-norm block)."""
    cls = type(block)
    name = cls.__name__
    for flag, post_norm in POST_NORM_FLAGS:
        if getattr(block, flag, None) is post_norm:
            return (f"{name} has {flag}={post_norm}: its LayerNorm acts on the residual "
                    "stream itself, not inside the residual branch (OPT: LayerNorm(x + F(x))), so "
                    "a layer is not a forward-Euler step x + h F(x) and the stack is not an ODE "
                    "that MGRIT can solve in depth. Layer-parallel training needs pre-norm "
                    f"residual blocks: build the model with {flag}={not post_norm}")
    if isinstance(block, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        try:
            check_pre_ln(block)
        except ValueError as error:
            return str(error)
        return None
    hf_post_norm = cls.__module__.startswith("transformers.") and (
        name in POST_NORM_BLOCKS
        or isinstance(getattr(getattr(block, "output", None), "LayerNorm", None), nn.Module))
    if not hf_post_norm:
        return None
    return (f"{name} is a post-norm block: it computes LayerNorm(x + F(x)), so a layer is not a "
            "forward-Euler step x + h F(x) and the stack is not an ODE that MGRIT can solve in "
            "depth. Layer-parallel training needs pre-norm residual blocks (GPT-2, Llama-style "
            "decoders, ViT); train a pre-norm variant of the model instead")


def family_of(block: nn.Module, families: Sequence[Family]) -> Optional[Family]:
    return next((f for f in families if f.owns(block)), None)


"""Finding the block list of a user's model, and refusing the stacks that are not one ODE.

Hugging Face models name the classes of their blocks in ``_no_split_modules`` (the units a
device map must keep whole); the block list is the one ``nn.ModuleList`` (or ``nn.Sequential``)
made of those blocks. That finds the blocks of any transformers model without knowing its
family. Models without the attribute (timm, older transformers, a user's own) fall back to the
known families' paths, and ``blocks="dotted.path"`` names the list outright.

A found list is refused, with the reason, when it cannot be one ODE stack x_{n+1} = x_n + h F_n:
post-norm blocks, an encoder-decoder's two stacks, layers that the model calls with arguments
of their own (per-layer attention masks), and LayerDrop (which would drop the whole stack).
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Set, Tuple

from torch import nn

from ._decoders import DECODERS
from ._gpt2 import GPT2
from ._hf_vit import HF_VIT
from ._llama import LLAMA
from ._registry import Family, family_of, post_norm_reason
from ._timm_vit import TIMM_VIT

# The block families with a structural check of their blocks (and tests against the untouched
# model); HF blocks of other families are found through _no_split_modules and run unchecked.
FAMILIES: Tuple[Family, ...] = (GPT2, LLAMA, HF_VIT, TIMM_VIT) + DECODERS


def hf_config(model: nn.Module):
    """The model's transformers config (saved with it), or None."""
    config = getattr(model, "config", None)
    return config if hasattr(config, "to_json_string") else None


def is_block_list(module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0


def submodule(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def no_split_classes(model: nn.Module) -> Set[str]:
    """The block class names the model and its submodels declare in ``_no_split_modules``."""
    names: Set[str] = set()
    for module in model.modules():
        declared = getattr(module, "_no_split_modules", None)
        if isinstance(declared, (list, tuple, set)):
            names.update(n for n in declared if isinstance(n, str))
    return names


def declared_block_lists(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(path, list) of every module list made only of ``_no_split_modules`` blocks; lists
    nested inside a block of an earlier one are the block's business, not a stack."""
    classes = no_split_classes(model)
    found: List[Tuple[str, nn.Module]] = []
    if not classes:
        return found
    for name, module in model.named_modules():
        if any(name.startswith(path + ".") for path, _ in found):
            continue
        if is_block_list(module) and all(type(b).__name__ in classes for b in module):
            found.append((name, module))
    return found


def locate_blocks(model: nn.Module, path: Optional[str]):
    """(path, block list, family or None) of the stack to wrap; refuses what is not one ODE
    stack of pre-norm residual blocks."""
    if path is None:
        path, container = find_block_list(model)
    else:
        container = submodule(model, path)
        if not is_block_list(container):
            raise ValueError(f"blocks={path!r} must name a non-empty nn.ModuleList or "
                             f"nn.Sequential of blocks inside {type(model).__name__}, found "
                             f"{type(container).__name__ if container is not None else 'nothing'}")
        refuse_post_norm(model, [(path, container)])
    refuse_per_layer_calls(model, path)
    family = family_of(container[0], FAMILIES)
    if family is None:
        warnings.warn(
            f"{type(container[0]).__name__} (at {path!r}) is not a block family "
            "xbraid_transformers has checked; it is run as a residual block x + F(x) with "
            "F(x) = block(x) - x. That is the model only if the block has no normalisation "
            "after its residual sum (pre-norm) and returns the hidden states alone (or first); "
            "compare its outputs with the untouched model at step_size=1 in serial mode",
            stacklevel=3)
    return checked(path, container, family)


def find_block_list(model: nn.Module) -> Tuple[str, nn.Module]:
    """The model's one block list: declared through ``_no_split_modules``, else at a known
    family's path. Raises with the reason when there is none or more than one."""
    declared = declared_block_lists(model)
    refuse_post_norm(model, declared)
    if len(declared) > 1:
        raise ValueError(several_stacks_message(model, declared))
    if declared:
        return declared[0]
    for family in FAMILIES:
        for candidate in family.block_paths:
            container = submodule(model, candidate)
            if is_block_list(container) and family.owns(container[0]):
                return candidate, container
    refuse_post_norm(model, [(name, m) for name, m in model.named_modules() if is_block_list(m)])
    known = "; ".join(f"{f.name}: {'/'.join(f.block_classes)} at {f.block_paths[0]!r}"
                      for f in FAMILIES)
    raise ValueError(
        f"found no block list in {type(model).__name__}: no nn.ModuleList of the blocks its "
        f"_no_split_modules names, and none of a known family ({known}). For another stack of "
        "pre-norm residual blocks pass its dotted path as blocks=")


def several_stacks_message(model: nn.Module, declared: Sequence[Tuple[str, nn.Module]]) -> str:
    lists = ", ".join(f"{name!r} ({len(c)} x {type(c[0]).__name__})" for name, c in declared)
    found = f"{type(model).__name__} keeps its blocks in {len(declared)} separate lists ({lists})"
    if getattr(hf_config(model), "is_encoder_decoder", False):
        return (f"{found}: it is an encoder-decoder, whose blocks do not form one stack. The "
                "decoder's blocks read the encoder's output, which the whole encoder computes "
                "first, so the layers are not one ODE in depth x_(n+1) = x_n + h F_n(x_n) that "
                "MGRIT can solve. make_layer_parallel wraps decoder-only and encoder-only models; "
                "for layer-parallel encoder-decoder training use xbt.LayerParallelTransformer")
    return (f"{found}, which do not form one stack (one ODE in depth). Pass the one to make "
            "layer-parallel as blocks='dotted.path'")


def refuse_per_layer_calls(model: nn.Module, path: str) -> None:
    """The stack passes every block the arguments of one call. Refuse models that call their
    layers differently (masks chosen per layer type) or skip them (LayerDrop)."""
    config = hf_config(model)
    if config is None:
        return
    types = list(getattr(config, "layer_types", None) or [])
    if len(set(types)) > 1:
        counts = ", ".join(f"{types.count(t)} x {t!r}" for t in dict.fromkeys(types))
        raise ValueError(
            f"{type(model).__name__} calls its layers at {path!r} with different arguments "
            f"(config.layer_types: {counts}; each type gets its own attention mask), but a "
            "layer-parallel stack passes one call's arguments to every block. Use a config with "
            "one layer type (for example no sliding-window layers)")
    layerdrop = getattr(config, "layerdrop", 0.0) or getattr(config, "decoder_layerdrop", 0.0)
    if isinstance(layerdrop, (int, float)) and layerdrop > 0:
        raise ValueError(
            f"{type(model).__name__} has LayerDrop ({layerdrop:g}): in training it skips layers "
            f"at random, and to the model the stack at {path!r} is one layer, so it would drop "
            "every block at once. Set config.layerdrop = 0")


def checked(path: str, container: nn.Module, family: Optional[Family]):
    for i, block in enumerate(container):
        if family is not None:
            family.check(block, f"{path}.{i}")
        if type(block) is not type(container[0]):
            raise ValueError(f"{path} mixes {type(container[0]).__name__} and "
                             f"{type(block).__name__} (block {i}); every ODE step must be one "
                             "kind of block")
    return path, container, family


def refuse_post_norm(model: nn.Module, lists: Sequence[Tuple[str, nn.Module]]) -> None:
    """Raise with the reason when the blocks of one of ``lists`` ((path, list) pairs) are
    post-norm."""
    for name, container in lists:
        reason = post_norm_reason(container[0])
        if reason:
            raise ValueError(f"{type(model).__name__} cannot be made layer-parallel: the "
                             f"blocks at {name!r}: {reason}")

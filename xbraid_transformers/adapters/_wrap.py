"""``make_layer_parallel`` / ``restore_blocks``: swap a model's block list for a layer-parallel
stack in place, and back."""
from __future__ import annotations

import warnings
from typing import List, Optional, Tuple

from torch import nn

from ..core.layer_parallel import find_stacks
from ..mgrit.config import MGRITConfig
from ._blocks import LayerParallelBlocks
from ._gpt2 import GPT2
from ._hf_vit import HF_VIT
from ._llama import LLAMA
from ._registry import Family, family_of, post_norm_reason
from ._timm_vit import TIMM_VIT

FAMILIES: Tuple[Family, ...] = (GPT2, LLAMA, HF_VIT, TIMM_VIT)
# The HF config entry that records how the blocks were run (saved with save_pretrained), so
# that a checkpoint re-wrapped by make_layer_parallel is the network that was trained.
CONFIG_KEY = "layer_parallel"


def make_layer_parallel(model: nn.Module, blocks: Optional[str] = None, *,
                        mgrit: Optional[MGRITConfig] = None, step_size: Optional[float] = None,
                        buffer_layers: Optional[Tuple[int, int]] = None,
                        dropout_seed: Optional[int] = None, comm=None) -> nn.Module:
    """Replace the block list inside ``model`` by a layer-parallel ODE stack, in place.

    blocks: dotted path of the block list (``"transformer.h"``, ``"model.layers"``,
    ``"vit.layers"``, ``"blocks"``); None finds it for the supported families (HF GPT-2,
    Llama, ViT; timm VisionTransformer). A path to blocks of another family is accepted as a
    residual stack x + F(x) with a warning; post-norm blocks (BERT, ...) are refused.
    mgrit: the solver options (default ``MGRITConfig()``: 2 levels, cfactor 4, so the number of
    ODE blocks must be a multiple of 4). step_size: h of the ODE blocks. ``1.0`` in serial mode
    is exactly the original model; the default ``1 / (number of ODE blocks)`` is the neural-ODE
    step of the paper: a different network, to train from scratch. buffer_layers:
    ``(front, back)`` blocks run serially with step 1 before and after the ODE part.
    dropout_seed: seed of the dropout masks (equal on every rank). comm: the layer-parallel
    group (every rank builds the same model and calls it with the same input).

    For HF models the step and buffers given here, or recorded in ``config.layer_parallel`` by
    an earlier wrap (saved by ``save_pretrained``), are used when the arguments are None, and
    ``config.use_cache`` is switched off (``restore_blocks`` puts it back). Returns ``model``.
    """
    if wrapped_blocks(model):
        raise ValueError(f"{type(model).__name__} is layer-parallel already; call "
                         "xbt.restore_blocks(model) before wrapping it again")
    path, container, family = locate_blocks(model, blocks)
    config = hf_config(model)
    recorded = getattr(config, CONFIG_KEY, None) or {}
    if step_size is None:
        step_size = recorded.get("step_size")
    if buffer_layers is None:
        buffer_layers = tuple(recorded.get("buffer_layers", (0, 0)))
    wrapper = LayerParallelBlocks(list(container), container_type=type(container),
                                  family=family.name if family else "generic", mgrit=mgrit,
                                  step_size=step_size, buffer_layers=buffer_layers,
                                  dropout_seed=dropout_seed, comm=comm)
    model.set_submodule(path, wrapper)
    if config is not None and hasattr(config, "use_cache"):
        wrapper.saved_use_cache = config.use_cache
        config.use_cache = False
    if config is not None:
        setattr(config, CONFIG_KEY, {"step_size": wrapper.step_size,
                                     "buffer_layers": list(wrapper.buffer_layers)})
    return model


def restore_blocks(model: nn.Module) -> nn.Module:
    """Put plain blocks (the same, trained modules) back in place of every layer-parallel
    stack of ``model``, so ``save_pretrained`` and timm checkpoints see the original model.

    The plain blocks compute x + F(x): the trained network when it was trained with step 1.
    With another step h they compute a different network; HF configs keep h in
    ``config.layer_parallel`` so that ``make_layer_parallel(from_pretrained(...))`` runs the
    trained network again (for timm models pass ``step_size=h`` yourself). On a distributed
    model use ``xbt.gather_state_dict`` instead (this rank lacks the other ranks' blocks).
    Returns ``model``."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, LayerParallelBlocks)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no layer-parallel block list to restore")
    config = hf_config(model)
    for name, wrapper in found:
        model.set_submodule(name, wrapper.plain_blocks())
        if config is not None and wrapper.saved_use_cache is not None:
            config.use_cache = wrapper.saved_use_cache
    return model


def set_parallel(model: nn.Module, parallel: bool = True) -> nn.Module:
    """Switch every LayerParallel stack of ``model`` to MGRIT (True) or exact serial (False)."""
    for stack in find_stacks(model):
        stack.set_parallel(parallel)
    return model


def wrapped_blocks(model: nn.Module) -> List[LayerParallelBlocks]:
    """The layer-parallel block lists inside ``model``."""
    return [m for m in model.modules() if isinstance(m, LayerParallelBlocks)]


def hf_config(model: nn.Module):
    """The model's transformers config (saved with it), or None."""
    config = getattr(model, "config", None)
    return config if hasattr(config, "to_json_string") else None


# ---------------------------------------------------------------------- finding the blocks
def is_block_list(module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0


def submodule(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def locate_blocks(model: nn.Module, path: Optional[str]):
    """(path, block list, family or None) of the stack to wrap; refuses post-norm stacks."""
    if path is None:
        for family in FAMILIES:
            for candidate in family.block_paths:
                container = submodule(model, candidate)
                if is_block_list(container) and family.owns(container[0]):
                    return checked(candidate, container, family)
        refuse_post_norm(model)
        known = "; ".join(f"{f.name}: {'/'.join(f.block_classes)} at {f.block_paths[0]!r}"
                          for f in FAMILIES)
        raise ValueError(
            f"found no block list of a supported family in {type(model).__name__} ({known}). "
            "For another stack of pre-norm residual blocks pass its dotted path as blocks=")
    container = submodule(model, path)
    if not is_block_list(container):
        raise ValueError(f"blocks={path!r} must name a non-empty nn.ModuleList or nn.Sequential "
                         f"of blocks inside {type(model).__name__}, found "
                         f"{type(container).__name__ if container is not None else 'nothing'}")
    family = family_of(container[0], FAMILIES)
    if family is None:
        reason = post_norm_reason(container[0])
        if reason:
            raise ValueError(f"blocks={path!r}: {reason}")
        warnings.warn(
            f"{type(container[0]).__name__} (at {path!r}) is not a block family "
            "xbraid_transformers knows; it is run as a residual block x + F(x) with "
            "F(x) = block(x) - x. That holds only if it has no normalisation after its residual "
            "sum (pre-norm); a post-norm block is not an ODE step", stacklevel=3)
    return checked(path, container, family)


def checked(path: str, container: nn.Module, family: Optional[Family]):
    for i, block in enumerate(container):
        if family is not None:
            family.check(block, f"{path}.{i}")
        if type(block) is not type(container[0]):
            raise ValueError(f"{path} mixes {type(container[0]).__name__} and "
                             f"{type(block).__name__} (block {i}); every ODE step must be one "
                             "kind of block")
    return path, container, family


def refuse_post_norm(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if is_block_list(module):
            reason = post_norm_reason(module[0])
            if reason:
                raise ValueError(f"{type(model).__name__} cannot be made layer-parallel: the "
                                 f"blocks at {name!r}: {reason}")

"""``make_layer_parallel`` / ``restore_blocks``: swap a model's block list for a layer-parallel
stack in place, and back."""
from __future__ import annotations

from typing import List, Optional, Tuple

from torch import nn

from ..core.layer_parallel import find_stacks
from ..mgrit.config import MGRITConfig
from ._blocks import LayerParallelBlockList
from ._locate import hf_config, locate_blocks

# The HF config entry that records how the blocks were run (saved with save_pretrained), so
# that a checkpoint re-wrapped by make_layer_parallel is the network that was trained.
CONFIG_KEY = "layer_parallel"


def make_layer_parallel(model: nn.Module, blocks: Optional[str] = None, *,
                        mgrit: Optional[MGRITConfig] = None, step_size: Optional[float] = None,
                        buffer_layers: Optional[Tuple[int, int]] = None,
                        dropout_seed: Optional[int] = None, comm=None) -> nn.Module:
    """Replace the block list inside ``model`` by a layer-parallel ODE stack, in place.

    blocks: dotted path of the block list (``"transformer.h"``, ``"model.layers"``,
    ``"vit.layers"``, ``"blocks"``); None finds it: for transformers models the one module
    list of the blocks their ``_no_split_modules`` names, otherwise the known families' paths
    (timm VisionTransformer). Blocks of a family without a structural check (see
    ``FAMILIES``) are run as a residual stack x + F(x) with a warning. Refused, with the
    reason: post-norm blocks (BERT, OPT with ``do_layer_norm_before=False``, ...), an
    encoder-decoder's two stacks, per-layer attention masks (mixed ``config.layer_types``) and
    LayerDrop.
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
    wrapper = LayerParallelBlockList(list(container), container_type=type(container),
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
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, LayerParallelBlockList)]
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


def wrapped_blocks(model: nn.Module) -> List[LayerParallelBlockList]:
    """The layer-parallel block lists inside ``model``."""
    return [m for m in model.modules() if isinstance(m, LayerParallelBlockList)]

"""Make a user's own Hugging Face or timm model layer-parallel in one call.

    model = GPT2LMHeadModel(config)                       # or Llama, ViT, a timm ViT
    xbt.make_layer_parallel(model, mgrit=xbt.MGRITConfig(levels=2, cfactor=2))
    loss = model(input_ids, labels=input_ids).loss        # the model's own forward
    loss.backward()                                       # the adjoint is an MGRIT solve too
    xbt.restore_blocks(model).save_pretrained("out")      # plain blocks, original keys

The block list (``transformer.h``, ``model.layers``, ``vit.layers``, ``blocks``) becomes one
``LayerParallelBlockList`` module: x_{n+1} = x_n + h F_n(x_n) with F_n(x) = block_n(x) - x, solved
by MGRIT or serially (``set_parallel``). ``AdaptiveCallback`` runs ``xbt.AdaptiveController``
inside ``transformers.Trainer``. See docs/adapters.md. transformers and timm are optional:
nothing here imports them until ``AdaptiveCallback`` is used.
"""
from ._blocks import LayerParallelBlockList
from ._registry import Family, post_norm_reason
from ._locate import FAMILIES
from ._wrap import make_layer_parallel, restore_blocks, set_parallel, wrapped_blocks

__all__ = ["make_layer_parallel", "restore_blocks", "set_parallel", "wrapped_blocks",
           "LayerParallelBlockList", "Family", "FAMILIES", "post_norm_reason", "AdaptiveCallback"]


def __getattr__(name: str):
    """``AdaptiveCallback`` subclasses ``transformers.TrainerCallback``: imported on first use,
    so that the package works without transformers."""
    if name == "AdaptiveCallback":
        from ._trainer_callback import AdaptiveCallback
        return AdaptiveCallback
    if name == "LayerParallelBlocks":     # its former name
        import warnings
        warnings.warn("xbraid_transformers.adapters.LayerParallelBlocks is now LayerParallelBlockList",
                      DeprecationWarning, stacklevel=2)
        return LayerParallelBlockList
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

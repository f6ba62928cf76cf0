"""Layer-parallel training of deep transformers with MGRIT."""
from . import adapters, mgrit, multilevel, perf
from .adapters import make_layer_parallel, restore_blocks
from .control import AdaptiveController, ControlConfig
from .core.layer_parallel import LayerParallel, SolveStats, find_stacks
from .distributed import (SpawnError, broadcast_replicated_, clip_grad_norm_,
                          gather_optimizer_state, gather_state_dict, init_distributed,
                          layer_data_groups, load_optimizer_state, spawn)
from .mgrit.config import MGRITConfig
from .nn import (LayerParallelTransformer, LayerParallelTransformerDecoder,
                 LayerParallelTransformerEncoder)
from .version import __version__

__all__ = [
    "MGRITConfig", "LayerParallel", "SolveStats", "find_stacks",
    "LayerParallelTransformerEncoder", "LayerParallelTransformerDecoder", "LayerParallelTransformer",
    "AdaptiveController", "ControlConfig",
    "init_distributed", "spawn", "SpawnError", "gather_state_dict", "broadcast_replicated_",
    "gather_optimizer_state", "load_optimizer_state", "clip_grad_norm_", "layer_data_groups",
    "make_layer_parallel", "restore_blocks",
    "adapters", "mgrit", "multilevel", "perf", "__version__",
]

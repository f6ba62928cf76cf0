"""Distribution: starting processes (``launch``) and model state across ranks (``state``)."""
from .launch import (RankFailure, SpawnError, SpawnInterrupted, detect_launcher, init_distributed,
                     layer_data_groups, spawn)
from .state import (broadcast_replicated_, clip_grad_norm_, gather_named, gather_optimizer_state,
                    gather_state_dict, layer_comm, load_optimizer_state)

__all__ = ["RankFailure", "SpawnError", "SpawnInterrupted", "detect_launcher", "init_distributed",
           "layer_data_groups", "spawn",
           "broadcast_replicated_", "clip_grad_norm_", "gather_named", "gather_optimizer_state",
           "gather_state_dict", "layer_comm", "load_optimizer_state"]

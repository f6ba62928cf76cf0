"""Layer-parallel training of deep transformers with MGRIT."""
from . import mgrit
from .config import MGRITConfig
from .layer_parallel import LayerParallel, SolveStats
from .nn import LayerParallelTransformerEncoder

__all__ = ["MGRITConfig", "LayerParallel", "SolveStats", "LayerParallelTransformerEncoder", "mgrit"]
__version__ = "0.1.0"

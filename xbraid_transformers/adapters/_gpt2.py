"""HF GPT-2: ``GPT2Block`` computes x + attn(ln_1 x), then + mlp(ln_2 .) (and a cross-attention
branch with ``add_cross_attention``): pre-norm residual, one ODE step of size 1."""
from ._registry import Family

GPT2 = Family(name="gpt2", package="transformers.", block_classes=("GPT2Block",),
              block_paths=("transformer.h", "h"), parts=("ln_1", "attn", "ln_2", "mlp"))

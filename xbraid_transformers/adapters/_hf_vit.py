"""HF ViT: ``ViTLayer`` computes x + attention(layernorm_before x), then
+ mlp(layernorm_after .): pre-norm residual, one ODE step of size 1. transformers 5 keeps the
layers at ``vit.layers``, transformers 4 at ``vit.encoder.layer``."""
from ._registry import Family

HF_VIT = Family(name="hf_vit", package="transformers.", block_classes=("ViTLayer",),
                block_paths=("vit.layers", "vit.encoder.layer", "layers", "encoder.layer"),
                parts=("layernorm_before", "attention", "layernorm_after"))

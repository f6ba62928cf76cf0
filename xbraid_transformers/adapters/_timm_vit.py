"""timm ViT: ``Block`` computes x + drop_path(ls1(attn(norm1 x))), then
+ drop_path(ls2(mlp(norm2 .))); ``ResPostBlock`` normalises the branch instead,
x + norm1(attn(x)): both are residual steps x + F(x). ``VisionTransformer.blocks`` is an
``nn.Sequential``, called as a whole (or block by block when an attention mask is given)."""
from ._registry import Family

TIMM_VIT = Family(name="timm_vit", package="timm.", block_classes=("Block", "ResPostBlock"),
                  block_paths=("blocks",), parts=("norm1", "attn", "norm2", "mlp"))

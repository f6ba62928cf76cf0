"""HF Llama: ``LlamaDecoderLayer`` computes x + self_attn(input_layernorm x), then
+ mlp(post_attention_layernorm .), with rotary (cos, sin) position embeddings and position ids
passed by ``LlamaModel`` to every layer: pre-RMSNorm residual, one ODE step of size 1."""
from ._registry import Family

LLAMA = Family(name="llama", package="transformers.", block_classes=("LlamaDecoderLayer",),
               block_paths=("model.layers", "layers"),
               parts=("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"))

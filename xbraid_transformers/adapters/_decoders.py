"""Pre-norm decoders of transformers beside Llama, found through their models'
``_no_split_modules`` and checked here for the parts that make them pre-norm residual blocks.

- Qwen2, Mistral, Gemma, OLMo: the Llama layout, x + self_attn(input_layernorm x), then
  + mlp(post_attention_layernorm .) (RMSNorm; OLMo a LayerNorm without parameters).
- Phi-3: the same, with dropout on each branch before its residual sum.
- GPT-NeoX: x + attention(input_layernorm x) + mlp(post_attention_layernorm x) (parallel
  residual) or the sequential form; both are x + F(x).

Each is one ODE step of size 1 with nothing after the residual sum."""
from ._registry import Family

LLAMA_LAYOUT = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def llama_layout(name: str, block_class: str) -> Family:
    return Family(name=name, package="transformers.", block_classes=(block_class,),
                  block_paths=("model.layers", "layers"), parts=LLAMA_LAYOUT)


QWEN2 = llama_layout("qwen2", "Qwen2DecoderLayer")
MISTRAL = llama_layout("mistral", "MistralDecoderLayer")
PHI3 = llama_layout("phi3", "Phi3DecoderLayer")
GEMMA = llama_layout("gemma", "GemmaDecoderLayer")
OLMO = llama_layout("olmo", "OlmoDecoderLayer")
GPT_NEOX = Family(name="gpt_neox", package="transformers.", block_classes=("GPTNeoXLayer",),
                  block_paths=("gpt_neox.layers", "layers"),
                  parts=("input_layernorm", "attention", "post_attention_layernorm", "mlp"))

DECODERS = (QWEN2, MISTRAL, GPT_NEOX, PHI3, GEMMA, OLMO)

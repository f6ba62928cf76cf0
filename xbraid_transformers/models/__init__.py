"""Small, readable models in the paper's ODE form, built on the layer-parallel drop-ins."""
from .bert import Bert, BertClassifier, BertConfig, mask_tokens
from .common import LayerParallelModel, ParallelConfig, deepnet_gain, scale_residual_branches_
from .gpt import GPT, GPTConfig
from .seq2seq import Seq2Seq, Seq2SeqConfig
from .vit import ViT, ViTConfig

__all__ = ["Bert", "BertClassifier", "BertConfig", "mask_tokens", "GPT", "GPTConfig", "ViT",
           "ViTConfig", "Seq2Seq", "Seq2SeqConfig", "ParallelConfig", "LayerParallelModel",
           "deepnet_gain", "scale_residual_branches_"]

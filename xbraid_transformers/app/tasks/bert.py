"""BERT tasks: masked-LM pre-training on IMDB and Rotten-Tomatoes polarity classification."""
from __future__ import annotations

from torch import nn

from .base import (SampledTask, TaskConfig, load_data, parallel_config, replicated_from_rank0,
                   token_rows)

__all__ = ["BERT_SPECIALS", "BertTask", "ClsTask"]

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class BertTask(SampledTask):
    """Masked-LM pre-training on IMDB reviews (WordPiece) with ``models.Bert``."""

    name = "bert"

    def __init__(self, config: TaskConfig, comm=None):
        from ...data.text import imdb_lm
        from ...models import Bert, BertConfig
        c = config
        data = load_data(lambda: imdb_lm("wordpiece", 8192, path=c.data_path))
        pad, _, cls, _, self.mask_id = (data.tokenizer.token_to_id(t) for t in BERT_SPECIALS)
        self.specials, self.vocab = (pad, cls), data.vocab_size
        self.splits = {s: (token_rows(data.splits[s], c.seq_len, cls),) for s in ("train", "val")}
        model = Bert(BertConfig(vocab_size=self.vocab, max_len=c.seq_len, d_model=c.d_model,
                                n_heads=c.heads, num_layers=c.layers, dropout=c.dropout,
                                pad_id=pad, mask_id=self.mask_id, parallel=parallel_config(c)),
                     comm=comm)
        super().__init__(config, replicated_from_rank0(model))

    def loss(self, batch):
        from ...models import mask_tokens
        ids, generator = batch
        inputs, labels = mask_tokens(ids, self.mask_id, self.vocab, self.specials, generator=generator)
        return self.model.mlm_loss(inputs, labels)


class ClsTask(SampledTask):
    """Rotten-Tomatoes polarity with a BERT classifier (WordPiece trained on the sentences)."""

    name = "cls"

    def __init__(self, config: TaskConfig, comm=None):
        from ...data.batching import pad_sequences
        from ...data.text import encode_for_classification, rotten_tomatoes_splits, rotten_tomatoes_tokenizer
        from ...models import Bert, BertClassifier, BertConfig
        c = config
        parts = load_data(lambda: rotten_tomatoes_splits(c.data_path))
        tokenizer = rotten_tomatoes_tokenizer(c.data_path, vocab_size=4096)
        pad = tokenizer.token_to_id("[PAD]")
        self.splits = {s: (pad_sequences(encode_for_classification(texts, tokenizer, c.seq_len), pad,
                                         c.seq_len)[0], labels)
                       for s, (texts, labels) in parts.items()}
        bert = Bert(BertConfig(vocab_size=tokenizer.vocab_size, max_len=c.seq_len, d_model=c.d_model,
                               n_heads=c.heads, num_layers=c.layers, dropout=c.dropout, pad_id=pad,
                               mask_id=tokenizer.token_to_id("[MASK]"), parallel=parallel_config(c)),
                    comm=comm)
        super().__init__(config, replicated_from_rank0(BertClassifier(bert, 2, dropout=c.dropout)))

    def loss(self, batch):
        ids, labels, _ = batch
        return nn.functional.cross_entropy(self.model(ids), labels)

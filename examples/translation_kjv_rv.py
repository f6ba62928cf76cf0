"""English -> Spanish translation on KJV / Reina-Valera 1909 verse pairs with the encoder and
decoder as one ODE (one MGRIT solve over both stacks), serially and layer-parallel.

    apt-get install -y --no-install-recommends sword-text-kjv sword-text-sparv   # (docs/data.md)
    python examples/translation_kjv_rv.py --layers 4 --steps 300   # 4 encoder + 4 decoder layers
    python examples/translation_kjv_rv.py --synthetic --steps 30
    python examples/translation_kjv_rv.py --smoke --out DIR       # seconds; DIR/metrics.json

Reports validation loss, next-token accuracy and (with sacrebleu installed) greedy BLEU.
"""
import torch
import torch.nn.functional as F
from _common import compare, parallel_config, parse, parser, write_metrics

from xbraid_transformers.data import DataSourceMissing
from xbraid_transformers.data.translation import (SYNTHETIC_BOS, SYNTHETIC_EOS, SYNTHETIC_PAD, greedy_bleu,
                                                  synthetic_pairs)
from xbraid_transformers.models import Seq2Seq, Seq2SeqConfig

flags = parser(__doc__, layers=4, steps=300, batch=32, lr=1e-3)
flags.add_argument("--max-len", type=int, default=48)
flags.add_argument("--width", type=int, default=128, help="d_model")
flags.add_argument("--val-size", type=int, default=200, help="validation pairs (the first 50 also give BLEU)")
args = parse(flags, layers=2, steps=2, batch=4, width=32, val_size=8)
torch.manual_seed(args.seed)
PAD, BOS, EOS = SYNTHETIC_PAD, SYNTHETIC_BOS, SYNTHETIC_EOS
detokenize = None

if args.synthetic:  # "translate" = reverse the sentence and map every word to another word
    vocab = 40
    (src_train, tgt_train), (src_val, tgt_val) = synthetic_pairs(4000, 2, vocab), synthetic_pairs(300, 3, vocab)
else:
    from xbraid_transformers.data import kjv_rv_translation  # the offline loader (docs/data.md)
    data = kjv_rv_translation(vocab_size=8000, max_len=args.max_len)   # cached after the first call
    PAD, BOS, EOS = data.pad_id, data.bos_id, data.eos_id
    vocab = data.tokenizer.vocab_size

    def padded(split):  # (src [N, S] ending in EOS, tgt [N, T] as BOS ... EOS), PAD-filled
        batch = data.collate(split, range(len(data.splits[split][0])))
        return batch.src, batch.tgt

    (src_train, tgt_train), (src_val, tgt_val) = padded("train"), padded("val")
    detokenize = data.tokenizer.decode

def next_batch(g):
    i = torch.randint(len(src_train), (args.batch,), generator=g)
    return src_train[i], tgt_train[i]


def evaluate(model):
    src, tgt = src_val[:args.val_size], tgt_val[:args.val_size]
    logits = model(src, tgt[:, :-1])
    labels = tgt[:, 1:]
    keep = labels != PAD
    metrics = {"val_loss": round(F.cross_entropy(logits[keep], labels[keep]).item(), 4),
               "val_token_accuracy": round((logits.argmax(-1)[keep] == labels[keep]).float().mean().item(), 4)}
    try:
        metrics["val_bleu"] = round(greedy_bleu(model, src[:50], tgt[:50], detokenize), 2)
    except DataSourceMissing:  # sacrebleu is not installed
        pass
    return metrics


longest = max(t.shape[1] for t in (src_train, tgt_train, src_val, tgt_val))
config = Seq2SeqConfig(src_vocab=vocab, tgt_vocab=vocab, max_len=max(longest, 16),
                       d_model=args.width, n_heads=4, num_encoder_layers=args.layers,
                       num_decoder_layers=args.layers, dropout=0.1, pad_id=PAD, bos_id=BOS,
                       eos_id=EOS, parallel=parallel_config(args))
results, _ = compare(args, Seq2Seq(config), lambda m, b: m.loss(*b), next_batch, evaluate)
write_metrics(args, results)

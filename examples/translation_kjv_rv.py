"""English -> Spanish translation on KJV / Reina-Valera 1909 verse pairs with the encoder and
decoder as one ODE (one MGRIT solve over both stacks), serially and layer-parallel.

    apt-get install -y --no-install-recommends sword-text-kjv sword-text-sparv   # (docs/data.md)
    python examples/translation_kjv_rv.py --layers 4 --steps 300   # 4 encoder + 4 decoder layers
    python examples/translation_kjv_rv.py --synthetic --steps 30

Reports validation loss, next-token accuracy and (with sacrebleu installed) greedy BLEU.
"""
import torch
import torch.nn.functional as F
from _common import compare, parallel_config, parser

from xbraid_transformers.models import Seq2Seq, Seq2SeqConfig

flags = parser(__doc__, layers=4, steps=300, batch=32, lr=1e-3)
flags.add_argument("--max-len", type=int, default=48)
args = flags.parse_args()
torch.manual_seed(args.seed)
PAD, BOS, EOS = 0, 1, 2
detokenize = None

if args.synthetic:  # "translate" = reverse the sentence and map every word to another word
    vocab = 40
    perm = 3 + torch.randperm(vocab - 3, generator=torch.Generator().manual_seed(1))

    def pairs(n, seed):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(4, 12, (n,), generator=g)
        src = torch.full((n, 12), PAD)
        tgt = torch.full((n, 14), PAD)
        for i, k in enumerate(lengths.tolist()):
            words = torch.randint(vocab - 3, (k,), generator=g)
            src[i, :k] = 3 + words
            tgt[i, :k + 2] = torch.cat([torch.tensor([BOS]), perm[words.flip(0)], torch.tensor([EOS])])
        return src, tgt
    (src_train, tgt_train), (src_val, tgt_val) = pairs(4000, 2), pairs(300, 3)
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
    src, tgt = src_val[:200], tgt_val[:200]
    logits = model(src, tgt[:, :-1])
    labels = tgt[:, 1:]
    keep = labels != PAD
    metrics = {"val_loss": round(F.cross_entropy(logits[keep], labels[keep]).item(), 4),
               "val_token_accuracy": round((logits.argmax(-1)[keep] == labels[keep]).float().mean().item(), 4)}
    try:
        import sacrebleu
    except ImportError:
        return metrics
    out = model.greedy_decode(src[:50], max_len=tgt.shape[1])
    text = detokenize or (lambda ids: " ".join(map(str, ids)))
    strip = lambda row: [t for t in row.tolist() if t > EOS]  # noqa: E731
    hyps = [text(strip(r)) for r in out]
    refs = [text(strip(r)) for r in tgt[:50]]
    metrics["val_bleu"] = round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2)
    return metrics


longest = max(t.shape[1] for t in (src_train, tgt_train, src_val, tgt_val))
config = Seq2SeqConfig(src_vocab=vocab, tgt_vocab=vocab, max_len=max(longest, 16),
                       d_model=128, n_heads=4, num_encoder_layers=args.layers,
                       num_decoder_layers=args.layers, dropout=0.1, pad_id=PAD, bos_id=BOS,
                       eos_id=EOS, parallel=parallel_config(args))
compare(args, Seq2Seq(config), lambda m, b: m.loss(*b), next_batch, evaluate)

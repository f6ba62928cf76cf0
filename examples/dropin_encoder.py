"""Swap torch.nn.TransformerEncoder for the layer-parallel drop-in; keep the rest of the code.

    python examples/dropin_encoder.py
    python examples/dropin_encoder.py --smoke --out DIR   # 4 layers, a few steps; DIR/metrics.json

1. With ``step_size=1.0`` in serial mode the drop-in *is* the torch encoder (same weights, same
   outputs). 2. In the neural-ODE form (step 1/N) MGRIT solves the forward and backward passes;
   training a tiny classifier shows serial and layer-parallel runs side by side. No data needed.
"""
import argparse
import copy
import time

import torch
from _common import add_output_flags, write_metrics
from torch import nn

import xbraid_transformers as xbt
from xbraid_transformers.nn import LayerParallelTransformerEncoder

flags = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
flags.add_argument("--layers", type=int, default=16)
flags.add_argument("--steps", type=int, default=60, help="training steps per mode")
add_output_flags(flags)
args = flags.parse_args()
if args.smoke:
    args.layers, args.steps = 4, 3
    torch.set_num_threads(1)
torch.manual_seed(0)
D, N = 64, args.layers
layer = nn.TransformerEncoderLayer(D, 4, 4 * D, dropout=0.0, norm_first=True, batch_first=True)
torch_encoder = nn.TransformerEncoder(layer, N, norm=nn.LayerNorm(D), enable_nested_tensor=False)

# 1. the same network
ours = LayerParallelTransformerEncoder.from_torch(torch_encoder, step_size=1.0).serial()
x = torch.randn(4, 20, D)
with torch.no_grad():
    diff = (ours(x, is_causal=True) - torch_encoder(
        x, mask=nn.Transformer.generate_square_subsequent_mask(20), is_causal=True)).abs().max()
print(f"max |drop-in - torch| with step 1, serial: {diff:.2e}")
metrics = {"max_abs_difference_to_torch": diff.item()}


# 2. the ODE form, trained serially and layer-parallel: does token i's value occur earlier?
class Model(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.embed, self.encoder, self.head = nn.Embedding(16, D), encoder, nn.Linear(D, 2)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids), is_causal=True))  # (B, T, 2)


def batch(g):
    ids = torch.randint(16, (32, 20), generator=g)
    seen = torch.stack([(ids[:, :t] == ids[:, t:t + 1]).any(1) for t in range(20)], 1)
    return ids, seen.long()


cfg = xbt.MGRITConfig(levels=2, cfactor=4, fwd_iters=2, bwd_iters=1)
model = Model(LayerParallelTransformerEncoder(layer, N, nn.LayerNorm(D), mgrit=cfg))
for mode in ("serial", "parallel"):
    m = copy.deepcopy(model)
    m.encoder.serial() if mode == "serial" else m.encoder.layer_parallel()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    g, start = torch.Generator().manual_seed(0), time.perf_counter()
    for step in range(args.steps):
        ids, y = batch(g)
        loss = nn.functional.cross_entropy(m(ids).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.encoder.serial()
    with torch.no_grad():
        ids, y = batch(torch.Generator().manual_seed(99))
        acc = (m(ids).argmax(-1) == y).float().mean().item()
    seconds = time.perf_counter() - start
    metrics[mode] = {"train_loss": round(loss.item(), 4), "val_accuracy": round(acc, 4),
                     "train_seconds": round(seconds, 1)}
    print(f"{mode:>14}: final train loss {loss.item():.4f}, val accuracy {acc:.3f}, {seconds:.1f} s")
write_metrics(args, metrics)

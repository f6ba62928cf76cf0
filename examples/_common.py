"""Shared by the examples: one training loop for serial and layer-parallel mode, and flags."""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

import xbraid_transformers as xbt
from xbraid_transformers.models import ParallelConfig


def parser(description: str, layers: int, steps: int, batch: int, lr: float):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--layers", type=int, default=layers, help="transformer layers (time steps)")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps per mode")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--mode", choices=["serial", "parallel", "both"], default="both")
    p.add_argument("--levels", type=int, default=2)
    p.add_argument("--cfactor", type=int, default=2)
    p.add_argument("--fwd-iters", type=int, default=2)
    p.add_argument("--bwd-iters", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--synthetic", action="store_true",
                   help="synthetic data instead of the offline data set (smoke test)")
    p.add_argument("--seed", type=int, default=0)
    add_output_flags(p)
    return p


def add_output_flags(p: argparse.ArgumentParser) -> None:
    """``--smoke`` (a few steps of a tiny model: a check that the example runs) and ``--out``."""
    p.add_argument("--smoke", action="store_true",
                   help="a few steps of a tiny model on the same data (a check that the example runs)")
    p.add_argument("--out", help="directory to write metrics.json into (the validation metrics of each mode)")


def parse(p: argparse.ArgumentParser, **smoke_sizes):
    """The parsed flags; with ``--smoke``, ``smoke_sizes`` replace the sizes given (and one torch
    thread unless ``--threads`` says otherwise)."""
    args = p.parse_args()
    if args.smoke:
        for name, value in smoke_sizes.items():
            setattr(args, name, value)
        args.threads = args.threads or 1
    return args


def write_metrics(args, metrics: dict, name: str = "metrics.json") -> None:
    """``metrics`` as JSON in ``--out`` (nothing without it)."""
    if not args.out:
        return
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, name)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(metrics, handle, indent=1)
    print(f"wrote {path}", flush=True)


def parallel_config(args, **extra) -> ParallelConfig:
    mgrit = xbt.MGRITConfig(levels=args.levels, cfactor=args.cfactor, fwd_iters=args.fwd_iters,
                            bwd_iters=args.bwd_iters)
    return ParallelConfig(mgrit=mgrit, dropout_seed=args.seed, **extra)


def compare(args, model, loss_fn, next_batch, evaluate):
    """Train copies of ``model`` in the requested modes from the same initialisation on the same
    batches; evaluate each trained copy exactly (serial mode).

    Returns ({mode: metrics}, {mode: trained model})."""
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = ["serial", "parallel"] if args.mode == "both" else [args.mode]
    results, models = {}, {}
    for mode in modes:
        m = copy.deepcopy(model)
        m.serial() if mode == "serial" else m.layer_parallel()
        opt = torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.01)
        generator = torch.Generator().manual_seed(args.seed)
        start = time.perf_counter()
        m.train()
        for step in range(args.steps):
            loss = loss_fn(m, next_batch(generator))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
                s = m.stats
                extra = (f"  mgrit fwd residuals {['%.1e' % r for r in s.fwd_residuals]}"
                         if mode == "parallel" else "")
                print(f"[{mode}] step {step:4d}  loss {loss.item():.4f}{extra}", flush=True)
        train_time = time.perf_counter() - start
        m.eval().serial()
        with torch.no_grad():
            metrics = evaluate(m)
        metrics["train_seconds"] = round(train_time, 1)
        results[mode], models[mode] = metrics, m
        print(f"[{mode}] validation {metrics}", flush=True)
    return results, models


def token_streams(synthetic: bool, length: int):
    """(train ids, val ids, vocabulary): a random Markov chain over 64 tokens (a language with a
    known entropy) of ``length`` tokens, 90% / 10%, or Shakespeare in BPE 4096."""
    if synthetic:
        vocab = 64
        g = torch.Generator().manual_seed(1)
        table = torch.softmax(3 * torch.randn(vocab, vocab, generator=g), -1)
        ids = [0]
        for _ in range(length):
            ids.append(torch.multinomial(table[ids[-1]], 1, generator=g).item())
        tokens = torch.tensor(ids)
        split = length * 9 // 10
        return tokens[:split], tokens[split:], vocab
    from xbraid_transformers.data import shakespeare_lm  # the offline loader (docs/data.md)
    data = shakespeare_lm(tokenizer="bpe", vocab_size=4096)   # cached after the first call
    train_ids, val_ids = (torch.from_numpy(data.splits[s].astype("int64")) for s in ("train", "val"))
    return train_ids, val_ids, data.vocab_size


def tiny_llama(args, vocab: int):
    """The Llama examples' model: a small ``LlamaForCausalLM`` (4 heads, 2 key/value heads, MLP
    twice the width) whose ``model.layers`` become one layer-parallel ODE stack with the MGRIT
    flags; ``args``: the parsed flags (layers, width, block, levels, cfactor, iterations, seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=vocab, hidden_size=args.width, intermediate_size=2 * args.width,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=args.block, attention_dropout=0.0,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    mgrit = xbt.MGRITConfig(levels=args.levels, cfactor=args.cfactor, fwd_iters=args.fwd_iters,
                            bwd_iters=args.bwd_iters)
    return xbt.make_layer_parallel(LlamaForCausalLM(config), mgrit=mgrit, dropout_seed=args.seed)

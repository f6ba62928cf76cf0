"""Multilevel training in depth versus single-level training: FLOPs and time to a target loss.

    python benchmarks/multilevel.py                     # GPT on Shakespeare + ViT on MNIST-5k
    python benchmarks/multilevel.py --quick             # fewer steps and seeds (a smoke run)

For each family, optimizer (SGD with momentum, AdamW) and seed, the same initial model is
trained (a) single-level for ``--steps`` steps and (b) with each multilevel schedule. The target
is the validation loss every single-level seed reaches within its budget (the worst seed's final
loss); the multilevel runs get twice that budget in optimisation steps. FLOPs are counted per
training step of each view with ``torch.utils.flop_counter.FlopCounterMode`` (forward +
backward, counted once per view and batch shape), not estimated from time. The validation
loss of the fine model is evaluated every ``--phase`` steps and at the end of every phase;
every run clips its gradients to norm ``--clip``. Writes ``benchmarks/results/multilevel.json``
and a Markdown table beside it.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from xbraid_transformers.multilevel import MultilevelSchedule, MultilevelStepper, Phase, coarse_view


# ----------------------------------------------------------------------------- families
def batch_loss(seed, draw, loss):
    """``loss_on(model, step)``: the loss of batch ``step``, drawn once per step from a seeded
    stream, so extra evaluations at an earlier step of the phase (MG/OPT gradients at its
    start, the line search after it) see the same batch."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    cache = {}

    def loss_on(model, step):
        if step not in cache:
            if step < max(cache, default=-2):
                raise RuntimeError(f"batch {step} left the cache")
            cache[step] = draw(gen)
            for old in [k for k in cache if k < step - 64]:
                del cache[old]
        return loss(model, *cache[step])
    return loss_on


def gpt_family(quick: bool):
    from xbraid_transformers.data.text import shakespeare_lm
    from xbraid_transformers.models.gpt import GPT, GPTConfig

    data = shakespeare_lm(tokenizer="bpe", vocab_size=1024)
    block, batch = 64, 16
    val_gen = torch.Generator().manual_seed(1234)
    val = [data.get_batch("val", batch, block, val_gen) for _ in range(4 if quick else 8)]

    def make(seed):
        torch.manual_seed(seed)
        model = GPT(GPTConfig(vocab_size=data.vocab_size, block_size=block, d_model=64, n_heads=4,
                              num_layers=8))
        model.serial()
        return model

    def train_batch(seed):
        return batch_loss(seed, lambda gen: data.get_batch("train", batch, block, gen),
                          lambda model, x, y: model(x, y)[1])

    def val_loss(model):
        with torch.no_grad():
            return statistics.fmean(float(model(x, y)[1]) for x, y in val)

    return make, train_batch, val_loss, dict(sgd_lr=0.3, adamw_lr=3e-3)


def vit_family(quick: bool):
    from xbraid_transformers.data.images import images_to_float, mnist_5k
    from xbraid_transformers.models.vit import ViT, ViTConfig

    images, labels = mnist_5k()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))  # file is sorted by class
    images, labels = images_to_float(images).reshape(-1, 1, 28, 28)[order], labels[order]
    train_x, train_y = images[:4000], labels[:4000]
    val_x, val_y = images[4000:], labels[4000:]
    batch = 64
    loss_fn = nn.CrossEntropyLoss()

    def make(seed):
        torch.manual_seed(seed)
        model = ViT(ViTConfig(d_model=32, n_heads=4, num_layers=8))
        model.serial()
        return model

    def draw(gen):
        idx = torch.randint(len(train_x), (batch,), generator=gen)
        return train_x[idx], train_y[idx]

    def train_batch(seed):
        return batch_loss(seed, draw, lambda model, x, y: loss_fn(model(x), y))

    def val_loss(model):
        with torch.no_grad():
            return float(loss_fn(model(val_x), val_y))

    return make, train_batch, val_loss, dict(sgd_lr=0.5, adamw_lr=3e-3)


FAMILIES = {"gpt": gpt_family, "vit": vit_family}


# ----------------------------------------------------------------------------- measuring
def step_flops(model, loss_on, stride, offset, backward=True):
    """FLOPs of one forward (+ backward) on the view (stride, offset); (1, 0) is the fine model."""
    probe = copy.deepcopy(model)
    view = coarse_view(probe, stride, offset) if stride > 1 else contextlib.nullcontext(probe)
    with view, FlopCounterMode(display=False) as counter, torch.set_grad_enabled(backward):
        loss = loss_on(probe, -1)
        if backward:
            loss.backward()
    return counter.get_total_flops()


def make_optimizer(name, params, lrs):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lrs["sgd_lr"], momentum=0.9)
    return torch.optim.AdamW(params, lr=lrs["adamw_lr"], weight_decay=0.01)


def run(model, optimizer, loss_on, schedule, val_loss, flops_of, eval_every, clip):
    """Train step by step; every ``eval_every`` steps and at the end of each phase record
    (cumulative FLOPs, seconds, val loss of the fine model). FLOPs: every step on its view, plus
    MG/OPT's fine and coarse gradients at a coarse phase's start and the line search's fine
    forward passes. Gradients are clipped to norm ``clip`` (0: off), as the trainer does."""
    stepper = MultilevelStepper(model, optimizer, schedule)
    curve, flops, seconds, step = [(0, 0.0, val_loss(model))], 0, 0.0, 0
    for phase in schedule:
        view = (phase.stride, phase.offset)
        if schedule.mgopt and not phase.is_fine:
            flops += flops_of[(1, 0)] + flops_of[view]
        for k in range(phase.steps):
            start = time.perf_counter()
            with stepper.step(step, loss_on):
                optimizer.zero_grad(set_to_none=True)
                loss_on(model, step).backward()
                stepper.correct_gradients()
                if clip:
                    nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
            seconds += time.perf_counter() - start
            flops += flops_of[view]
            step += 1
            if step % eval_every == 0 or k == phase.steps - 1:
                losses = stepper.extra_evaluations["fine_losses"]
                curve.append((flops + losses * flops_of["forward"], seconds, val_loss(model)))
    return curve


def to_target(curve, target):
    for flops, seconds, loss in curve[1:]:   # the untrained model does not count
        if loss <= target:
            return flops, seconds
    return None, None


def schedules(steps, phase):
    cycles = max(1, round(2 * steps / (3 * phase)))
    short = max(1, phase // 5)
    nested = [phase * max(1, round(2 * steps / phase / 3))] * 3
    brief = [4 * phase, 4 * phase, 2 * steps - 8 * phase]
    v_cycle = MultilevelSchedule.v_cycle
    return {
        "single-level": MultilevelSchedule(tuple(Phase(1, 0, phase) for _ in range(steps // phase))),
        "v-cycle": v_cycle(phase, phase, cycles),
        "v-cycle, raw coarse gradients": v_cycle(phase, phase, cycles, coarse_gradients="raw"),
        "v-cycle, reset state": v_cycle(phase, phase, cycles, optimizer_state="reset"),
        "v-cycle+mgopt": v_cycle(phase, phase, cycles, mgopt=True),
        "v-cycle+mgopt, line search": v_cycle(phase, phase, cycles, mgopt=True, line_search=True),
        f"v-cycle+mgopt, {short}-step coarse phases": v_cycle(
            short, phase, max(1, round(2 * steps / (2 * short + phase))), mgopt=True),
        "nested N/4->N/2->N": MultilevelSchedule.nested(nested, method="copy"),
        "nested N/4->N/2->N, linear": MultilevelSchedule.nested(nested, method="linear"),
        "nested N/4->N/2->N, transfer state": MultilevelSchedule.nested(
            nested, method="copy", optimizer_state="transfer"),
        "nested N/4->N/2->N, raw coarse gradients": MultilevelSchedule.nested(
            nested, method="copy", coarse_gradients="raw"),
        f"nested N/4->N/2->N, {brief[0]}-step coarse levels": MultilevelSchedule.nested(
            brief, method="copy"),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "adamw"], choices=["sgd", "adamw"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--phase", type=int, default=25,
                        help="steps of a V-cycle phase; also the evaluation interval")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    parser.add_argument("--schedules", nargs="+", metavar="NAME",
                        help="only these multilevel schedules (single-level always runs: it sets the target)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.phase = 1, 60, 10
    torch.set_num_threads(1)
    results = []
    for family in args.families:
        make, train_batch, val_loss, lrs = FAMILIES[family](args.quick)
        reference = make(0)
        probe_loss = train_batch(0)
        flops_of = {view: step_flops(reference, probe_loss, *view) for view in [(1, 0), (2, 0), (2, 1), (4, 0)]}
        flops_of["forward"] = step_flops(reference, probe_loss, 1, 0, backward=False)
        chosen = {name: schedule for name, schedule in schedules(args.steps, args.phase).items()
                  if name == "single-level" or not args.schedules or name in args.schedules}
        for opt_name in args.optimizers:
            curves = {}
            for name, schedule in chosen.items():
                for seed in range(args.seeds):
                    model = make(seed)
                    optimizer = make_optimizer(opt_name, model.parameters(), lrs)
                    curves[(name, seed)] = run(model, optimizer, train_batch(seed), schedule, val_loss, flops_of,
                                               args.phase, args.clip)
            target = max(curves[("single-level", s)][-1][2] for s in range(args.seeds))
            base = [to_target(curves[("single-level", s)], target) for s in range(args.seeds)]
            for name in chosen:
                rows = []
                for seed in range(args.seeds):
                    flops, seconds = to_target(curves[(name, seed)], target)
                    base_flops, base_seconds = base[seed]
                    rows.append(dict(seed=seed, flops=flops, seconds=seconds,
                                     flop_ratio=_ratio(base_flops, flops), time_ratio=_ratio(base_seconds, seconds),
                                     final_val=curves[(name, seed)][-1][2]))
                results.append(dict(family=family, optimizer=opt_name, schedule=name, target=target,
                                    flops_per_step={k if isinstance(k, str) else f"{k[0]}:{k[1]}": v
                                                    for k, v in flops_of.items()},
                                    runs=rows, curves={s: curves[(name, s)] for s in range(args.seeds)}))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "multilevel.json").write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()},
                                                              results=results), indent=1))
    table = markdown(results)
    (args.out / "multilevel.md").write_text(table)
    print(table)


def _ratio(base, value):
    return base / value if base is not None and value else None


def _spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return "not reached"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def markdown(results):
    lines = ["| family | optimizer | schedule | target val loss | FLOP ratio to target (median [min, max]) "
             "| wall-time ratio | reached |", "|---|---|---|---|---|---|---|"]
    for r in results:
        reached = sum(x["flops"] is not None for x in r["runs"])
        lines.append(f"| {r['family']} | {r['optimizer']} | {r['schedule']} | {r['target']:.3f} | "
                     f"{_spread([x['flop_ratio'] for x in r['runs']])} | "
                     f"{_spread([x['time_ratio'] for x in r['runs']])} | {reached}/{len(r['runs'])} |")
    lines.append("")
    lines.append("Ratios are single-level / multilevel (above 1: multilevel needs fewer). FLOPs per "
                 "step (forward + backward) by view: " + "; ".join(
                     f"{r['family']} " + ", ".join(f"{k}={v / 1e6:.1f}M" for k, v in r["flops_per_step"].items())
                     for r in results[:: max(1, len(results) // max(1, len({x['family'] for x in results})))]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

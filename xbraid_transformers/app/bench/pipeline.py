"""Pipeline parallelism beside layer-parallel MGRIT, on the same layers and the same loss: the
measurement behind ``benchmarks/pipeline_vs_mgrit.py``.

Pipelining (``torch.distributed.pipelining``) splits the layers into one stage per rank and the
batch into m micro-batches; GPipe runs every forward, then every backward, 1F1B interleaves them
(same time, less memory; torch's 1F1B needs at least one micro-batch per stage). MGRIT splits
the same layers over the same ranks and solves the whole batch at once (or each of m
micro-batches in turn, gradients accumulating).

- Real: gloo processes on this machine, wall time per training step; the serial baseline is the
  same layers through autograd on one of them while the others wait.
- Priced: both from the same step costs measured here (per micro-batch size). A pipeline step
  costs ``(m + P - 1)`` stage steps (forward and backward of ``N / P`` layers at ``B / m``) plus
  a send and a receive of the micro-batch's state each, under the link model; MGRIT costs its
  cost model's critical path at the same step costs and link, once per solve.
"""
from __future__ import annotations

import time
from typing import Dict, List, Sequence

import torch
from torch import nn

from ...core.blocks import encoder_rhs
from ...core.cost_model import cost_model
from ...core.layer_parallel import LayerParallel
from ...core.ownership import partition_layers
from ...mgrit.clock import LinkModel
from ...mgrit.config import MGRITConfig
from .scaling import Shape, configurations, make_layers, unit_costs

__all__ = ["SCHEDULES", "ResidualStage", "loss_fn", "pipeline_gradients", "real_worker",
           "micro_batch_costs", "proportional_costs", "priced_rows"]

SCHEDULES = ("GPipe", "1F1B")


class ResidualStage(nn.Module):
    """Layers as forward-Euler steps ``x + h F_n(x)``: what ``LayerParallel``'s serial mode
    computes for the same layers, as a plain module a pipeline stage can hold."""

    def __init__(self, layers: Sequence[nn.Module], step_size: float):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.step_size = step_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.add(x, encoder_rhs(layer, x), alpha=self.step_size)
        return x


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The loss of every variant: the mean square of the output's distance to the target."""
    return (output - target).square().mean()


def _schedule(name: str):
    from torch.distributed import pipelining
    return {"GPipe": pipelining.ScheduleGPipe, "1F1B": pipelining.Schedule1F1B}[name]


def _pipeline(comm, layers, name: str, microbatches: int):
    """This rank's stage (its block of the layers) and the schedule that drives it."""
    from torch.distributed.pipelining import PipelineStage
    lo, hi = partition_layers(len(layers), 1, comm.size)[comm.rank]
    module = ResidualStage(layers[lo:hi], 1.0 / len(layers))
    stage = PipelineStage(module, comm.rank, comm.size, torch.device("cpu"))
    return module, _schedule(name)(stage, microbatches, loss_fn=loss_fn), lo


def _pipeline_step(comm, schedule, x, target):
    if comm.rank == 0:
        schedule.step(x)
    elif comm.rank == comm.size - 1:
        schedule.step(target=target, losses=[])
    else:
        schedule.step()


def pipeline_gradients(comm, layers, x, target, name: str, microbatches: int) -> Dict[str, torch.Tensor]:
    """One pipelined training step; the gradients of this rank's parameters, named as in
    ``ResidualStage(all layers)`` (``layers.<global index>.<name>``)."""
    module, schedule, lo = _pipeline(comm, layers, name, microbatches)
    module.zero_grad()
    _pipeline_step(comm, schedule, x, target)
    out = {}
    for key, p in module.named_parameters():
        _, index, rest = key.split(".", 2)
        out[f"layers.{lo + int(index)}.{rest}"] = p.grad.clone()
    return out


def _timed(comm, fn, reps: int) -> float:
    """Wall time of ``fn`` started together on every rank and ended by the last: the least of
    ``reps`` after a warm-up."""
    best = float("inf")
    for rep in range(reps + 1):
        comm.allreduce_sum(0.0)
        start = time.perf_counter()
        fn()
        mine = time.perf_counter() - start
        slowest = float(comm.allreduce(torch.tensor([mine], dtype=torch.float64), "max")[0])
        if rep:
            best = min(best, slowest)
    return best


def real_worker(comm, num_layers: int, microbatches: Sequence[int], mgrit: Dict[str, dict],
                shape: Shape, reps: int) -> List[dict]:
    """On each of ``comm.size`` gloo processes: wall time per training step of the serial
    layers (on rank 0, the others waiting), the two pipeline schedules and MGRIT (whole batch
    and m solves) for every m. Returns the rows (rank 0; None elsewhere)."""
    torch.manual_seed(0)
    layers = make_layers(num_layers, shape)
    x = shape.input(1)
    target = torch.zeros_like(x)
    rows = []

    def row(schedule, m, kind, seconds):
        rows.append(dict(schedule=schedule, layers=num_layers, ranks=comm.size, microbatches=m,
                         kind=kind, seconds_per_step=seconds))

    serial = ResidualStage(layers, 1.0 / num_layers)

    def serial_step():
        if comm.rank == 0:
            serial.zero_grad()
            loss_fn(serial(x), target).backward()

    serial_s = _timed(comm, serial_step, reps)
    row("serial", 1, "real", serial_s)
    for name in SCHEDULES:
        for m in microbatches:
            if name == "1F1B" and m < comm.size:     # torch's 1F1B needs a micro-batch per stage
                continue
            module, schedule, _ = _pipeline(comm, layers, name, m)

            def step():
                module.zero_grad()
                _pipeline_step(comm, schedule, x, target)

            row(name, m, "real", _timed(comm, step, reps))
    for label, options in mgrit.items():
        stack = LayerParallel(make_layers(num_layers, shape), rhs=encoder_rhs,
                              mgrit=MGRITConfig(**options), comm=comm)
        for m in microbatches:
            def step():
                stack.zero_grad()
                for chunk, goal in zip(x.chunk(m), target.chunk(m)):
                    (loss_fn(stack(chunk), goal) / m).backward()

            row(f"MGRIT {label}" + (f", {m} solves" if m > 1 else ""), m, "real", _timed(comm, step, reps))
    for r in rows:
        r["speedup_vs_serial"] = serial_s / r["seconds_per_step"]
    return rows if comm.rank == 0 else None


def micro_batch_costs(shape: Shape, microbatches: Sequence[int], reps: int = 5) -> Dict[int, Dict[str, float]]:
    """Step costs (``unit_costs``) at each micro-batch size ``shape.batch / m``."""
    costs = {}
    for m in microbatches:
        if shape.batch % m:
            raise ValueError(f"a batch of {shape.batch} cannot be split into {m} micro-batches")
        small = Shape(shape.d_model, shape.heads, shape.ff, shape.batch // m, shape.seq)
        costs[m] = unit_costs(small.input(), small, reps)
    return costs


def proportional_costs(costs: Dict[int, Dict[str, float]]) -> Dict[int, Dict[str, float]]:
    """The whole batch's step costs divided by m for m micro-batches: a layer whose time is
    proportional to its batch (compute-bound, as on an accelerator at large batch), where the
    measured small-batch costs here barely shrink with the batch (overhead-bound)."""
    return {m: {k: v / m for k, v in costs[1].items()} for m in costs}


def priced_rows(layer_counts: Sequence[int], rank_counts: Sequence[int], microbatches: Sequence[int],
                costs: Dict[int, Dict[str, float]], shape: Shape, link: LinkModel,
                basis: str = "measured") -> List[dict]:
    """Seconds per training step, priced: serial, pipelining (one row per schedule: the same
    time), MGRIT on the whole batch and in m solves (the best hierarchy of the scaling grid by
    its calibrated critical path, one forward / one backward iteration). ``costs[m]``: the step
    costs at micro-batch size B / m (``costs[1]`` prices the serial step); ``basis`` names them
    in the rows."""
    rows = []
    for n in layer_counts:
        serial = n * costs[1]["serial"]
        for p in rank_counts:
            if p > n:
                continue
            for m in microbatches:
                units = costs[m]
                state_bytes = (shape.batch // m) * shape.seq * shape.d_model * 4
                hop = link.cost(state_bytes)
                stage = n / p * units["serial"]
                pipeline = (m + p - 1) * (stage + 2 * hop) if p > 1 else m * n * units["serial"]
                for name in SCHEDULES:
                    if name == "1F1B" and m < p:      # torch's 1F1B needs a micro-batch per stage
                        continue
                    rows.append(dict(schedule=name, layers=n, ranks=p, microbatches=m, kind="priced",
                                     seconds_per_step=pipeline, step_costs=basis))
                best, config = float("inf"), None
                for options in configurations(n, p, iterations=((1, 1),)):
                    model = cost_model(n, p, options["levels"], options["cfactor"], 1, 1,
                                       relax=options["relax"], hop_cost=hop,
                                       step_costs=dict(units, forward_final=units["record"]))
                    if model["parallel"] < best:
                        best, config = model["parallel"], options
                rows.append(dict(schedule="MGRIT" + (f", {m} solves" if m > 1 else ""), layers=n, ranks=p,
                                 microbatches=m, kind="priced", seconds_per_step=m * best,
                                 mgrit=f"L{config['levels']} m{config['cfactor']} 1/1", step_costs=basis))
            for r in rows:
                if r["layers"] == n:
                    r["speedup_vs_serial"] = serial / r["seconds_per_step"]
    return rows

"""Honesty check of the emulator: the virtual time it predicts for a layer-parallel training step
against the real wall time of the same step on 2 gloo processes of this machine.

1. The link: ping-pongs of several sizes between 2 gloo processes (one torch thread each); a
   one-way time is half the median round trip; ``latency + bytes / bandwidth`` is fitted to
   them by least squares.
2. The step: the same layers and options as ``scaling.py`` (d_model 32, batch 2 x 16 tokens),
   N layers over 2 ranks. Real: ``xbt.spawn`` runs it on 2 gloo processes; a step's time is
   rank 0's wall time between two barriers. Predicted: ``xbt.perf.emulate`` runs the same
   code as 2 threads with the fitted link; a step's time is the virtual time (thread CPU time
   plus modelled message times). The serial step is timed both ways too (wall time of one
   process; thread CPU time), so that the real and the predicted speedups can be compared.
3. Rounds: real, emulated and serial runs alternate, ``--rounds`` times, so that all of them
   sample the same drifting load of a shared machine; every figure is a median over all steps
   of all rounds, with its quartiles and extremes.

    python benchmarks/emulator_honesty.py [--layers 64] [--steps 20] [--rounds 5] [--out DIR]
writes benchmarks/results/emulator_honesty.json and emulator_honesty.md (or into DIR);
``--smoke`` runs a few steps of 8 layers into a temporary directory (a check that it runs).
"""
import argparse
import os
import statistics
import tempfile
import time

import torch

import xbraid_transformers as xbt
from xbraid_transformers.app.bench.scaling import Shape, make_layers
from xbraid_transformers.app.provenance import provenance, write_json, write_markdown
from xbraid_transformers.core.blocks import encoder_rhs
from xbraid_transformers.perf import LinkModel, emulate

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHAPE = Shape()   # the layers and input of benchmarks/scaling.py
SIZES = [4, 1 << 10, 4 << 10, 64 << 10, 1 << 20, 4 << 20]   # bytes; the step sends 4 KiB states
CONFIGS = {
    "L2 m4 FCF 1/1": dict(levels=2, cfactor=4, relax="FCF", fwd_iters=1, bwd_iters=1),
    "L2 m4 FCF 2/1": dict(levels=2, cfactor=4, relax="FCF", fwd_iters=2, bwd_iters=1),
}


def pingpong(comm, sizes, trips, reps):
    """One-way times (seconds) per size: half a round trip, ``reps`` samples of ``trips``."""
    out = {}
    for nbytes in sizes:
        buf = torch.zeros(max(1, nbytes // 4))
        samples = []
        for rep in range(reps + 1):                  # the first batch warms the connection up
            comm.allreduce_sum(0.0)
            start = time.perf_counter()
            for _ in range(trips):
                if comm.rank == 0:
                    comm.isend(buf, 1)
                    comm.recv(buf, 1)
                else:
                    comm.recv(buf, 0)
                    comm.isend(buf, 0)
            comm.flush()
            if rep:
                samples.append((time.perf_counter() - start) / trips / 2)
        out[nbytes] = samples
    return out


def fit_link(one_way):
    """Least squares of ``t = latency + bytes / bandwidth`` on the median one-way times, in
    relative error (weights 1/t^2): the sizes span six decades, and an unweighted fit would
    let the megabyte messages decide the latency of the small ones the solver sends."""
    xs = list(one_way)
    ys = [statistics.median(one_way[x]) for x in xs]
    ws = [1.0 / y ** 2 for y in ys]
    sw = sum(ws)
    mx = sum(w * x for w, x in zip(ws, xs)) / sw
    my = sum(w * y for w, y in zip(ws, ys)) / sw
    slope = (sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys))
             / sum(w * (x - mx) ** 2 for w, x in zip(ws, xs)))
    latency = my - slope * mx
    return LinkModel(latency=max(latency, 0.0), bandwidth=1.0 / slope)


def _stack(comm, num_layers, options):
    layers = make_layers(num_layers, SHAPE)
    if options is None:
        return xbt.LayerParallel(layers, rhs=encoder_rhs).serial()
    return xbt.LayerParallel(layers, rhs=encoder_rhs, mgrit=xbt.MGRITConfig(**options), comm=comm)


def _step(stack, x):
    for p in stack.parameters():
        p.grad = None
    stack(x.clone().requires_grad_()).square().mean().backward()


def _input():
    # threads share torch's global generator: a generator of its own gives every rank the same x
    return SHAPE.input(seed=1)


def real_steps(comm, num_layers, options, steps):
    """Per step on this (real) rank, between two barriers: the wall time, the CPU time of the
    main thread (what the emulator's clock counts) and of the whole process (gloo's own
    threads included)."""
    x = _input()
    stack = _stack(comm, num_layers, options)
    wall, thread, process = [], [], []
    for k in range(steps + 2):                       # two warm-up steps
        comm.allreduce_sum(0.0)
        marks = time.perf_counter(), time.thread_time(), time.process_time()
        _step(stack, x)
        comm.allreduce_sum(0.0)
        if k >= 2:
            wall.append(time.perf_counter() - marks[0])
            thread.append(time.thread_time() - marks[1])
            process.append(time.process_time() - marks[2])
    return dict(wall=wall, thread_cpu=thread, process_cpu=process)


def emulated_steps(comm, num_layers, options, steps):
    """Per step of this emulated rank, between the same two barriers: the virtual time and
    the CPU time in it."""
    x = _input()
    stack = _stack(comm, num_layers, options)
    virtual, compute = [], []
    for k in range(steps + 2):
        comm.allreduce_sum(0.0)
        comm.clock.reset()
        _step(stack, x)
        comm.clock.tick()
        comm.allreduce_sum(0.0)
        if k >= 2:
            virtual.append(comm.clock.time)
            compute.append(comm.clock.compute)
    return dict(virtual=virtual, compute=compute)


def serial_steps(num_layers, steps, timer):
    x = _input()
    stack = _stack(None, num_layers, None)
    times = []
    for k in range(steps + 2):
        start = timer()
        _step(stack, x)
        if k >= 2:
            times.append(timer() - start)
    return times


def summary(samples):
    q = statistics.quantiles(samples, n=4)
    return dict(median=statistics.median(samples), q1=q[0], q3=q[2], min=min(samples),
                max=max(samples), n=len(samples))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", help="directory of the results (default: benchmarks/results; with --smoke a "
                                  "temporary directory)")
    ap.add_argument("--smoke", action="store_true",
                    help="8 layers, 2 steps, 1 round, short ping-pongs, the first configuration only")
    args = ap.parse_args()
    trips, reps, configs = 50, 3, CONFIGS
    if args.smoke:   # one configuration: the other runs the same code with other options
        args.layers, args.steps, args.rounds, trips, reps = 8, 2, 1, 5, 2
        configs = dict(list(CONFIGS.items())[:1])
    out = args.out or (tempfile.mkdtemp(prefix="emulator_honesty-") if args.smoke else OUT)
    facts = provenance()
    torch.set_num_threads(1)
    start = time.time()
    loads = [os.getloadavg()[0]]   # 1-minute load average before the run and after each round

    one_way = {n: [] for n in SIZES}
    for _ in range(args.rounds):
        for n, samples in xbt.spawn(pingpong, 2, SIZES, trips, reps)[0].items():
            one_way[n] += samples
    link = fit_link(one_way)
    print(f"gloo link: latency {link.latency * 1e6:.1f} us, bandwidth {link.bandwidth / 1e9:.2f} GB/s",
          flush=True)

    samples = {name: dict(wall=[], thread_cpu=[], process_cpu=[], virtual=[], compute=[])
               for name in configs}
    serial = dict(wall=[], cpu=[])
    for r in range(args.rounds):
        serial["wall"] += serial_steps(args.layers, args.steps, time.perf_counter)
        serial["cpu"] += serial_steps(args.layers, args.steps, time.thread_time)
        for name, options in configs.items():
            for key, values in xbt.spawn(real_steps, 2, args.layers, options, args.steps)[0].items():
                samples[name][key] += values
            emulated = emulate(emulated_steps, 2, args.layers, options, args.steps, link=link)
            for key, values in emulated[0].items():
                samples[name][key] += values
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds} [{time.time() - start:.0f} s], load average {loads[-1]:.2f}", flush=True)

    serial_summary = {k: summary(v) for k, v in serial.items()}
    results = {}
    for name, s in samples.items():
        figures = {k: summary(v) for k, v in s.items()}
        real, virtual = figures["wall"]["median"], figures["virtual"]["median"]
        results[name] = dict(
            options=configs[name], **figures, emulated_over_real=virtual / real,
            real_speedup=serial_summary["wall"]["median"] / real,
            predicted_speedup=serial_summary["cpu"]["median"] / virtual, samples=s)
        print(f"{name}: real {real * 1e3:.2f} ms, emulated {virtual * 1e3:.2f} ms", flush=True)
    meta = dict(layers=args.layers, d_model=SHAPE.d_model, batch=SHAPE.batch, seq=SHAPE.seq, steps=args.steps,
                rounds=args.rounds, machine=f"{facts['machine']}, shared with other work",
                load_average=loads, wall_s=time.time() - start,
                link=dict(latency_s=link.latency, bandwidth_Bps=link.bandwidth,
                          one_way_s={str(n): summary(v) for n, v in one_way.items()}))
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "emulator_honesty.json"),
               dict(meta, serial=dict(serial_summary, samples=serial), configs=results), facts)
    write_markdown(os.path.join(out, "emulator_honesty.md"), table(meta, serial_summary, results), facts)
    print(f"wrote {out}/emulator_honesty.json and .md")


def _ms(s):
    ms = {k: s[k] * 1e3 for k in ("median", "q1", "q3", "min", "max")}
    return f"{ms['median']:.2f} [{ms['q1']:.2f}, {ms['q3']:.2f}] ({ms['min']:.2f}-{ms['max']:.2f})"


def table(meta, serial, results):
    link = meta["link"]
    lines = [
        "# Emulator honesty: predicted (virtual) vs real time of one training step, 2 gloo ranks",
        "",
        f"{meta['layers']} layers, d_model {meta['d_model']}, batch {meta['batch']} x {meta['seq']} "
        f"tokens, one torch thread per rank; {meta['rounds']} rounds x {meta['steps']} steps; "
        f"{meta['machine']}; 1-minute load average {meta['load_average'][0]:.2f} before the run, "
        f"{min(meta['load_average'][1:]):.2f}-{max(meta['load_average'][1:]):.2f} after the rounds.",
        f"Link fitted to gloo ping-pongs ({', '.join(link['one_way_s'])} bytes): latency "
        f"{link['latency_s'] * 1e6:.1f} us, bandwidth {link['bandwidth_Bps'] / 1e9:.2f} GB/s.",
        "Times in ms: median [quartiles] (min-max) over all steps.",
        "",
        "| step | real: wall (2 gloo processes) | real: CPU of the main thread | real: CPU of the process | "
        "emulated: virtual (2 threads) | emulated: CPU in it | virtual / real wall |",
        "|---|---|---|---|---|---|---|",
        f"| serial | {_ms(serial['wall'])} | {_ms(serial['cpu'])} | - | {_ms(serial['cpu'])} (CPU time) | - | "
        f"{serial['cpu']['median'] / serial['wall']['median']:.2f} |",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {_ms(r['wall'])} | {_ms(r['thread_cpu'])} | {_ms(r['process_cpu'])} | "
                     f"{_ms(r['virtual'])} | {_ms(r['compute'])} | {r['emulated_over_real']:.2f} |")
    lines += ["", "| options | real speedup (wall) | predicted speedup (virtual) |", "|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['real_speedup']:.2f}x | {r['predicted_speedup']:.2f}x |")
    lines += [
        "",
        "Reading: the virtual time counts the CPU time of each rank's main thread and models each "
        "message as latency + bytes / bandwidth. The real wall time also holds what that leaves "
        "out: the CPU time of gloo's own threads (process CPU minus main-thread CPU), and the "
        "time a process waits for a core: two busy processes plus gloo's threads on 2 cores "
        "shared with other work. The CPU columns say how much of the gap is compute and how much "
        "is waiting; the quartiles and extremes say how much one figure can move between runs.",
        "",
        "Load: the machine is shared with other jobs (the load averages above). Real, emulated and "
        "serial steps alternate round by round, so all of them sample the same load and the ratios "
        "(virtual / real, the speedups) compare times taken side by side; the real wall times still "
        "grow with the load, which the emulator does not model, so virtual / real falls as the load "
        "rises.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

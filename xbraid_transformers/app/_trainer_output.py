"""What a training run shows and writes as it goes: metrics records (and TensorBoard scalars),
the progress bar or progress lines, the summary."""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Optional

__all__ = ["TrainerOutput", "tensorboard_writer"]

logger = logging.getLogger("xbraid_transformers.app.trainer")   # the trainer's own logger


class TrainerOutput:
    """The output side of ``Trainer`` (a mixin: it reads the trainer's run state)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _write_record(self, record: dict) -> None:
        self.files.append_record(record)
        if self._writer is not None:
            for key in ("loss", "lr", "rho_forward", "rho_backward", "eval_loss"):
                if record.get(key) is not None:
                    self._writer.add_scalar(key, record[key], record["step"])

    def finish(self) -> dict:
        """Final evaluation and the summary JSON."""
        summary = self.summary(final_eval=None if self.diverged else self.evaluate())
        self.files.write_summary(summary)
        if self._writer is not None:
            self._writer.close()
        return summary

    def summary(self, final_eval: Optional[float] = None) -> dict:
        ctl = self.controller
        last = self.history[-1] if self.history else (self._resumed_record or {})
        steps_done = max(self.step, 1)
        return {"task": self.task.config.name, "mode": self.config.mode, "steps": self.step,
                "final_loss": last.get("loss"), "final_eval_loss": final_eval,
                "train_seconds": self.train_seconds,
                "seconds_per_step": self.train_seconds / steps_done,
                "virtual_seconds": self.virtual_seconds,
                "virtual_seconds_per_step": (self.virtual_seconds / steps_done
                                             if self.virtual_seconds is not None else None),
                "switch_step": ctl.switch_step if ctl else None,
                "decisions": [d.as_dict() for d in ctl.decisions] if ctl else [],
                "diverged": self.diverged, "config": _plain(dataclasses.asdict(self.config))}

    # ------------------------------------------------------------------ progress
    def _progress(self, stop: int):
        if not self.is_main:
            return None
        show = self.config.progress
        if show is None:
            show = sys.stderr.isatty()
        if not show:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=stop, initial=self.step, desc=self.config.mode, dynamic_ncols=True)

    def _report(self, bar, record: dict, stop: int) -> None:
        if not self.is_main:
            return
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", mode=record["mode"], refresh=False)
        elif record["step"] % self.config.print_every == 0 or record["step"] == stop - 1:
            view = f" layers {record['offset']}::{record['stride']}" if record.get("stride", 1) > 1 else ""
            logger.info("%s step %d/%d loss %.4f lr %.2e mode %s iters %d/%d%s%s", self.config.mode,
                        record["step"] + 1, stop, record["loss"], record["lr"], record["mode"],
                        record["fwd_iters"], record["bwd_iters"], view,
                        f" eval {record['eval_loss']:.4f}" if "eval_loss" in record else "")


def tensorboard_writer(out_dir: str):
    """A TensorBoard ``SummaryWriter`` of the run's ``tensorboard/`` folder."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise RuntimeError("TensorBoard logging needs the tensorboard package: "
                           "pip install tensorboard") from error
    return SummaryWriter(os.path.join(out_dir, "tensorboard"))


def _plain(value):
    """Config dicts as JSON-safe data (callables and dtypes as their repr)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)

"""The trainer: a run where the controller really switches, resume, schedule, metrics."""
import contextlib
import copy
import dataclasses
import json
import math
import statistics

import pytest
import torch

from xbraid_transformers.app.checkpoint import load_checkpoint, save_checkpoint
from xbraid_transformers.app.tasks import TaskConfig, build_task
from xbraid_transformers.app.optim import lr_factor
from xbraid_transformers.app.steps import StepHooks
from xbraid_transformers.app.trainer import TrainConfig, Trainer, seed_everything
from xbraid_transformers.control import ControlConfig
from xbraid_transformers.core.layer_parallel import find_stacks
from xbraid_transformers.mgrit.config import MGRITConfig
from xbraid_transformers.multilevel import MultilevelConfig


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(task_cfg, until=None, **options):
    seed_everything(task_cfg.seed)
    trainer = Trainer(build_task(task_cfg), TrainConfig(**options))
    summary = trainer.fit(until=until)
    return trainer, summary


def _growth(mode):
    """A linear-ODE fit whose MGRIT convergence degrades as it learns (rho: 0.01 -> >1)."""
    cfg = TaskConfig(name="growth", layers=16, d_model=8, batch_size=32,
                     mgrit=MGRITConfig(levels=2, cfactor=4, relax="F", fwd_iters=2, bwd_iters=1))
    return _run(cfg, mode=mode, steps=300, lr=3e-2, clip=0.0, eval_batches=4,
                control=ControlConfig(probe_every=5), print_every=1000)


def test_adaptive_run_switches_and_recovers_the_serial_loss():
    runs = {mode: _growth(mode) for mode in ("serial", "parallel", "adaptive")}
    adaptive, summary = runs["adaptive"]
    switch = summary["switch_step"]
    assert switch is not None and 20 < switch < 200, switch
    decision = next(d for d in adaptive.controller.decisions if d.step == switch)
    assert decision.action == "serial" and max(v for v in decision.rho.values() if v) > 1
    # every earlier probe measured rho <= 1
    assert all(d.action == "none" for d in adaptive.controller.decisions if d.step < switch)
    # after the switch the run is exact: serial records, no probes, no MGRIT residuals
    after = [r for r in adaptive.history if r["step"] > switch]
    assert after and all(r["mode"] == "serial" and not r["fwd_residuals"] for r in after)
    # the ending loss is within noise of the serial run (noise: the serial losses' spread)
    tail = {m: [r["loss"] for r in t.history[-60:]] for m, (t, _) in runs.items()}
    noise = statistics.stdev(tail["serial"])
    gap = abs(statistics.mean(tail["adaptive"]) - statistics.mean(tail["serial"]))
    assert gap < 0.2 * noise, (gap, noise)
    exact = {m: s["final_eval_loss"] for m, (_, s) in runs.items()}
    assert abs(exact["adaptive"] - exact["serial"]) < 0.2 * abs(exact["parallel"] - exact["serial"]), exact


def _synthetic(**changes):
    options = dict(name="synthetic", layers=4, d_model=16, heads=2, seq_len=6, batch_size=4,
                   dropout=0.1, mgrit=MGRITConfig(levels=2, cfactor=2, fwd_iters=1, bwd_iters=1))
    return TaskConfig(**{**options, **changes})


@pytest.mark.parametrize("mode", ["serial", "adaptive"])
def test_resume_gives_the_uninterrupted_losses(tmp_path, mode):
    options = dict(mode=mode, steps=8, lr=1e-2, warmup=2, grad_accum=2,
                   control=ControlConfig(probe_every=3))
    full, _ = _run(_synthetic(), out_dir=str(tmp_path / "full"), **options)
    first, _ = _run(_synthetic(), out_dir=str(tmp_path / "cut"), until=3, **options)
    assert first.step == 3 and (tmp_path / "cut" / "checkpoint.pt").exists()
    resumed, _ = _run(_synthetic(), out_dir=str(tmp_path / "cut"), resume="auto", **options)
    losses = [r["loss"] for r in first.history + resumed.history]
    assert losses == [r["loss"] for r in full.history]          # bit-identical
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(8))


def test_lr_schedule_warmup_then_cosine():
    assert [lr_factor(s, 4, 20, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert lr_factor(12, 4, 20, 0.1) == pytest.approx(0.55)       # half-way: (1 + 0.1) / 2
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)


def test_metrics_records_and_summary(tmp_path):
    trainer, summary = _run(_synthetic(layers=8), mode="adaptive", steps=4, out_dir=str(tmp_path),
                            control=ControlConfig(probe_every=2, floor=0.0), lr=1e-3)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4
    keys = {"step", "loss", "lr", "time", "virtual_time", "mode", "fwd_iters", "bwd_iters",
            "fwd_residuals", "bwd_residuals", "rho_forward", "rho_backward"}
    assert keys <= set(records[0])
    assert [r["probe"] for r in records] == [True, False, True, False]
    assert [r["fwd_iters"] for r in records] == [3, 1, 3, 1]      # probe: enough for two residuals
    assert records[0]["rho_forward"] is not None and records[1]["rho_forward"] is None
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["steps"] == 4 and saved["final_loss"] == records[-1]["loss"]
    assert math.isfinite(saved["final_eval_loss"]) and len(saved["decisions"]) == 2


def test_evaluation_uses_the_exact_network_and_restores_the_mode():
    seed_everything(0)
    task = build_task(_synthetic(dropout=0.0))
    trainer = Trainer(task, TrainConfig(mode="parallel", steps=1))
    value = trainer.evaluate()
    assert trainer.modules[0].parallel and trainer.model.training
    task.model.eval()
    with torch.no_grad():
        trainer.modules[0].serial()
        expected = sum(task.loss(task.batch("val", i)).item() for i in range(2)) / 2
    assert value == pytest.approx(expected, rel=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        TrainConfig(mode="fast")
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ValueError, match="momentum"):
        TrainConfig(optimizer="sgd", momentum=1.0)


def test_sgd_steps_are_torchs_sgd_on_the_same_batches():
    seed_everything(0)
    task = build_task(_synthetic(dropout=0.0))
    options = dict(optimizer="sgd", momentum=0.8, lr=0.05, weight_decay=0.01, clip=0.0,
                   min_lr_ratio=1.0, mode="serial", steps=3)
    trainer = Trainer(task, TrainConfig(**options))
    reference = copy.deepcopy(task.model)            # in serial mode, as the trainer set it
    trainer.fit()
    sgd = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.8, weight_decay=0.01)
    reference_task = copy.copy(task)
    reference_task.model = reference
    for step in range(3):
        sgd.zero_grad()
        reference_task.loss(reference_task.batch("train", step, 0)).backward()
        sgd.step()
    for (name, a), b in zip(trainer.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_resuming_with_another_optimizer_is_refused(tmp_path):
    _run(_synthetic(), mode="serial", steps=2, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="'adamw'.*'sgd'"):
        _run(_synthetic(), mode="serial", steps=4, optimizer="sgd", out_dir=str(tmp_path),
             resume="auto")
    # a checkpoint from before the optimizer's name was recorded was trained with AdamW
    path = str(tmp_path / "checkpoint.pt")
    state = load_checkpoint(path)
    del state["optimizer_name"]
    save_checkpoint(path, state)
    with pytest.raises(ValueError, match="'adamw'.*'sgd'"):
        _run(_synthetic(), mode="serial", steps=4, optimizer="sgd", out_dir=str(tmp_path),
             resume="auto")


# ---------------------------------------------------------------------- multilevel schedule
def _layer_snapshot(model):
    return [[p.detach().clone() for p in layer.parameters()] for layer in model.encoder.stack.layers]


def test_multilevel_schedule_trains_the_views_it_names():
    """V-cycle of (even 2, odd 2, fine 1) steps: each step changes exactly its view's layers;
    after the fine phase every layer has moved."""
    seed_everything(0)
    task = build_task(_synthetic(layers=4, dropout=0.0))
    ml = MultilevelConfig(cycle="v", coarse_steps=2, fine_steps=1)
    trainer = Trainer(task, TrainConfig(mode="parallel", steps=5, lr=1e-2, multilevel=ml))
    views = []
    for _ in range(5):
        before = _layer_snapshot(task.model)
        record = trainer.train_step()
        after = _layer_snapshot(task.model)
        moved = [i for i, (a, b) in enumerate(zip(before, after))
                 if any(not torch.equal(x, y) for x, y in zip(a, b))]
        views.append(((record["stride"], record["offset"]), moved))
    assert views == [((2, 0), [0, 2]), ((2, 0), [0, 2]), ((2, 1), [1, 3]), ((2, 1), [1, 3]),
                     ((1, 0), [0, 1, 2, 3])]


def test_multilevel_resume_mid_phase_with_mgopt_is_bit_identical(tmp_path):
    """Optimizer reset at phase changes, the MG/OPT correction held over a phase, the line
    search's starting point and nested prolongation all survive a checkpoint taken in the
    middle of a coarse phase."""
    ml = MultilevelConfig(cycle="nested", coarse_steps=3, levels=2, prolongation="linear",
                          optimizer_state="reset", mgopt=True, line_search=True)
    options = dict(mode="serial", steps=7, lr=1e-2, multilevel=ml)
    full, _ = _run(_synthetic(), out_dir=str(tmp_path / "full"), **options)
    first, _ = _run(_synthetic(), out_dir=str(tmp_path / "cut"), until=2, **options)
    resumed, _ = _run(_synthetic(), out_dir=str(tmp_path / "cut"), resume="auto", **options)
    assert [r["loss"] for r in first.history + resumed.history] == [r["loss"] for r in full.history]
    assert [r["stride"] for r in full.history] == [2, 2, 2, 1, 1, 1, 1]
    assert len(full.multilevel.step_lengths) == 1          # one coarse phase, one line search
    assert [r.get("line_search_step") for r in full.history] == [
        None, None, full.multilevel.step_lengths[0], None, None, None, None]
    assert resumed.multilevel.step_lengths == full.multilevel.step_lengths
    with pytest.raises(ValueError, match="multilevel schedule"):    # another schedule: refused
        _run(_synthetic(), out_dir=str(tmp_path / "cut"), resume="auto",
             **{**options, "multilevel": dataclasses.replace(ml, coarse_steps=2)})
    # without the correction the run differs: the correction is really applied and saved
    plain, _ = _run(_synthetic(), **{**options, "multilevel": dataclasses.replace(
        ml, mgopt=False, line_search=False)})
    assert [r["loss"] for r in plain.history][1:3] != [r["loss"] for r in full.history][1:3]


def test_nested_iteration_then_adaptive_layer_parallel_training():
    """In adaptive mode the controller watches the fine model only: no probe in the coarse
    phases, probes on the run's step count once the fine phase begins."""
    ml = MultilevelConfig(cycle="nested", coarse_steps=3, levels=2)
    trainer, summary = _run(_synthetic(layers=8), mode="adaptive", steps=12, lr=3e-3,
                            control=ControlConfig(probe_every=4), multilevel=ml)
    strides = [r["stride"] for r in trainer.history]
    assert strides == [2] * 3 + [1] * 9
    probes = [r["step"] for r in trainer.history if r["probe"]]
    assert probes == [4, 8]                              # fine steps 3..11, every 4th of the run
    assert [d.step for d in trainer.controller.decisions] == probes
    assert all(r["mode"] == "parallel" for r in trainer.history[3:])
    assert summary["final_eval_loss"] is not None


def test_multilevel_options_are_validated():
    with pytest.raises(ValueError, match="no fine steps"):
        TrainConfig(mode="serial", steps=50, multilevel=MultilevelConfig(coarse_steps=25, levels=3))
    with pytest.raises(ValueError, match="cycle"):
        MultilevelConfig(cycle="w")
    seed_everything(0)
    with pytest.raises(ValueError, match="cannot be coarsened"):   # 6 layers, stride 4
        Trainer(build_task(_synthetic(layers=6, mgrit=MGRITConfig(levels=1))),
                TrainConfig(mode="serial", steps=10, multilevel=MultilevelConfig(coarse_steps=1)))


def test_a_step_hook_of_your_own_plugs_into_the_trainer():
    """The step protocol (app/steps.py): a schedule that raises the forward iterations from
    step 2 on, written as a hook, is called in the protocol's order and changes the solves (the
    records' iteration counts come from the solver's statistics, not from the hook)."""
    calls = []

    class RaiseIterations(StepHooks):
        def __init__(self, model):
            self.stacks = find_stacks(model)

        def scope(self, step):
            calls.append(("scope", step))
            if step == 2:
                for stack in self.stacks:
                    stack.configure(fwd_iters=3)
            return contextlib.nullcontext()

        def after_backward(self):
            calls.append("after_backward")
            return False

        def before_update(self):
            calls.append("before_update")

        def after_update(self):
            calls.append("after_update")
            return {"raised": self.stacks[0].mgrit.fwd_iters > 1}

    seed_everything(0)
    task = build_task(_synthetic())
    trainer = Trainer(task, TrainConfig(mode="parallel", steps=4, print_every=100),
                      hooks=[RaiseIterations(task.model)])
    trainer.fit()
    assert calls == [c for step in range(4) for c in (("scope", step), "after_backward",
                                                        "before_update", "after_update")]
    assert [r["fwd_iters"] for r in trainer.history] == [1, 1, 3, 3]
    assert [r["raised"] for r in trainer.history] == [False, False, True, True]

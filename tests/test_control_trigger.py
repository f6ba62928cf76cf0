"""The controller's gradient trigger: the relative error of the production gradient, estimated at
a probe from a reference pass at the production counts and the probe's pass at higher counts.
Oracles are computed independently: two deep copies of the model, one per iteration count."""
import copy
import math

import pytest
import torch
from torch import nn

from xbraid_transformers import LayerParallel, MGRITConfig
from xbraid_transformers.app.tasks import TaskConfig, build_task
from xbraid_transformers.app.trainer import TrainConfig, Trainer
from xbraid_transformers.control import AdaptiveController, ControlConfig
from xbraid_transformers.models import GPT, GPTConfig, ParallelConfig

PROBE = 4          # probe iterations used throughout (ControlConfig.probe_iters)


def _stack(seed=0, layers=16, width=4, gain=3.0):
    """A linear ODE stack whose one-iteration MGRIT gradient is visibly inexact."""
    torch.manual_seed(seed)
    linears = [nn.Linear(width, width) for _ in range(layers)]
    with torch.no_grad():
        for lin in linears:
            lin.weight.mul_(gain)
    return LayerParallel(linears, mgrit=MGRITConfig(levels=3, cfactor=2, relax="F", fwd_iters=1,
                                                    bwd_iters=1, skip_first_downcycle=False))


def _data(width=4, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=g), torch.randn(n, width, generator=g)


def _loss(model, data):
    x, y = data
    return ((model(x) - y) ** 2).mean()


def _grads(model, data, fwd, bwd):
    model.configure(fwd_iters=fwd, bwd_iters=bwd)
    model.zero_grad(set_to_none=True)
    _loss(model, data).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()


def _oracle(model, data, production=(1, 1), probe=(PROBE, PROBE)):
    """(relative error, cosine, probe gradient) from two independent copies of ``model``."""
    g_k = _grads(copy.deepcopy(model), data, *production)
    g_p = _grads(copy.deepcopy(model), data, *probe)
    return ((g_k - g_p).norm() / g_p.norm()).item(), (g_k @ g_p / (g_k.norm() * g_p.norm())).item(), g_p


def _controlled_step(ctl, model, data):
    """One step of the documented protocol (no optimizer: the gradients are left in place)."""
    probe = ctl.before_step()
    passes, again = 0, True
    while again:
        passes += 1
        _loss(model, data).backward()
        again = ctl.after_backward()
    return probe, passes, ctl.after_step()


# ------------------------------------------------------------------ options
def test_defaults_keep_the_rho_trigger():
    cfg = ControlConfig()
    assert cfg.trigger == "rho" and cfg.grad_threshold == 0.5


@pytest.mark.parametrize("options", [dict(trigger="grad"), dict(trigger=None),
                                     dict(grad_threshold=0), dict(grad_threshold=-0.1),
                                     dict(grad_threshold=math.nan), dict(grad_threshold=math.inf),
                                     dict(grad_threshold=True), dict(grad_threshold="0.5")])
def test_invalid_trigger_options_are_rejected(options):
    with pytest.raises(ValueError):
        ControlConfig(**options)


def test_rho_trigger_needs_no_second_pass_and_leaves_gradients_alone():
    model, data = _stack(), _data()
    ctl = AdaptiveController(model, probe_every=1, probe_iters=PROBE, threshold=100.0)
    assert ctl.before_step() is True
    _loss(model, data).backward()
    before = [p.grad.clone() for p in model.parameters()]
    assert ctl.after_backward() is False
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
    decision = ctl.after_step()
    assert decision.gradient is None and decision.grad_error is None


# ------------------------------------------------------------------ the estimate
def test_gradient_error_equals_two_independent_copies():
    model, data = _stack(), _data()
    error, cosine, g_p = _oracle(model, data)
    assert 0.01 < error < 10          # the production gradient is visibly inexact
    ctl = AdaptiveController(model, probe_every=1, probe_iters=PROBE, trigger="gradient",
                             grad_threshold=100.0)
    probe, passes, decision = _controlled_step(ctl, model, data)
    assert probe and passes == 2
    assert decision.grad_error == pytest.approx(error, rel=1e-6)
    assert decision.gradient["cosine"] == pytest.approx(cosine, rel=1e-6)
    assert decision.gradient["production_iters"] == [[1, 1]]
    assert decision.gradient["probe_iters"] == [[PROBE, PROBE]]
    # the gradient left for the optimizer is the probe's, not the sum of both passes
    left = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
    assert torch.allclose(left, g_p, rtol=1e-6, atol=1e-9)
    # the production counts are back after the probe
    assert (model.mgrit.fwd_iters, model.mgrit.bwd_iters) == (1, 1)
    # the rho of the probe pass is measured and logged as with the rho trigger
    assert decision.rho["forward"] is not None


@pytest.mark.parametrize("factor, action", [(1.02, "none"), (0.98, "serial")])
def test_switches_exactly_when_the_error_crosses_the_threshold(factor, action):
    model, data = _stack(), _data()
    error = _oracle(model, data)[0]
    ctl = AdaptiveController(model, probe_every=1, probe_iters=PROBE, trigger="gradient",
                             grad_threshold=factor * error, action="serial")
    decision = _controlled_step(ctl, model, data)[2]
    assert decision.action == action
    assert (ctl.switch_step == 0) is (action == "serial")
    assert model.parallel is (action == "none")
    assert f"{error:.4g}" in decision.reason


def test_increase_doubles_both_directions():
    model, data = _stack(), _data()
    ctl = AdaptiveController(model, probe_every=1, probe_iters=PROBE, trigger="gradient",
                             grad_threshold=1e-6, action="increase")
    decision = _controlled_step(ctl, model, data)[2]
    assert decision.action == "increase"
    assert ctl.iters == [[2, 2]] and (model.mgrit.fwd_iters, model.mgrit.bwd_iters) == (2, 2)


def test_reference_pass_replays_the_random_state_and_the_dropout_masks():
    """Equal production and probe counts: the two passes must give the same gradient, which
    needs torch's generator (embedding dropout) and the stack's dropout counters rewound."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, d_model=16, n_heads=2, num_layers=4,
                          dropout=0.3, parallel=ParallelConfig(
                              mgrit=MGRITConfig(levels=2, cfactor=2, fwd_iters=2, bwd_iters=2))))
    model.layer_parallel().train()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(11, (4, 8), generator=g)
    ctl = AdaptiveController(model, probe_every=1, probe_iters=2, trigger="gradient",
                             grad_threshold=100.0)
    ctl.before_step()
    again = True
    while again:
        model(x, x)[1].backward()
        again = ctl.after_backward()
    decision = ctl.after_step()
    assert decision.grad_error == pytest.approx(0.0, abs=1e-6)
    # without the rewind two passes differ (the check is not vacuous)
    a = copy.deepcopy(model)
    a.zero_grad(set_to_none=True)
    a(x, x)[1].backward()
    first = torch.cat([p.grad.reshape(-1) for p in a.parameters() if p.grad is not None])
    a.zero_grad(set_to_none=True)
    a(x, x)[1].backward()
    second = torch.cat([p.grad.reshape(-1) for p in a.parameters() if p.grad is not None])
    assert (first - second).norm() > 1e-3 * second.norm()


def test_a_probe_without_after_backward_is_an_error_and_restores_the_counts():
    model, data = _stack(), _data()
    ctl = AdaptiveController(model, probe_every=1, probe_iters=PROBE, trigger="gradient")
    ctl.before_step()
    _loss(model, data).backward()
    with pytest.raises(RuntimeError, match="after_backward"):
        ctl.after_step()
    assert (model.mgrit.fwd_iters, model.mgrit.bwd_iters) == (1, 1) and not ctl.probing


# ------------------------------------------------------------------ state and the trainer
def test_state_dict_round_trip_keeps_the_gradient_evidence(tmp_path):
    model, data = _stack(), _data()
    ctl = AdaptiveController(model, probe_every=2, probe_iters=PROBE, trigger="gradient",
                             grad_threshold=100.0)
    for _ in range(5):
        _controlled_step(ctl, model, data)
    assert [s for s, _ in ctl.grad_errors] == [0, 2, 4]
    path = tmp_path / "ctl.pt"
    torch.save(ctl.state_dict(), path)
    other = AdaptiveController(_stack(), probe_every=2, probe_iters=PROBE, trigger="gradient",
                               grad_threshold=100.0)
    other.load_state_dict(torch.load(path, weights_only=True))
    assert other.grad_errors == ctl.grad_errors and other.step == 5
    assert [d.as_dict() for d in other.decisions] == [d.as_dict() for d in ctl.decisions]
    assert other.state_dict()["config"]["trigger"] == "gradient"


def _growth(trigger, threshold, steps=20):
    task = build_task(TaskConfig(name="growth", layers=16, d_model=8, batch_size=32,
                                 mgrit=MGRITConfig(levels=2, cfactor=4, relax="F", fwd_iters=2,
                                                   bwd_iters=1)))
    control = ControlConfig(probe_every=4, trigger=trigger, threshold=threshold,
                            grad_threshold=threshold)
    trainer = Trainer(task, TrainConfig(mode="adaptive", steps=steps, lr=3e-2, clip=0.0,
                                        progress=False, virtual_time=False, control=control))
    return trainer.fit(), trainer.history


def test_trainer_run_is_the_rho_runs_until_a_switch_and_records_the_error():
    """The reference pass changes nothing the optimizer sees: with thresholds that never fire,
    the losses of the two triggers' runs are identical; the gradient run records its errors."""
    _, rho_hist = _growth("rho", 1e6)
    summary, grad_hist = _growth("gradient", 1e6)
    assert [r["loss"] for r in grad_hist] == [r["loss"] for r in rho_hist]
    errors = [r["grad_error"] for r in grad_hist if r["probe"]]
    assert len(errors) == 5 and all(e > 0 for e in errors)
    assert [d["gradient"]["relative_error"] for d in summary["decisions"]] == errors
    # a threshold between the first and the largest error switches at the first probe above it
    threshold = (errors[0] + max(errors)) / 2
    first = next(4 * i for i, e in enumerate(errors) if e > threshold)
    switched, _ = _growth("gradient", threshold)
    assert switched["switch_step"] == first

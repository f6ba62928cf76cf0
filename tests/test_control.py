"""AdaptiveController on scripted residual sequences (known answers) and on a real module."""
import pytest
import torch
from torch import nn

from xbraid_transformers import LayerParallel, MGRITConfig, SolveStats
from xbraid_transformers.control import AdaptiveController, ControlConfig, Measurement


def _module(layers=4, fwd=1, bwd=1):
    torch.manual_seed(0)
    return LayerParallel([nn.Linear(3, 3) for _ in range(layers)],
                         mgrit=MGRITConfig(levels=2, cfactor=2, fwd_iters=fwd, bwd_iters=bwd))


def _probe(ctl, module, fwd, bwd, norm=1.0):
    """One step in which the solve reports the scripted residuals; the state norms (what the
    probe's hooks record) are ``norm``, scaled by sqrt(#C-points) = sqrt(2) here."""
    probe = ctl.before_step()
    if probe:
        ctl._probe._norms = {0: {"forward": torch.tensor(norm), "backward": torch.tensor(norm)}}
        module.stats = SolveStats(fwd_iters=len(fwd) + 1, bwd_iters=len(bwd) + 1,
                                  fwd_residuals=list(fwd), bwd_residuals=list(bwd))
    return ctl.after_step()


def _scripted(ctl, module, rhos, start=1.0):
    """Probes whose final forward factor is each of ``rhos`` (backward converges fast)."""
    out = []
    for rho in rhos:
        out.append(_probe(ctl, module, [start, start * rho], [start, start * 0.1]))
    return out


def test_switches_exactly_when_rho_crosses_the_threshold():
    module = _module()
    ctl = AdaptiveController(module, probe_every=1, threshold=1.0, action="serial", floor=0.0)
    decisions = _scripted(ctl, module, [0.3, 0.7, 0.99, 1.0, 1.02])
    assert [d.action for d in decisions] == ["none", "none", "none", "none", "serial"]
    assert ctl.switch_step == 4 and ctl.mode == "serial" and module.parallel is False
    assert decisions[-1].rho["forward"] == pytest.approx(1.02)
    # serial from then on: no more probes, iterations untouched
    assert ctl.before_step() is False and ctl.after_step() is None


def test_probe_schedule_and_probe_iterations_restored():
    module = _module(fwd=2, bwd=1)
    ctl = AdaptiveController(module, probe_every=3, action="serial")
    probes = []
    for step in range(7):
        probe = ctl.before_step()
        probes.append(probe)
        if probe:  # twice the production count, at least 3 (two residuals with the skip)
            assert (module.mgrit.fwd_iters, module.mgrit.bwd_iters) == (4, 3)
        ctl.after_step()
        assert (module.mgrit.fwd_iters, module.mgrit.bwd_iters) == (2, 1)
    assert probes == [True, False, False, True, False, False, True]


def test_rho_below_the_round_off_floor_is_ignored():
    module = _module()
    ctl = AdaptiveController(module, probe_every=1, threshold=1.0, floor=1e-5)
    # residuals far below 1e-5 * ||u|| = 1e-5 * 10: rho = 2 but meaningless
    d = _probe(ctl, module, [1e-8, 2e-8], [1e-9, 3e-9], norm=10.0)
    assert d.action == "none" and d.rho == {"forward": None, "backward": None}
    assert all(m.below_floor and not m.usable for m in d.measurements)
    assert ctl.mode == "parallel"
    # the same factor above the floor acts
    d = _probe(ctl, module, [1e-2, 2e-2], [1e-3, 1e-4], norm=10.0)
    assert d.action == "serial" and d.rho["forward"] == pytest.approx(2.0)


def test_backward_rho_alone_triggers():
    module = _module()
    ctl = AdaptiveController(module, probe_every=1, floor=0.0)
    d = _probe(ctl, module, [1.0, 0.1], [1.0, 1.5])
    assert d.action == "serial" and "backward" in d.reason


def test_increase_doubles_the_crossing_direction_up_to_the_cap():
    module = _module(fwd=2, bwd=1)
    ctl = AdaptiveController(module, probe_every=1, action="increase", max_iters=5, floor=0.0)
    actions, iters = [], []
    for _ in range(4):
        d = _probe(ctl, module, [1.0, 1.2], [1.0, 0.5])
        actions.append(d.action)
        iters.append((module.mgrit.fwd_iters, module.mgrit.bwd_iters))
    assert actions == ["increase", "increase", "at-cap", "at-cap"]
    assert iters == [(4, 1), (5, 1), (5, 1), (5, 1)]
    assert ctl.mode == "parallel"


def test_increase_then_serial_falls_back_at_the_cap():
    module = _module(fwd=1, bwd=1)
    ctl = AdaptiveController(module, probe_every=1, action="increase-then-serial", max_iters=2,
                             floor=0.0)
    d1 = _probe(ctl, module, [1.0, 1.1], [1.0, 0.1])
    d2 = _probe(ctl, module, [1.0, 1.1], [1.0, 0.1])
    assert (d1.action, d2.action) == ("increase", "serial")
    assert ctl.switch_step == 1 and module.parallel is False


def test_too_few_residuals_gives_no_rho():
    m = Measurement(0, "forward", 1, [0.5], 1.0, 1e-5)
    assert m.rho is None and not m.usable


def test_state_round_trip():
    module = _module(fwd=2, bwd=1)
    ctl = AdaptiveController(module, probe_every=2, action="increase", max_iters=8, floor=0.0)
    _scripted(ctl, module, [0.5, 0.5, 1.5])
    module.dropout.micro_batch = 17
    state = ctl.state_dict()
    other_module = _module(fwd=2, bwd=1)
    other = AdaptiveController(other_module, config=ctl.config)
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert other.step == 3 and other_module.mgrit.fwd_iters == 4
    assert other_module.dropout.micro_batch == 17
    assert [d.as_dict() for d in other.decisions] == [d.as_dict() for d in ctl.decisions]


def test_real_probe_measures_a_converging_solve():
    module = _module(layers=8, fwd=1, bwd=1)
    module.configure(relax="F")
    ctl = AdaptiveController(module, probe_every=1, floor=0.0)
    ctl.before_step()
    x = torch.randn(4, 3, requires_grad=True)
    module(x).pow(2).sum().backward()
    d = ctl.after_step()
    assert [m.iterations for m in d.measurements] == [3, 3]
    assert all(len(m.residuals) == 2 and m.state_norm > 0 for m in d.measurements)
    assert d.action == "none" and 0 <= d.rho["forward"] < 1
    assert (module.mgrit.fwd_iters, module.mgrit.bwd_iters) == (1, 1)


def test_config_validation():
    with pytest.raises(ValueError, match="action"):
        ControlConfig(action="sometimes")
    with pytest.raises(ValueError, match="probe_every"):
        ControlConfig(probe_every=0)
    with pytest.raises(ValueError, match="no LayerParallel"):
        AdaptiveController(nn.Linear(2, 2))

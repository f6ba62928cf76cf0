"""Invariants of the generic MGRIT solver on analytic and nonlinear ODEs."""
import math

import pytest
import torch
from problems import dahlquist_backward_euler, nonlinear_step, serial_states

from xbraid_transformers import MGRITConfig
from xbraid_transformers.mgrit import MGRITDivergenceError, solve

F64 = torch.float64


def max_error(states, reference):
    return max(float((a - b).abs().max()) for a, b in zip(states, reference))


def test_one_level_is_bit_identical_to_serial_stepping():
    u0 = torch.randn(3, 4, dtype=F64)
    result = solve(nonlinear_step, u0, 17, 0.05, MGRITConfig(levels=1))
    for a, b in zip(result.states, serial_states(nonlinear_step, u0, 17, 0.05)):
        assert torch.equal(a, b)
    assert result.residuals == [] and result.iterations == 0


def test_dahlquist_converges_to_the_closed_form():
    # Backward Euler on u' = -u: u_n = (1 + h)^-n exactly.
    n, h = 64, 0.1
    cfg = MGRITConfig(levels=3, cfactor=4, relax="FCF", fwd_iters=30, tol=1e-14,
                      initial_guess="zeros")
    result = solve(dahlquist_backward_euler(), torch.ones(1, dtype=F64), n, h, cfg)
    exact = [(1 + h) ** -k for k in range(n + 1)]
    assert result.converged
    assert max(abs(float(u) - e) for u, e in zip(result.states, exact)) < 1e-13


@pytest.mark.parametrize("relax, sweeps", [("F", 0), ("FCF", 1), ("FCFCF", 2)])
@pytest.mark.parametrize("cfactor", [2, 4])
def test_two_levels_are_exact_after_the_bound(relax, sweeps, cfactor):
    num_steps, h = 32, 0.2
    u0 = torch.randn(5, dtype=F64)
    reference = serial_states(nonlinear_step, u0, num_steps, h)
    bound = math.ceil(num_steps // cfactor / (sweeps + 1))
    errors = []
    cfg = MGRITConfig(levels=2, cfactor=cfactor, relax=relax, skip_first_downcycle=False,
                      initial_guess="zeros")
    solve(nonlinear_step, u0, num_steps, h, cfg, max_iters=bound,
          callback=lambda k, states: errors.append(max_error(states, reference)))
    assert len(errors) == bound
    assert errors[-1] < 1e-14          # exact (round-off) at the bound
    if cfactor == 4:                   # and not before (with cfactor 2 it converges too fast to see)
        assert errors[-2] > 1e-8


@pytest.mark.parametrize("levels, cycle", [(2, "V"), (3, "V"), (3, "F")])
def test_serial_solution_is_a_fixed_point(levels, cycle):
    u0 = torch.randn(2, 3, dtype=F64)
    reference = serial_states(nonlinear_step, u0, 24, 0.05)
    cfg = MGRITConfig(levels=levels, cfactor=2, cycle=cycle, skip_first_downcycle=False)
    result = solve(nonlinear_step, u0, 24, 0.05, cfg, max_iters=2, initial_states=reference)
    assert max(result.residuals) < 1e-15
    assert max_error(result.states, reference) < 1e-15


def test_warm_start_changes_iterations_not_the_answer():
    """A warm start also turns off the skipped first down-cycle: skipping it would replace the
    good C-point values by a coarse propagation."""
    n, h = 48, 0.05
    u0 = torch.randn(4, dtype=F64)
    cfg = MGRITConfig(levels=3, cfactor=2, fwd_iters=50, tol=1e-12)
    cold = solve(nonlinear_step, u0, n, h, cfg)
    # a nearby solution (another initial value) as the warm start
    nearby = solve(nonlinear_step, u0 + 1e-3, n, h, cfg).states
    warm = solve(nonlinear_step, u0, n, h, cfg, initial_states=nearby)
    assert cold.converged and warm.converged
    assert warm.iterations < cold.iterations
    assert max_error(warm.states, cold.states) < 1e-11
    assert max_error(warm.states, serial_states(nonlinear_step, u0, n, h)) < 1e-11


def test_residuals_and_factors_follow_the_xbraid_convention():
    n, h = 32, 0.1
    u0 = torch.ones(1, dtype=F64)
    cfg = MGRITConfig(levels=2, cfactor=4, relax="F", skip_first_downcycle=True, fwd_iters=4,
                      initial_guess="zeros")
    result = solve(dahlquist_backward_euler(), u0, n, h, cfg)
    # skip: the first iteration computes no residual, so 4 iterations give 3 residuals
    assert result.iterations == 4 and len(result.residuals) == 3
    assert result.factors == pytest.approx([result.residuals[1] / result.residuals[0],
                                            result.residuals[2] / result.residuals[1]])
    assert all(f < 1 for f in result.factors)


def test_residual_norm_is_computed_at_the_c_points_after_relaxation():
    """One iteration by hand: F-relax from the initial guess, then r_c = Phi(u_{c-1}) - u_c."""
    n, h, m = 8, 0.5, 2
    step = dahlquist_backward_euler()
    u0 = torch.tensor([1.0], dtype=F64)
    cfg = MGRITConfig(levels=2, cfactor=m, relax="F", skip_first_downcycle=False, fwd_iters=1,
                      initial_guess=lambda k, u: torch.full_like(u, 0.5))
    result = solve(step, u0, n, h, cfg)
    u = [1.0] + [0.5] * n
    for i in range(1, n + 1, m):  # F-points follow their C-point
        u[i] = u[i - 1] / (1 + h)
    expected = math.sqrt(sum((u[c - 1] / (1 + h) - u[c]) ** 2 for c in range(m, n + 1, m)))
    assert result.residuals == [pytest.approx(expected, rel=1e-14)]


def test_tolerances_stop_the_iteration():
    n, h = 64, 0.05
    u0 = torch.randn(3, dtype=F64)
    cfg = MGRITConfig(levels=2, cfactor=4, fwd_iters=100, tol=1e-6)
    result = solve(nonlinear_step, u0, n, h, cfg)
    assert result.converged and result.residuals[-1] <= 1e-6 < result.residuals[-2]
    rel = solve(nonlinear_step, u0, n, h, MGRITConfig(levels=2, cfactor=4, fwd_iters=100, rtol=1e-3))
    assert rel.converged and rel.residuals[-1] <= 1e-3 * rel.residuals[0] < rel.residuals[-2]


def test_steps_not_divisible_by_the_cfactor():
    """XBraid allows a trailing partial interval; the solution is still the serial one."""
    u0 = torch.randn(2, dtype=F64)
    for n in (21, 22, 23):
        cfg = MGRITConfig(levels=3, cfactor=2, fwd_iters=40, tol=1e-14)
        result = solve(nonlinear_step, u0, n, 0.05, cfg)
        assert result.converged
        assert max_error(result.states, serial_states(nonlinear_step, u0, n, 0.05)) < 1e-13


def test_nan_input_and_diverging_solves_raise():
    cfg = MGRITConfig(levels=2, cfactor=2, fwd_iters=5)
    with pytest.raises(MGRITDivergenceError, match="u0"):
        solve(nonlinear_step, torch.tensor([float("nan")]), 8, 0.1, cfg)
    # forward Euler on u' = 50 u blows up on the coarse grid and overflows
    def exploding(u, n, dt):
        return u + dt * 1e30 * u
    with pytest.raises(MGRITDivergenceError, match="diverged|NaN or Inf"):
        solve(exploding, torch.ones(1), 64, 1.0, MGRITConfig(levels=2, cfactor=2, fwd_iters=5))
    with pytest.raises(MGRITDivergenceError, match="final state"):
        solve(exploding, torch.ones(1), 64, 1.0, MGRITConfig(levels=1))


def test_bad_arguments():
    cfg = MGRITConfig(levels=3, cfactor=4)
    with pytest.raises(ValueError, match="at least 16 steps"):
        solve(nonlinear_step, torch.ones(1), 8, 0.1, cfg)
    with pytest.raises(ValueError, match="num_steps"):
        solve(nonlinear_step, torch.ones(1), 0, 0.1, cfg)
    with pytest.raises(ValueError, match="initial_states"):
        solve(nonlinear_step, torch.ones(1), 16, 0.1, cfg, initial_states=[torch.ones(1)] * 3)
    bad_guess = MGRITConfig(initial_guess=lambda n, u: torch.zeros(2))
    with pytest.raises(ValueError, match="shape"):
        solve(nonlinear_step, torch.ones(1), 16, 0.1, bad_guess)

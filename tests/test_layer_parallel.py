"""LayerParallel: MGRIT forward + adjoint against autograd through the serial network."""
import copy
import math

import pytest
import torch
from problems import TanhLayer, serial_reference
from torch import nn

import xbraid_transformers as xbt

CONVERGED = dict(fwd_iters=40, bwd_iters=40, tol=1e-13)


def make_stack(num_layers=16, width=6, dtype=torch.float64, seed=0, **mgrit):
    torch.manual_seed(seed)
    layers = [TanhLayer(width, scale=1.5).to(dtype) for _ in range(num_layers)]
    options = dict(levels=2, cfactor=4)
    options.update(mgrit)
    return xbt.LayerParallel(layers, mgrit=xbt.MGRITConfig(**options))


def run(module, x, weights, **ctx):
    """Loss = <output, weights>; returns output, loss, input grad and parameter grads."""
    x = x.detach().clone().requires_grad_()
    module.zero_grad()
    out = module(x, **ctx)
    loss = (out * weights).sum()
    loss.backward()
    return out.detach(), loss.detach(), x.grad, [p.grad.clone() for p in module.parameters()]


def assert_parity(parallel, x, weights, atol, rtol, **ctx):
    serial_out, serial_loss, serial_dx, serial_dp = run(copy.deepcopy(parallel).serial(), x, weights, **ctx)
    out, loss, dx, dp = run(parallel, x, weights, **ctx)
    torch.testing.assert_close(out, serial_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(loss, serial_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(dx, serial_dx, atol=atol, rtol=rtol)
    assert len(dp) == len(serial_dp) == 2 * len(parallel.layers)
    for a, b in zip(dp, serial_dp):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("mgrit", [
    dict(levels=2, cfactor=4, relax="F"),
    dict(levels=2, cfactor=2, relax="FCF", skip_first_downcycle=False),
    dict(levels=3, cfactor=2, relax=["F", "FCF"], cycle="V"),
    dict(levels=3, cfactor=[2, 4], relax="FCF", cycle="F"),
    dict(levels=1),
])
def test_converged_mgrit_equals_serial_autograd_float64(mgrit):
    module = make_stack(16, **mgrit, **CONVERGED)
    x, weights = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    assert_parity(module, x, weights, atol=1e-10, rtol=1e-10)
    stats = module.stats
    if mgrit["levels"] > 1:
        assert stats.fwd_residuals[-1] <= 1e-13 and stats.bwd_residuals[-1] <= 1e-13


def test_serial_autograd_reference_is_the_plain_loop():
    """The serial mode is the plain recursion x + h F(x) (guards the reference itself)."""
    module = make_stack(8).serial()
    x = torch.randn(2, 6, dtype=torch.float64)
    torch.testing.assert_close(module(x), serial_reference(module.layers, x, 1 / 8), rtol=0, atol=0)


def test_converged_mgrit_equals_serial_autograd_float32():
    module = make_stack(32, dtype=torch.float32, levels=2, cfactor=4, fwd_iters=30, bwd_iters=30,
                        tol=1e-6)
    x, weights = torch.randn(4, 6), torch.randn(4, 6)
    assert_parity(module, x, weights, atol=1e-5, rtol=1e-5)


def test_gradcheck_through_the_mgrit_function():
    module = make_stack(8, width=3, levels=2, cfactor=2, **CONVERGED)
    module.retain_graph = True              # gradcheck backpropagates once per output entry
    names = ["layers.3.linear.weight", "layers.6.linear.bias"]
    params = dict(module.named_parameters())

    def f(x, w, b):
        return torch.func.functional_call(module, {**params, names[0]: w, names[1]: b}, (x,))

    inputs = (torch.randn(2, 3, dtype=torch.float64, requires_grad=True),
              *(params[n].detach().clone().requires_grad_() for n in names))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8)


def test_a_second_backward_without_retain_graph_is_refused():
    module = make_stack(8, levels=2, cfactor=2)
    out = module(torch.randn(2, 6, dtype=torch.float64, requires_grad=True)).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        out.backward()


def test_inexact_gradients_improve_with_iterations():
    x, weights = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    reference = make_stack(32, levels=2, cfactor=4).serial()
    _, _, ref_dx, ref_dp = run(reference, x, weights)
    errors = []
    for iters in (1, 2, 3, 4):
        module = make_stack(32, levels=2, cfactor=4, relax="F", skip_first_downcycle=False,
                            fwd_iters=iters, bwd_iters=iters)
        _, _, dx, dp = run(module, x, weights)
        err = (dx - ref_dx).norm() + sum((a - b).norm() for a, b in zip(dp, ref_dp))
        errors.append(float(err))
    assert errors[0] > 1e-6                 # one iteration is visibly inexact
    assert all(b < 0.5 * a for a, b in zip(errors, errors[1:])), errors


def test_gradients_accumulate_over_micro_batches():
    module = make_stack(16, **CONVERGED)
    x1, x2 = torch.randn(2, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    module.zero_grad()
    module(x1).sum().backward()
    module(x2).sum().backward()            # a different batch size on the second call
    accumulated = [p.grad.clone() for p in module.parameters()]
    reference = copy.deepcopy(module).serial()
    reference.zero_grad()
    (reference(x1).sum() + reference(x2).sum()).backward()
    for a, b in zip(accumulated, reference.parameters()):
        torch.testing.assert_close(a, b.grad, atol=1e-10, rtol=1e-10)


def test_two_forwards_before_one_backward():
    module = make_stack(16, **CONVERGED)
    x1, x2 = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    module.zero_grad()
    (module(x1).sum() + 2 * module(x2).sum()).backward()
    reference = copy.deepcopy(module).serial()
    reference.zero_grad()
    (reference(x1).sum() + 2 * reference(x2).sum()).backward()
    for a, b in zip(module.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-10)


def test_context_tensors_reach_every_layer_and_get_gradients():
    module = make_stack(16, **CONVERGED)
    x, weights = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    shift = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    out = module(x, shift=shift)
    (out * weights).sum().backward()
    reference = copy.deepcopy(module).serial()
    shift_ref = shift.detach().clone().requires_grad_()
    out_ref = reference(x, shift=shift_ref)
    (out_ref * weights).sum().backward()
    torch.testing.assert_close(out, out_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(shift.grad, shift_ref.grad, atol=1e-10, rtol=1e-10)


def test_stats_and_modes():
    module = make_stack(16, fwd_iters=3, bwd_iters=2, skip_first_downcycle=True)
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    module(x).sum().backward()
    stats = module.stats
    assert (stats.mode, stats.fwd_iters, stats.bwd_iters) == ("parallel", 3, 2)
    assert len(stats.fwd_residuals) == 2 and len(stats.bwd_residuals) == 1
    assert stats.fwd_factors == [stats.fwd_residuals[1] / stats.fwd_residuals[0]]
    module.serial()
    module(x)
    assert module.stats.mode == "serial" and module.stats.fwd_residuals == []
    module.configure(fwd_iters=5)
    assert module.mgrit.fwd_iters == 5 and module.mgrit.cfactors == (4,)


def test_warm_start_reuses_the_previous_states():
    module = make_stack(32, levels=2, cfactor=4, fwd_iters=1, bwd_iters=1, warm_start=True,
                        skip_first_downcycle=False)
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        first = module(x)
        residual_cold = module.stats.fwd_residuals[0]
        second = module(x)                 # same input: starts from the first solve's states
        residual_warm = module.stats.fwd_residuals[0]
        exact = copy.deepcopy(module).serial()(x)
    assert residual_warm < 0.1 * residual_cold
    assert (second - exact).norm() < 0.1 * (first - exact).norm()
    with torch.no_grad():
        module(torch.randn(5, 6, dtype=torch.float64))   # another batch size starts cold
    module.reset_warm_start()


def test_no_grad_forward_records_no_graph():
    module = make_stack(16, **CONVERGED)
    x = torch.randn(2, 6, dtype=torch.float64)
    with torch.no_grad():
        out = module(x)
    assert out.grad_fn is None
    torch.testing.assert_close(out, copy.deepcopy(module).serial()(x), atol=1e-10, rtol=1e-10)


def test_layer_counts_that_do_not_fit_the_hierarchy_are_refused():
    layers = [TanhLayer(4) for _ in range(12)]
    with pytest.raises(ValueError, match="multiple of the product of the cfactors"):
        xbt.LayerParallel(layers, mgrit=xbt.MGRITConfig(levels=3, cfactor=[2, 4]))
    module = xbt.LayerParallel(layers, mgrit=xbt.MGRITConfig(levels=2, cfactor=4))
    with pytest.raises(ValueError, match="multiple"):
        module.configure(cfactor=8)
    with pytest.raises(TypeError, match="floating-point"):
        module(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one layer"):
        xbt.LayerParallel([])


def test_nan_input_raises_a_clear_error():
    module = make_stack(16)
    x = torch.randn(2, 6, dtype=torch.float64)
    x[0, 0] = math.nan
    with pytest.raises(xbt.mgrit.MGRITDivergenceError, match="NaN"):
        module(x)


def test_diverging_solve_raises_instead_of_returning_garbage():
    # step size 1 with huge weights: the coarse step x + 4 F(x) explodes in float32
    torch.manual_seed(0)
    layers = [nn.Linear(4, 4) for _ in range(16)]
    for layer in layers:
        nn.init.constant_(layer.weight, 1e9)
    module = xbt.LayerParallel(layers, step_size=1.0, mgrit=xbt.MGRITConfig(levels=2, cfactor=4, fwd_iters=3))
    with pytest.raises(xbt.mgrit.MGRITDivergenceError):
        module(torch.randn(2, 4))


def _input_gradient_norm(network, x):
    """d/dx of ||d loss / dx||^2: a second-order quantity (a gradient penalty)."""
    x = x.detach().clone().requires_grad_()
    (dx,) = torch.autograd.grad(network(x).square().sum(), x, create_graph=True)
    (ddx,) = torch.autograd.grad(dx.square().sum(), x)
    return ddx


def test_second_order_gradients_are_exact_in_serial_mode():
    module = make_stack(8).serial()
    plain = nn.Sequential(*copy.deepcopy(list(module.layers)))
    x = torch.randn(3, 6, dtype=torch.float64)

    def euler(x):  # the same forward Euler steps through plain autograd: the oracle
        for layer in plain:
            x = x + module.step_size * layer(x)
        return x

    torch.testing.assert_close(_input_gradient_norm(module, x), _input_gradient_norm(euler, x))


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("create_graph_on", ["autograd.grad", "backward"])
def test_second_order_gradients_through_mgrit_are_refused(create_graph_on):
    module = make_stack(8, **CONVERGED)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    loss = module(x).square().sum()
    with pytest.raises(RuntimeError, match=r"create_graph=True.*serial\(\)"):
        if create_graph_on == "backward":
            loss.backward(create_graph=True)
        else:
            torch.autograd.grad(loss, x, create_graph=True)


def _old_and_new_range_names(comm):
    stack = xbt.LayerParallel([nn.Linear(2, 2) for _ in range(8)], comm=comm,
                              mgrit=xbt.MGRITConfig(levels=2, cfactor=2))
    with pytest.warns(DeprecationWarning, match="now layer_ranges"):
        blocks = stack.blocks
    with pytest.warns(DeprecationWarning, match="now owned_range"):
        block = stack.block
    with pytest.warns(DeprecationWarning, match="now coarse_ranges"):
        coarse = stack.coarse_blocks(2, 1)
    return dict(blocks=blocks, block=block, coarse=coarse, ranges=stack.layer_ranges,
                owned=stack.owned_range, coarse_ranges=stack.coarse_ranges(2, 1))


def test_the_old_names_of_layer_ranges_still_answer_with_a_deprecation_warning():
    """``blocks``/``block``/``coarse_blocks`` were the names of the ranks' layer ranges (a
    "block" is a transformer block now); users' code that reads them keeps working."""
    from xbraid_transformers.mgrit.clock import emulate
    ranks = emulate(_old_and_new_range_names, 2, timeout=30.0)
    assert [r["ranges"] for r in ranks] == [[(0, 4), (4, 8)]] * 2
    assert [r["owned"] for r in ranks] == [(0, 4), (4, 8)]
    assert [r["coarse_ranges"] for r in ranks] == [[(0, 2), (2, 4)]] * 2
    for r in ranks:
        assert (r["blocks"], r["block"], r["coarse"]) == (r["ranges"], r["owned"], r["coarse_ranges"])
    # the solver's keyword and the adapters' class
    from xbraid_transformers import adapters
    from xbraid_transformers.mgrit import solve
    with pytest.warns(DeprecationWarning, match="now LayerParallelBlockList"):
        assert adapters.LayerParallelBlocks is adapters.LayerParallelBlockList
    u0, config = torch.ones(3), xbt.MGRITConfig(levels=1)
    with pytest.warns(DeprecationWarning, match=r"solve\(ranges=...\)"):
        old = solve(lambda u, n, dt: u + dt * u, u0, 4, 0.25, config, blocks=[(0, 4)])
    new = solve(lambda u, n, dt: u + dt * u, u0, 4, 0.25, config, ranges=[(0, 4)])
    assert torch.equal(old.states[-1], new.states[-1])
    assert torch.equal(new.states[-1], u0 * 1.25 ** 4)

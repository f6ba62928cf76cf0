"""Multilevel training in depth: coarse views, prolongation, schedules."""
import copy

import pytest
import torch
from problems import TanhLayer
from torch import nn

import xbraid_transformers as xbt
from xbraid_transformers.multilevel import (MultilevelSchedule, MultilevelStepper, Phase,
                                            coarse_view, prolongate, train_multilevel)


class Net(nn.Module):
    def __init__(self, num_layers=8, width=6, mgrit=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(3, width)
        self.stack = xbt.LayerParallel([TanhLayer(width) for _ in range(num_layers)],
                                       mgrit=mgrit or xbt.MGRITConfig(levels=2, cfactor=2))
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        return self.out(self.stack(self.inp(x)))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_restriction_then_prolongation_without_training_leaves_the_model_unchanged():
    model = Net()
    before = snapshot(model)
    x = torch.randn(5, 3)
    out = model(x)
    for offset in (0, 1):
        with coarse_view(model, 2, offset):
            model(x)
    after = snapshot(model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert torch.equal(model(x), out)
    assert len(model.stack.layers) == 8 and model.stack.step_size == pytest.approx(1 / 8)


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("parallel", [False, True])
def test_coarse_forward_equals_a_hand_built_half_depth_network(offset, parallel):
    cfg = xbt.MGRITConfig(levels=2, cfactor=2, fwd_iters=20, tol=1e-12)
    model = Net(8, mgrit=cfg).double()
    if not parallel:
        model.stack.serial()
    hand = xbt.LayerParallel([copy.deepcopy(model.stack.layers[i]) for i in range(offset, 8, 2)],
                             step_size=2 / 8).serial()
    x = torch.randn(4, 3, dtype=torch.float64)
    expected = model.out(hand(model.inp(x)))
    with coarse_view(model, 2, offset):
        assert model.stack.parallel == parallel   # 4 coarse layers still fit cfactor 2
        got = model(x)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


def test_a_coarse_step_updates_exactly_the_layers_of_its_view():
    model = Net(8)
    before = snapshot(model)
    data = torch.randn(16, 3), torch.randn(16, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = MultilevelSchedule((Phase(2, 1, 1),))
    train_multilevel(model, opt, lambda m, s: nn.functional.mse_loss(m(data[0]), data[1]), schedule)
    after = snapshot(model)
    for name in before:
        changed = not torch.equal(before[name], after[name])
        if name.startswith("stack.layers."):
            layer = int(name.split(".")[2])
            assert changed == (layer % 2 == 1), name
        else:
            assert changed, name    # input and output maps are shared by every view


def test_prolongation_copy_and_linear():
    model = Net(8)
    layers = model.stack.layers
    w0, w2 = layers[0].linear.weight.detach().clone(), layers[2].linear.weight.detach().clone()
    prolongate(model, 2, "linear")
    torch.testing.assert_close(layers[1].linear.weight, 0.5 * (w0 + w2))
    assert torch.equal(layers[0].linear.weight, w0)           # trained layers untouched
    w6 = layers[6].linear.weight.detach().clone()
    assert torch.equal(layers[7].linear.weight, w6)           # last block copies
    prolongate(model, 4, "copy")
    for i in (1, 2, 3):
        assert torch.equal(layers[i].linear.weight, w0)
    with pytest.raises(ValueError, match="method"):
        prolongate(model, 2, "cubic")


def test_mgopt_correction_makes_the_first_coarse_gradient_the_fine_one():
    model = Net(8).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    def loss_on(m, s):
        return nn.functional.mse_loss(m(x), y)
    fine = copy.deepcopy(model)
    fine_grads = torch.autograd.grad(loss_on(fine, 0), list(fine.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = snapshot(model)
    train_multilevel(model, opt, loss_on, MultilevelSchedule((Phase(2, 0, 1),), mgopt=True))
    # one SGD step with lr 1: the change is minus the (corrected) gradient
    names = [n for n, _ in fine.named_parameters()]
    for name, g in zip(names, fine_grads):
        delta = before[name] - model.state_dict()[name]
        in_view = not name.startswith("stack.layers.") or int(name.split(".")[2]) % 2 == 0
        torch.testing.assert_close(delta, g if in_view else torch.zeros_like(g), atol=1e-12, rtol=1e-10)


def test_nested_iteration_reaches_the_target_and_needs_its_coarse_steps():
    torch.manual_seed(3)
    x = torch.randn(64, 3)
    teacher = Net(8, seed=5)
    with torch.no_grad():
        y = teacher(x)
    def loss_on(m, s):
        return nn.functional.mse_loss(m(x), y)
    schedule = MultilevelSchedule.nested([60, 60, 5], method="copy")

    def final_loss(skip_coarse):
        model = Net(8, seed=1)
        model.stack.serial()
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        if skip_coarse:   # control: coarse phases do nothing
            original = opt.step
            opt.step = lambda: original() if len(model.stack.layers) == 8 else None
        train_multilevel(model, opt, loss_on, schedule)
        with torch.no_grad():
            return float(loss_on(model, 0))

    with torch.no_grad():
        start = float(loss_on(Net(8, seed=1), 0))
    trained, control = final_loss(False), final_loss(True)
    assert trained < 0.1 * start
    assert control > 3 * trained


def test_schedules_and_bad_input():
    v = MultilevelSchedule.v_cycle(coarse_steps=3, fine_steps=2, cycles=2)
    assert [(p.stride, p.offset, p.steps) for p in v] == [(2, 0, 3), (2, 1, 3), (1, 0, 2)] * 2
    assert v.total_steps == 16
    nested = MultilevelSchedule.nested([5, 6, 7])
    assert [(p.stride, p.steps, p.prolongate_after) for p in nested] == [(4, 5, "copy"), (2, 6, "copy"), (1, 7, None)]
    with pytest.raises(ValueError, match="optimizer_state"):
        MultilevelSchedule.v_cycle(1, 1, 1, optimizer_state="transfer-ish")
    with pytest.raises(ValueError, match="at least one step"):
        MultilevelSchedule((Phase(2, 0, 0),))
    with pytest.raises(ValueError, match="cannot be coarsened"):
        with coarse_view(Net(6, mgrit=xbt.MGRITConfig(levels=1)), 4):
            pass
    with pytest.raises(ValueError, match="no LayerParallel"):
        with coarse_view(nn.Linear(2, 2)):
            pass
    model = Net(8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(4, 3)
    model(x).sum().backward()
    opt.step()
    assert opt.state
    train_multilevel(model, opt, lambda m, s: m(x).sum(),
                     MultilevelSchedule((Phase(2, 0, 1),), optimizer_state="reset"))
    assert all(p not in opt.state for p in model.stack.layers[1].parameters())


@pytest.mark.parametrize("policy", ["keep", "transfer"])
def test_transfer_gives_filled_layers_the_optimizer_state_of_their_source(policy):
    model = Net(8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    seen = {}

    def after(step, phase, loss):
        if step == 1:         # the coarse phase's last step: after its prolongation
            seen.update({id(p): {k: v.clone() for k, v in opt.state[p].items()}
                         for p in model.parameters() if p in opt.state})

    schedule = MultilevelSchedule.nested([2, 1], method="copy", optimizer_state=policy)
    train_multilevel(model, opt, lambda m, s: nn.functional.mse_loss(m(x), y), schedule, after)
    layers = model.stack.layers
    for i in range(1, 8, 2):
        for filled, source in zip(layers[i].parameters(), layers[i - 1].parameters()):
            if policy == "keep":
                assert id(filled) not in seen            # never trained: no state yet
            else:
                assert seen[id(filled)].keys() == seen[id(source)].keys()
                for key, value in seen[id(source)].items():
                    assert torch.equal(seen[id(filled)][key], value), key


@pytest.mark.parametrize("lr", [1e-3, 3.0])
def test_mgopt_line_search_never_raises_the_fine_loss(lr):
    """A small step is accepted whole; a huge one is shortened or undone: either way the fine
    loss of the phase's first batch ends below its value at the start (or the start is restored)."""
    model = Net(8).double()
    x, y = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    def loss_on(m, s):
        return nn.functional.mse_loss(m(x), y)
    with torch.no_grad():
        start_loss = float(loss_on(model, 0))
    start = snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    stepper = MultilevelStepper(model, opt, MultilevelSchedule((Phase(2, 0, 3),), mgopt=True,
                                                               line_search=True))
    for step in range(3):
        with stepper.step(step, loss_on):
            opt.zero_grad()
            loss_on(model, step).backward()
            stepper.correct_gradients()
            opt.step()
    (length,) = stepper.step_lengths
    with torch.no_grad():
        end_loss = float(loss_on(model, 0))
    moved = list(model.stack.layers[0].parameters()) + list(model.inp.parameters())
    if lr < 1:
        assert length == 1.0 and end_loss < start_loss
        assert all(p in opt.state for p in moved)       # the momentum is kept
    else:
        assert length < 1.0
        assert not any(p in opt.state for p in moved)   # built along the rejected path: dropped
        if length == 0.0:
            assert all(torch.equal(v, model.state_dict()[k]) for k, v in start.items())
        else:
            assert end_loss < start_loss
    assert stepper.extra_evaluations["fine_gradients"] == 1
    assert stepper.extra_evaluations["fine_losses"] == 1 + (1 if length == 1.0 else
                                                            {0.5: 2, 0.25: 3, 0.125: 4, 0.0: 4}[length])
    with pytest.raises(ValueError, match="needs mgopt"):
        MultilevelSchedule((Phase(2, 0, 1),), line_search=True)


@pytest.mark.parametrize("coarse_gradients", ["scaled", "raw"])
def test_coarse_step_follows_the_hand_built_networks_gradient(coarse_gradients):
    """One SGD step (lr 1) on the odd view moves each kept layer by the gradient of a hand-built
    half-depth network with step 2h, divided by the stride when scaled; the maps around the
    stack by that gradient itself; the skipped layers not at all."""
    model = Net(8).double()
    model.stack.serial()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    hand = copy.deepcopy(model)
    hand.stack = xbt.LayerParallel([hand.stack.layers[i] for i in range(1, 8, 2)],
                                   step_size=2 / 8).serial()
    grads = dict(zip([n for n, _ in hand.named_parameters()],
                     torch.autograd.grad(nn.functional.mse_loss(hand(x), y), list(hand.parameters()))))
    before = snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train_multilevel(model, opt, lambda m, s: nn.functional.mse_loss(m(x), y),
                     MultilevelSchedule((Phase(2, 1, 1),), coarse_gradients=coarse_gradients))
    factor = 0.5 if coarse_gradients == "scaled" else 1.0
    for name, value in model.state_dict().items():
        delta = before[name] - value
        if name.startswith("stack.layers."):
            layer = int(name.split(".")[2])
            expected = (factor * grads[name.replace(f".{layer}.", f".{layer // 2}.", 1)]
                        if layer % 2 else torch.zeros_like(delta))
        else:
            expected = grads[name]
        torch.testing.assert_close(delta, expected, atol=1e-12, rtol=1e-10, msg=name)


def test_scaled_coarse_gradient_is_the_mean_fine_gradient_of_a_smooth_stack():
    """With every layer equal (an autonomous ODE), coarse layer i stands for fine layers 2i and
    2i+1: its scaled gradient matches their mean to O(h), its raw gradient is twice that."""
    model = Net(16, width=6).double()
    model.stack.serial()
    with torch.no_grad():
        for layer in model.stack.layers[1:]:
            layer.load_state_dict(model.stack.layers[0].state_dict())
    x, y = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    def loss_on(m, s):
        return nn.functional.mse_loss(m(x), y)
    weights = [layer.linear.weight for layer in model.stack.layers]
    fine = torch.autograd.grad(loss_on(model, 0), weights)
    mean = torch.stack([(fine[2 * i] + fine[2 * i + 1]) / 2 for i in range(8)])
    for coarse_gradients, factor in (("scaled", 1.0), ("raw", 2.0)):
        stepper = MultilevelStepper(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                    MultilevelSchedule((Phase(2, 0, 1),), coarse_gradients=coarse_gradients))
        model.zero_grad()
        with stepper.step(0, loss_on):
            loss_on(model, 0).backward()
            stepper.correct_gradients()
        coarse = torch.stack([weights[2 * i].grad for i in range(8)])
        error = (coarse - factor * mean).norm() / (factor * mean).norm()
        assert error < 0.1, (coarse_gradients, float(error))
    assert (coarse - mean).norm() / mean.norm() > 0.5      # the raw gradient is not the mean


def test_multilevel_options_are_checked():
    with pytest.raises(ValueError, match="coarse_gradients"):
        MultilevelSchedule((Phase(2, 0, 1),), coarse_gradients="halved")
    with pytest.raises(ValueError, match="coarse_gradients"):
        xbt.multilevel.MultilevelConfig(coarse_gradients="none")

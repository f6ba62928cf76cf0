"""Synchronised dropout: one mask per (layer, forward call), whoever evaluates the layer."""
import copy

import torch
from problems import DropoutLayer
from torch import nn

import xbraid_transformers as xbt
from xbraid_transformers.core.dropout import DropoutSync, layer_seed


def dropout_stack(num_layers=16, p=0.3, **mgrit):
    torch.manual_seed(0)
    layers = [DropoutLayer(6, p).double() for _ in range(num_layers)]
    options = dict(levels=2, cfactor=4)
    options.update(mgrit)
    return xbt.LayerParallel(layers, mgrit=xbt.MGRITConfig(**options), dropout_seed=1234)


def test_every_evaluation_of_a_layer_draws_the_same_mask():
    module = dropout_stack(levels=3, cfactor=2, relax="FCF", fwd_iters=3, bwd_iters=2).train()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    module(x).sum().backward()
    for n, layer in enumerate(module.layers):
        # fine sweeps, coarse steps of every level that start at this layer, the final sweep
        assert len(layer.masks) >= 3, (n, len(layer.masks))
        assert all(torch.equal(m, layer.masks[0]) for m in layer.masks), n
    # different layers get different masks
    assert not torch.equal(module.layers[0].masks[0], module.layers[1].masks[0])


def test_new_forward_call_new_masks_and_the_caller_rng_is_untouched():
    module = dropout_stack(fwd_iters=1, bwd_iters=1).train()
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    module(x)
    first = module.layers[5].masks[-1]
    module(x)
    second = module.layers[5].masks[-1]
    assert not torch.equal(first, second)
    assert torch.equal(torch.rand(3), expected_next)   # dropout did not consume the caller's stream


def test_masks_follow_the_batch_size():
    module = dropout_stack(fwd_iters=2, bwd_iters=1).train()
    for batch in (4, 7, 2):
        module(torch.randn(batch, 6, dtype=torch.float64, requires_grad=True)).sum().backward()
        assert module.layers[0].masks[-1].shape == (batch, 6)


def test_converged_mgrit_with_dropout_equals_serial_with_the_same_masks():
    module = dropout_stack(levels=2, cfactor=4, fwd_iters=40, bwd_iters=40, tol=1e-13).train()
    serial = copy.deepcopy(module).serial().train()
    x = torch.randn(4, 6, dtype=torch.float64)
    weights = torch.randn(4, 6, dtype=torch.float64)
    outs, grads = [], []
    for m in (module, serial):
        xi = x.clone().requires_grad_()
        out = m(xi)
        (out * weights).sum().backward()
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=1e-10)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def convergence_factors(module, x):
    module(x)
    return module.stats.fwd_factors


def test_mgrit_with_synchronised_dropout_converges_like_without():
    x = torch.randn(8, 6, dtype=torch.float64)
    # 32 layers = 8 coarse intervals: 4 iterations stay well above round-off
    options = dict(levels=2, cfactor=4, relax="F", fwd_iters=4, skip_first_downcycle=False)
    with_dropout = max(convergence_factors(dropout_stack(32, **options).train(), x))
    without = max(convergence_factors(dropout_stack(32, **options).eval(), x))
    assert with_dropout < 0.5 and without < 0.5
    assert with_dropout < 3 * without

    # control: a fresh mask at every evaluation (what plain nn.Dropout does) stalls MGRIT
    class FreshMasks(DropoutSync):
        def scope(self, layer, micro_batch, device):
            return super().scope(layer, None, device)

    unsynchronised = dropout_stack(32, **options).train()
    unsynchronised.dropout = FreshMasks()
    assert max(convergence_factors(unsynchronised, x)) > 0.9


def test_encoder_dropout_masks_match_between_serial_and_layer_parallel():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2, norm_first=True, batch_first=True,
                                       dtype=torch.float64)
    cfg = xbt.MGRITConfig(levels=2, cfactor=2, fwd_iters=20, tol=1e-13)
    enc = xbt.LayerParallelTransformerEncoder(layer, 8, mgrit=cfg, dropout_seed=3).train()
    serial = copy.deepcopy(enc).serial().train()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(enc(x), serial(x), atol=1e-10, rtol=1e-10)
    # dropout is really active: eval mode gives another output
    assert (enc.eval()(x) - serial.train()(x)).abs().max() > 1e-3


def test_layer_seeds_are_distinct_and_deterministic():
    seeds = {layer_seed(0, n, b) for n in range(64) for b in range(64)}
    assert len(seeds) == 64 * 64
    assert layer_seed(5, 3, 9) == layer_seed(5, 3, 9) != layer_seed(6, 3, 9)
    sync = DropoutSync(11)
    sync.next_micro_batch()
    state = sync.state_dict()
    other = DropoutSync(0)
    other.load_state_dict(state)
    assert other.next_micro_batch() == sync.next_micro_batch() == 1

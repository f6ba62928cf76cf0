"""Opt-in switches: bf16 autocast of the layer evaluations and torch.compile of the rhs."""
import copy

import pytest
import torch
from torch import nn

import xbraid_transformers as xbt
from xbraid_transformers.nn import LayerParallelTransformerEncoder

D, HEADS, FF = 16, 2, 32


def encoder(num_layers=4, **kwargs):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, norm_first=True, batch_first=True)
    return LayerParallelTransformerEncoder(layer, num_layers, nn.LayerNorm(D), **kwargs)


def grads(module, x, **masks):
    x = x.clone().requires_grad_()
    module.zero_grad()
    out = module(x, **masks)
    out.square().mean().backward()
    return out.detach(), x.grad, [p.grad.clone() for p in module.parameters()]


def test_bf16_autocast_keeps_float32_states_and_is_close_to_float32():
    cfg = xbt.MGRITConfig(levels=2, cfactor=2, fwd_iters=10, bwd_iters=10)
    full = encoder(mgrit=cfg)
    amp = encoder(mgrit=cfg, autocast=torch.bfloat16)
    amp.load_state_dict(full.state_dict())
    x = torch.randn(2, 6, D)
    out32, dx32, dp32 = grads(full, x, is_causal=True)
    out16, dx16, dp16 = grads(amp, x, is_causal=True)
    assert out16.dtype == torch.float32 and dx16.dtype == torch.float32
    assert not torch.equal(out16, out32)  # bf16 really ran
    torch.testing.assert_close(out16, out32, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(dx16, dx32, atol=5e-2, rtol=5e-2)
    for a, b in zip(dp16, dp32):
        assert torch.isfinite(a).all()
        assert (a - b).norm() <= 0.1 * b.norm() + 1e-3
    # converged MGRIT under autocast gives the serial network under autocast
    out_serial, dx_serial, _ = grads(copy.deepcopy(amp).serial(), x, is_causal=True)
    torch.testing.assert_close(out16, out_serial, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(dx16, dx_serial, atol=1e-3, rtol=1e-3)


def test_autocast_refuses_non_float_dtypes():
    with pytest.raises(ValueError, match="autocast"):
        encoder(autocast=torch.int8)
    with pytest.raises(ValueError, match="autocast"):
        encoder(autocast="bf16")


@pytest.mark.slow
def test_compiled_rhs_gives_the_eager_results_in_layer_parallel_mode():
    cfg = xbt.MGRITConfig(levels=2, cfactor=2, fwd_iters=2, bwd_iters=1)
    eager = encoder(mgrit=cfg)
    compiled = encoder(mgrit=cfg, compile=True)
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(2, 6, D)
    for a, b in zip(grads(eager, x), grads(compiled, x)):
        for u, v in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            torch.testing.assert_close(v, u, atol=1e-5, rtol=1e-5)

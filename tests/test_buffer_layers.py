"""Buffer layers (serial, step 1) around the ODE part, and the per-layer Lipschitz estimate."""
import copy

import pytest
import torch
from torch import nn

import xbraid_transformers as xbt
from xbraid_transformers.diagnostics import layer_lipschitz, spectral_norm
from xbraid_transformers.nn import LayerParallelTransformerDecoder, LayerParallelTransformerEncoder

D, HEADS, FF = 8, 2, 16


def torch_encoder(num_layers, dtype=torch.float64):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, norm_first=True,
                                       batch_first=True, dtype=dtype)
    return nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)


def reference_forward(torch_layers, steps, x, **kwargs):
    """x + h (layer(x) - x): the torch pre-LN layer is x + F(x), so F = layer(x) - x."""
    for layer, h in zip(torch_layers, steps):
        x = x + h * (layer(x, **kwargs) - x)
    return x


def test_buffers_with_step_one_in_serial_mode_are_the_torch_encoder():
    reference = torch_encoder(6)
    ours = LayerParallelTransformerEncoder.from_torch(reference, step_size=1.0, buffer_layers=(1, 1),
                                                      mgrit=xbt.MGRITConfig(levels=2, cfactor=2))
    assert ours.buffer_layers == (1, 1) and len(ours.stack.layers) == 4 and len(ours.layers) == 6
    x = torch.randn(2, 5, D, dtype=torch.float64)
    torch.testing.assert_close(ours.serial()(x, is_causal=True), reference(x, is_causal=True,
                               mask=nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)),
                               atol=1e-12, rtol=1e-12)


def test_buffers_plus_converged_ode_part_equal_the_serial_network():
    """2 + 4 + 2 layers, ODE step 1/4 (the default), 2 levels: outputs and all gradients equal
    autograd through the torch layers with steps (1, 1, h, h, h, h, 1, 1)."""
    reference = torch_encoder(8)
    ours = LayerParallelTransformerEncoder.from_torch(
        reference, buffer_layers=(2, 2),
        mgrit=xbt.MGRITConfig(levels=2, cfactor=2, fwd_iters=20, bwd_iters=20, tol=1e-13))
    assert ours.step_size == pytest.approx(1 / 4)
    steps = [1, 1] + [0.25] * 4 + [1, 1]
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, -2:] = True
    x = torch.randn(2, 5, D, dtype=torch.float64)
    weights = torch.randn(2, 5, D, dtype=torch.float64)

    xr = x.clone().requires_grad_()
    (reference_forward(reference.layers, steps, xr, src_key_padding_mask=pad) * weights).sum().backward()
    xo = x.clone().requires_grad_()
    out = ours(xo, src_key_padding_mask=pad)
    (out * weights).sum().backward()
    assert ours.stats.fwd_iters > 1
    torch.testing.assert_close(xo.grad, xr.grad, atol=1e-10, rtol=1e-10)
    for i, (mine, theirs) in enumerate(zip(ours.layers, reference.layers)):
        for (name, p), (_, q) in zip(mine.named_parameters(), theirs.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-10, rtol=1e-10, msg=f"{i} {name}")


def test_decoder_buffers_receive_memory_and_masks():
    torch.manual_seed(1)
    layer = nn.TransformerDecoderLayer(D, HEADS, FF, dropout=0.0, norm_first=True, batch_first=True,
                                       dtype=torch.float64)
    ours = LayerParallelTransformerDecoder(layer, 6, buffer_layers=(1, 1), mgrit=xbt.MGRITConfig(
        levels=2, cfactor=2, fwd_iters=20, bwd_iters=20, tol=1e-13))
    serial = copy.deepcopy(ours).serial()
    tgt, memory = torch.randn(2, 4, D, dtype=torch.float64), torch.randn(2, 3, D, dtype=torch.float64)
    grads = []
    for module in (serial, ours):
        m = memory.clone().requires_grad_()
        module(tgt, m, tgt_is_causal=True).square().sum().backward()
        grads.append(m.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("buffers, match", [((4, 4), "at least one ODE layer"), ((-1, 0), ">= 0"),
                                            (3, "pair")])
def test_bad_buffer_layers(buffers, match):
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, norm_first=True)
    with pytest.raises(ValueError, match=match):
        LayerParallelTransformerEncoder(layer, 8, buffer_layers=buffers)


def test_spectral_norm_of_a_linear_map_and_of_an_encoder_layer_matches_the_dense_jacobian():
    torch.manual_seed(0)
    weight = torch.randn(6, 6, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64)
    estimate = spectral_norm(lambda u: u @ weight.T, x, iters=500, rtol=1e-12)
    assert estimate == pytest.approx(torch.linalg.matrix_norm(weight, ord=2).item(), rel=1e-6)

    reference = torch_encoder(3)
    ours = LayerParallelTransformerEncoder.from_torch(reference, mgrit=xbt.MGRITConfig(levels=1))
    x = torch.randn(1, 4, D, dtype=torch.float64)
    for of in ("rhs", "step"):
        estimates = layer_lipschitz(ours, x, is_causal=True, of=of, iters=500, rtol=1e-12)
        state, h = x, ours.step_size
        for i, layer in enumerate(reference.layers):  # dense Jacobian of the torch layer's F
            mask = nn.Transformer.generate_square_subsequent_mask(4, dtype=torch.float64)

            def f(u, layer=layer):
                delta = layer(u, src_mask=mask, is_causal=True) - u
                return delta if of == "rhs" else u + h * delta

            jac = torch.autograd.functional.jacobian(f, state).reshape(state.numel(), state.numel())
            dense = torch.linalg.matrix_norm(jac, ord=2).item()
            assert estimates[i] == pytest.approx(dense, rel=1e-5), (of, i)
            with torch.no_grad():
                state = state + h * (layer(state, src_mask=mask, is_causal=True) - state)
    with pytest.raises(ValueError, match="of must be"):
        layer_lipschitz(ours, x, of="jacobian")

"""LayerParallelTransformerEncoder against torch.nn.TransformerEncoder (the oracle)."""
import copy

import pytest
import torch
from torch import nn

import xbraid_transformers as xbt

D, HEADS, FF = 16, 2, 32


def torch_pair(num_layers, dtype=torch.float64, dropout=0.0, batch_first=True, **kwargs):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=dropout, norm_first=True,
                                       batch_first=batch_first, dtype=dtype)
    reference = nn.TransformerEncoder(copy.deepcopy(layer), num_layers, enable_nested_tensor=False)
    ours = xbt.LayerParallelTransformerEncoder(layer, num_layers, **kwargs)
    for mine, theirs in zip(ours.layers, reference.layers):
        mine.load_state_dict(theirs.state_dict())
    return reference, ours


def forward_backward(module, x, **masks):
    x = x.detach().clone().requires_grad_()
    module.zero_grad()
    out = module(x, **masks)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


def masks_for(kind, batch, seq, dtype):
    if kind == "none":
        return {}
    if kind == "attn_bool":
        return {"mask": torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)}
    if kind == "attn_float":
        return {"mask": torch.randn(seq, seq, dtype=dtype)}
    if kind == "padding":
        pad = torch.zeros(batch, seq, dtype=torch.bool)
        pad[0, -2:] = True
        return {"src_key_padding_mask": pad}
    if kind == "causal":
        return {"mask": nn.Transformer.generate_square_subsequent_mask(seq, dtype=dtype), "is_causal": True}
    raise AssertionError(kind)


def assert_same(reference, ours, x, masks, atol, rtol):
    ref_out, ref_dx, ref_dp = forward_backward(reference, x, **masks)
    out, dx, dp = forward_backward(ours, x, **masks)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(dx, ref_dx, atol=atol, rtol=rtol)
    ours_by_torch_name = {n.replace("stack.", ""): g for n, g in dp.items()}
    assert set(ours_by_torch_name) == set(ref_dp)
    for name, grad in ref_dp.items():
        torch.testing.assert_close(ours_by_torch_name[name], grad, atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("kind", ["none", "attn_bool", "attn_float", "padding", "causal"])
def test_serial_mode_with_step_one_is_the_torch_encoder(kind):
    reference, ours = torch_pair(4, step_size=1.0)
    ours.serial()
    x = torch.randn(3, 7, D, dtype=torch.float64)
    assert_same(reference, ours, x, masks_for(kind, 3, 7, torch.float64), atol=1e-12, rtol=1e-12)


def test_serial_mode_float32_and_sequence_first_layout():
    reference, ours = torch_pair(8, dtype=torch.float32, batch_first=False, step_size=1.0)
    ours.serial()
    x = torch.randn(7, 3, D)
    assert_same(reference, ours, x, masks_for("padding", 3, 7, torch.float32), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["none", "attn_float", "padding", "causal"])
def test_converged_mgrit_equals_the_torch_encoder_with_masks(kind):
    """Step 1/8 (the ODE form) with the torch layers scaled: masks reach every level and the adjoint."""
    cfg = xbt.MGRITConfig(levels=3, cfactor=2, fwd_iters=30, bwd_iters=30, tol=1e-12)
    reference, ours = torch_pair(8, mgrit=cfg)
    # the torch encoder with step 1/8: scale each layer's residual branches by the step
    h = ours.stack.step_size
    assert h == 1 / 8
    serial = copy.deepcopy(ours).serial()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    masks = masks_for(kind, 2, 5, torch.float64)
    ref_out, ref_dx, ref_dp = forward_backward(serial, x, **masks)
    out, dx, dp = forward_backward(ours, x, **masks)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(dx, ref_dx, atol=1e-10, rtol=1e-10)
    for name in ref_dp:
        torch.testing.assert_close(dp[name], ref_dp[name], atol=1e-10, rtol=1e-10, msg=name)
    # and the serial ODE with h = 1/8 is not the torch encoder (h matters)
    with torch.no_grad():
        assert (reference(x, **masks) - ref_out).abs().max() > 1e-3


def test_torch_checkpoints_load_layer_by_layer_and_the_final_norm():
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, norm_first=True, batch_first=True)
    reference = nn.TransformerEncoder(layer, 4, norm=nn.LayerNorm(D), enable_nested_tensor=False)
    ours = xbt.LayerParallelTransformerEncoder(layer, 4, norm=nn.LayerNorm(D), step_size=1.0)
    for i in range(4):
        assert ours.layers[i].state_dict().keys() == reference.layers[i].state_dict().keys()
        ours.layers[i].load_state_dict(reference.layers[i].state_dict())
    ours.norm.load_state_dict(reference.norm.state_dict())
    x = torch.randn(2, 4, D)
    torch.testing.assert_close(ours.serial()(x), reference(x), atol=1e-5, rtol=1e-5)


def test_default_step_is_one_over_the_number_of_layers():
    _, ours = torch_pair(8)
    assert ours.stack.step_size == pytest.approx(1 / 8)
    assert len(ours.layers) == 8 and isinstance(ours.layers[0], nn.TransformerEncoderLayer)
    assert ours.layers[0] is not ours.layers[1]


def test_post_ln_layers_are_refused():
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, norm_first=False)
    with pytest.raises(ValueError, match="norm_first=False"):
        xbt.LayerParallelTransformerEncoder(layer, 4)


def test_bad_shapes_and_layer_counts():
    _, ours = torch_pair(8)
    with pytest.raises(ValueError, match="src must be"):
        ours(torch.randn(2, 5, D + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="src must be"):
        ours(torch.randn(2, 3, 5, D, dtype=torch.float64))
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, norm_first=True)
    with pytest.raises(ValueError, match="multiple of the product"):
        xbt.LayerParallelTransformerEncoder(layer, 6, mgrit=xbt.MGRITConfig(levels=2, cfactor=4))
    with pytest.raises(ValueError, match="num_layers"):
        xbt.LayerParallelTransformerEncoder(layer, 0)

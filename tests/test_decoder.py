"""LayerParallelTransformerDecoder against torch.nn.TransformerDecoder, and the encoder-decoder
as one ODE (LayerParallelTransformer) against torch.nn.Transformer (the oracles)."""
import copy

import pytest
import torch
from torch import nn

import xbraid_transformers as xbt
from xbraid_transformers.nn import LayerParallelTransformer, LayerParallelTransformerDecoder

D, HEADS, FF = 16, 2, 32
B, T, S = 2, 5, 6  # batch, target length, source length
CONVERGED = dict(fwd_iters=30, bwd_iters=30, tol=1e-12)


def decoder_pair(num_layers, dtype=torch.float64, batch_first=True, norm=True, **kwargs):
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(D, HEADS, FF, dropout=0.0, norm_first=True,
                                       batch_first=batch_first, dtype=dtype)
    reference = nn.TransformerDecoder(layer, num_layers,
                                      norm=nn.LayerNorm(D, dtype=dtype) if norm else None)
    with torch.no_grad():  # a non-trivial final norm
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return reference, LayerParallelTransformerDecoder.from_torch(reference, **kwargs)


def masks_for(kind, dtype):
    if kind == "none":
        return {}
    if kind == "tgt_bool":
        return {"tgt_mask": torch.triu(torch.ones(T, T, dtype=torch.bool), 1)}
    if kind == "tgt_float":
        return {"tgt_mask": torch.randn(T, T, dtype=dtype)}
    if kind == "causal":
        return {"tgt_mask": nn.Transformer.generate_square_subsequent_mask(T, dtype=dtype),
                "tgt_is_causal": True}
    if kind == "memory_mask":
        mask = torch.zeros(T, S, dtype=torch.bool)
        mask[:, -2:] = True
        return {"memory_mask": mask}
    if kind == "padding":
        tgt_pad = torch.zeros(B, T, dtype=torch.bool)
        tgt_pad[0, -1] = True
        mem_pad = torch.zeros(B, S, dtype=torch.bool)
        mem_pad[1, -3:] = True
        return {"tgt_key_padding_mask": tgt_pad, "memory_key_padding_mask": mem_pad}
    raise AssertionError(kind)


KINDS = ["none", "tgt_bool", "tgt_float", "causal", "memory_mask", "padding"]


def run(module, *inputs, **masks):
    """Weighted-sum loss; returns output, input gradients and parameter gradients by torch name."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    module.zero_grad()
    out = module(*inputs, **masks)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), [x.grad for x in inputs], dict(module.named_parameters())


def assert_grads_close(ours, reference, atol, rtol):
    """Compare parameter gradients layer by layer (ours[i] is reference's layer i) and norms."""
    for i, (mine, theirs) in enumerate(zip(ours.layers, reference.layers)):
        for (name, p), (_, q) in zip(mine.named_parameters(), theirs.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=atol, rtol=rtol, msg=f"layer {i} {name}")


@pytest.mark.parametrize("kind", KINDS)
def test_serial_mode_with_step_one_is_the_torch_decoder(kind):
    reference, ours = decoder_pair(4, step_size=1.0)
    ours.serial()
    tgt, memory = torch.randn(B, T, D, dtype=torch.float64), torch.randn(B, S, D, dtype=torch.float64)
    masks = masks_for(kind, torch.float64)
    ref_out, ref_dx, _ = run(reference, tgt, memory, **masks)
    out, dx, _ = run(ours, tgt, memory, **masks)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-12)
    for mine, theirs in zip(dx, ref_dx):  # d tgt and d memory
        torch.testing.assert_close(mine, theirs, atol=1e-12, rtol=1e-12)
    assert_grads_close(ours, reference, 1e-12, 1e-12)
    torch.testing.assert_close(ours.norm.weight.grad, reference.norm.weight.grad)


def test_serial_float32_sequence_first_and_unbatched():
    reference, ours = decoder_pair(4, dtype=torch.float32, batch_first=False, step_size=1.0)
    ours.serial()
    tgt, memory = torch.randn(T, B, D), torch.randn(S, B, D)
    with torch.no_grad():
        torch.testing.assert_close(ours(tgt, memory, tgt_is_causal=True,
                                        tgt_mask=nn.Transformer.generate_square_subsequent_mask(T)),
                                   reference(tgt, memory, tgt_is_causal=True,
                                             tgt_mask=nn.Transformer.generate_square_subsequent_mask(T)),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(tgt[:, 0], memory[:, 0]), reference(tgt[:, 0], memory[:, 0]),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["causal", "memory_mask", "padding"])
def test_converged_mgrit_equals_serial_decoder_with_masks_and_memory_gradient(kind):
    """Masks and memory reach every level and the adjoint; memory gets its gradient."""
    _, ours = decoder_pair(8, mgrit=xbt.MGRITConfig(levels=3, cfactor=2, **CONVERGED))
    assert ours.step_size == 1 / 8
    serial = copy.deepcopy(ours).serial()
    tgt, memory = torch.randn(B, T, D, dtype=torch.float64), torch.randn(B, S, D, dtype=torch.float64)
    masks = masks_for(kind, torch.float64)
    ref_out, (ref_dt, ref_dm), _ = run(serial, tgt, memory, **masks)
    out, (dt, dm), _ = run(ours, tgt, memory, **masks)
    assert ours.stats.fwd_iters > 1 and ours.stats.bwd_iters > 1
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(dt, ref_dt, atol=1e-10, rtol=1e-10)
    assert dm.abs().sum() > 0
    torch.testing.assert_close(dm, ref_dm, atol=1e-10, rtol=1e-10)
    assert_grads_close(ours, serial, 1e-10, 1e-10)


def test_causal_decoder_is_causal_in_layer_parallel_mode():
    """Changing a future target token leaves earlier outputs unchanged (few MGRIT iterations)."""
    _, ours = decoder_pair(8, dtype=torch.float32, mgrit=xbt.MGRITConfig(levels=2, cfactor=4))
    tgt, memory = torch.randn(B, T, D), torch.randn(B, S, D)
    changed = tgt.clone()
    changed[:, 3] += torch.randn(B, D)
    with torch.no_grad():
        a, b = ours(tgt, memory, tgt_is_causal=True), ours(changed, memory, tgt_is_causal=True)
    torch.testing.assert_close(a[:, :3], b[:, :3], atol=1e-6, rtol=1e-6)
    assert (a[:, 3:] - b[:, 3:]).abs().max() > 1e-3


def test_decoder_refuses_post_ln_and_bad_shapes():
    with pytest.raises(ValueError, match="norm_first=False"):
        LayerParallelTransformerDecoder(nn.TransformerDecoderLayer(D, HEADS, FF), 4)
    _, ours = decoder_pair(4)
    with pytest.raises(ValueError, match="memory must be"):
        ours(torch.randn(B, T, D, dtype=torch.float64), torch.randn(B, S, D + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="both"):
        ours(torch.randn(B, T, D, dtype=torch.float64), torch.randn(S, D, dtype=torch.float64))


# ------------------------------------------------------------------ encoder-decoder as one ODE
def transformer_pair(n_enc=2, n_dec=2, **kwargs):
    torch.manual_seed(0)
    reference = nn.Transformer(D, HEADS, n_enc, n_dec, FF, dropout=0.0, batch_first=True,
                               norm_first=True, dtype=torch.float64)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return reference, LayerParallelTransformer.from_torch(reference, **kwargs)


def seq2seq_masks(dtype):
    src_pad = torch.zeros(B, S, dtype=torch.bool)
    src_pad[1, -2:] = True
    tgt_pad = torch.zeros(B, T, dtype=torch.bool)
    tgt_pad[0, -1] = True
    return dict(src_mask=torch.randn(S, S, dtype=dtype),
                tgt_mask=nn.Transformer.generate_square_subsequent_mask(T, dtype=dtype),
                tgt_is_causal=True, src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad,
                memory_key_padding_mask=src_pad)


def test_one_ode_in_serial_mode_with_step_one_is_nn_transformer():
    reference, ours = transformer_pair(step_size=1.0, mgrit=xbt.MGRITConfig(levels=2, cfactor=2))
    ours.serial()
    src, tgt = torch.randn(B, S, D, dtype=torch.float64), torch.randn(B, T, D, dtype=torch.float64)
    masks = seq2seq_masks(torch.float64)
    ref_out, ref_dx, ref_p = run(reference, src, tgt, **masks)
    out, dx, our_p = run(ours, src, tgt, **masks)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-12)
    for mine, theirs in zip(dx, ref_dx):
        torch.testing.assert_close(mine, theirs, atol=1e-12, rtol=1e-12)
    for i, (mine, theirs) in enumerate(zip(ours.layers, [*reference.encoder.layers, *reference.decoder.layers])):
        for (name, p), (_, q) in zip(mine.named_parameters(), theirs.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=1e-12, msg=f"{i} {name}")
    for mine, theirs in [(ours.encoder_norm, reference.encoder.norm), (ours.decoder_norm, reference.decoder.norm)]:
        torch.testing.assert_close(mine.weight.grad, theirs.weight.grad, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(mine.bias.grad, theirs.bias.grad, atol=1e-12, rtol=1e-12)


def test_one_ode_converged_mgrit_equals_serial():
    """One MGRIT solve over 4 + 4 layers (3 levels, boundary a C-point) gives the serial gradients,
    the encoder norm's included (it enters every decoder evaluation)."""
    _, ours = transformer_pair(4, 4, mgrit=xbt.MGRITConfig(levels=3, cfactor=2, **CONVERGED))
    serial = copy.deepcopy(ours).serial()
    src, tgt = torch.randn(B, S, D, dtype=torch.float64), torch.randn(B, T, D, dtype=torch.float64)
    masks = seq2seq_masks(torch.float64)
    ref_out, ref_dx, ref_p = run(serial, src, tgt, **masks)
    out, dx, our_p = run(ours, src, tgt, **masks)
    assert ours.stats.fwd_iters > 1
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    for mine, theirs in zip(dx, ref_dx):
        assert theirs.abs().sum() > 0
        torch.testing.assert_close(mine, theirs, atol=1e-10, rtol=1e-10)
    for name, p in our_p.items():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref_p[name].grad, atol=1e-10, rtol=1e-10, msg=name)


def test_one_ode_boundary_must_be_a_c_point():
    layer_e = nn.TransformerEncoderLayer(D, HEADS, FF, norm_first=True, batch_first=True)
    layer_d = nn.TransformerDecoderLayer(D, HEADS, FF, norm_first=True, batch_first=True)
    with pytest.raises(ValueError, match="boundary .* C-point"):
        LayerParallelTransformer(layer_e, layer_d, 6, 6, mgrit=xbt.MGRITConfig(levels=2, cfactor=4))
    ok = LayerParallelTransformer(layer_e, layer_d, 6, 6, mgrit=xbt.MGRITConfig(levels=2, cfactor=3))
    with pytest.raises(ValueError, match="boundary"):
        ok.configure(cfactor=4)  # 12 layers split in 4s, but the boundary 6 is an F-point
    with pytest.raises(ValueError, match="boundary"):
        LayerParallelTransformer(layer_e, layer_d, 2, 6, mgrit=xbt.MGRITConfig(levels=3, cfactor=2))
    with pytest.raises(ValueError, match="LayerNorm"):
        LayerParallelTransformer(layer_e, layer_d, 6, 6, encoder_norm=nn.Identity(),
                                 mgrit=xbt.MGRITConfig(levels=2, cfactor=3))
    with pytest.raises(ValueError, match="norm_first=False"):
        LayerParallelTransformer(layer_e, nn.TransformerDecoderLayer(D, HEADS, FF), 6, 6)


def test_one_ode_target_is_causal_in_layer_parallel_mode():
    _, ours = transformer_pair(4, 4, mgrit=xbt.MGRITConfig(levels=2, cfactor=2, fwd_iters=1))
    src, tgt = torch.randn(B, S, D, dtype=torch.float64), torch.randn(B, T, D, dtype=torch.float64)
    changed = tgt.clone()
    changed[:, 2] += torch.randn(B, D, dtype=torch.float64)
    with torch.no_grad():
        a, b = ours(src, tgt, tgt_is_causal=True), ours(src, changed, tgt_is_causal=True)
    torch.testing.assert_close(a[:, :2], b[:, :2], atol=1e-12, rtol=1e-12)
    assert (a[:, 2:] - b[:, 2:]).abs().max() > 1e-3

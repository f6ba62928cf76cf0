"""The four model families on tiny synthetic tasks, trained with the same code in serial and in
layer-parallel mode (single process)."""
import copy
import dataclasses
import re

import pytest
import torch

import xbraid_transformers as xbt
from xbraid_transformers.models import (GPT, Bert, BertClassifier, BertConfig, GPTConfig,
                                        ParallelConfig, Seq2Seq, Seq2SeqConfig, ViT, ViTConfig,
                                        deepnet_gain, mask_tokens)

V, L = 12, 8  # vocabulary, sequence length
TINY = dict(d_model=16, n_heads=2, d_ff=32)


def parallel(**mgrit):
    options = dict(levels=2, cfactor=2, fwd_iters=2, bwd_iters=1)
    options.update(mgrit)
    return ParallelConfig(mgrit=xbt.MGRITConfig(**options))


def counting(batch, generator):
    """Sequences start + 0, 1, 2, ... (mod V) from 3: predictable next tokens."""
    start = torch.randint(V, (batch, 1), generator=generator)
    return 3 + (start + torch.arange(L)) % (V - 3)


def gpt_family(p):
    model = GPT(GPTConfig(vocab_size=V, block_size=L, num_layers=4, parallel=p, **TINY))

    def loss(model, g):
        x = counting(8, g)
        return model(x[:, :-1], x[:, 1:])[1]
    return model, loss


def bert_family(p):
    model = Bert(BertConfig(vocab_size=V, max_len=L, num_layers=4, parallel=p, **TINY))

    def loss(model, g):
        ids = counting(8, g)
        ids[:, -1] = 0  # one padding position
        inputs, labels = mask_tokens(ids, 4, V, special_ids=(0,), prob=0.3, generator=g)
        return model.mlm_loss(inputs, labels)
    return model, loss


def classifier_family(p):
    model = BertClassifier(Bert(BertConfig(vocab_size=V, max_len=L, num_layers=4, parallel=p, **TINY)),
                           2, dropout=0.0)

    def loss(model, g):
        ids = counting(32, g)
        label = (ids[:, 0] % 2)
        ids[:, 0] = 2  # [CLS]
        ids[:, 1] = 5 + label  # the class is written in the second token
        return torch.nn.functional.cross_entropy(model(ids), label)
    return model, loss


def vit_family(p):
    model = ViT(ViTConfig(image_size=8, patch_size=4, channels=1, num_classes=2, num_layers=4,
                          parallel=p, **TINY))

    def loss(model, g):
        label = torch.randint(2, (8,), generator=g)
        images = 0.1 * torch.randn(8, 1, 8, 8, generator=g)
        images[label == 1, :, :4] += 1.0  # class 1: bright upper half
        return torch.nn.functional.cross_entropy(model(images.to(model.pos.dtype)), label)
    return model, loss


def seq2seq_family(p):
    model = Seq2Seq(Seq2SeqConfig(src_vocab=V, tgt_vocab=V, max_len=L + 2, num_encoder_layers=2,
                                  num_decoder_layers=2, parallel=p, **TINY))

    def loss(model, g):
        src = counting(8, g)
        bos, eos = torch.ones(8, 1, dtype=torch.long), 2 * torch.ones(8, 1, dtype=torch.long)
        return model.loss(src, torch.cat([bos, src.flip(1), eos], 1))  # reverse the sequence
    return model, loss


FAMILIES = {"gpt": gpt_family, "bert": bert_family, "classifier": classifier_family,
            "vit": vit_family, "seq2seq": seq2seq_family}


def train(model, loss_fn, steps, lr=1e-2, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_in_serial_and_layer_parallel_mode(family):
    torch.manual_seed(0)
    model, loss_fn = FAMILIES[family](parallel())
    serial, parallel_model = copy.deepcopy(model).serial(), copy.deepcopy(model).layer_parallel()
    runs = {}
    for name, m in (("serial", serial), ("parallel", parallel_model)):
        losses = train(m, loss_fn, steps=8, lr=3e-3 if family == "classifier" else 1e-2)
        assert all(torch.isfinite(torch.tensor(losses))), (name, losses)
        assert sum(losses[-2:]) / 2 < losses[0], (name, losses)
        runs[name] = losses
    assert parallel_model.stats.mode == "parallel" and parallel_model.stats.fwd_iters == 2
    assert serial.stats.mode == "serial"
    assert runs["serial"][0] == pytest.approx(runs["parallel"][0], rel=0.2)


@pytest.mark.parametrize("family", FAMILIES)
def test_converged_mgrit_gives_the_serial_loss_and_gradients(family):
    torch.manual_seed(0)
    model, loss_fn = FAMILIES[family](parallel(fwd_iters=20, bwd_iters=20, tol=1e-12))
    model = model.double()
    serial = copy.deepcopy(model).serial()
    results = []
    for m in (serial, model):
        loss = loss_fn(m, torch.Generator().manual_seed(3))
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in m.named_parameters()}))
    assert model.stats.fwd_iters > 1
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-10)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-9, rtol=1e-7, msg=name)


def test_gpt_is_causal_in_layer_parallel_mode():
    torch.manual_seed(0)
    model, _ = gpt_family(parallel(fwd_iters=1))
    model.eval()
    x = counting(4, torch.Generator().manual_seed(0))
    changed = x.clone()
    changed[:, 5] = (changed[:, 5] + 1) % V
    with torch.no_grad():
        a, b = model(x)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-5, rtol=1e-5)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-4


def test_buffer_layers_and_deepnet_init_in_the_model_config():
    p = ParallelConfig(mgrit=xbt.MGRITConfig(levels=2, cfactor=2), buffer_layers=(1, 1),
                       deepnet_init=True, final_time=2.0)
    torch.manual_seed(0)
    scaled = GPT(GPTConfig(vocab_size=V, block_size=L, num_layers=6, parallel=p, **TINY))
    torch.manual_seed(0)
    plain = GPT(GPTConfig(vocab_size=V, block_size=L, num_layers=6, **TINY,
                          parallel=ParallelConfig(mgrit=p.mgrit, buffer_layers=(1, 1), final_time=2.0)))
    assert scaled.blocks.step_size == pytest.approx(2.0 / 4) and scaled.blocks.buffer_layers == (1, 1)
    gain = deepnet_gain(6)
    a, b = scaled.blocks.layers[2], plain.blocks.layers[2]
    torch.testing.assert_close(a.linear1.weight, gain * b.linear1.weight)
    torch.testing.assert_close(a.self_attn.out_proj.weight, gain * b.self_attn.out_proj.weight)
    torch.testing.assert_close(a.self_attn.in_proj_weight[:32], b.self_attn.in_proj_weight[:32])  # q, k
    torch.testing.assert_close(a.self_attn.in_proj_weight[32:], gain * b.self_attn.in_proj_weight[32:])
    with pytest.raises(ValueError, match="buffer layers"):
        Seq2SeqConfig(parallel=p)


def test_mlm_loss_runs_the_head_at_the_masked_positions_only():
    """The same loss and gradients as the vocabulary logits at every position, and the head's
    product sees only the masked rows."""
    torch.manual_seed(0)
    model = Bert(BertConfig(vocab_size=V, max_len=L, num_layers=2, parallel=parallel(), **TINY)).double()
    g = torch.Generator().manual_seed(3)
    inputs, labels = mask_tokens(counting(8, g), 4, V, special_ids=(0,), prob=0.3, generator=g)
    reference = copy.deepcopy(model).serial()
    expected = torch.nn.functional.cross_entropy(reference.mlm_logits(reference(inputs)).flatten(0, 1),
                                                 labels.flatten(), ignore_index=-100)
    seen = []
    model.mlm_transform.register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
    loss = model.serial().mlm_loss(inputs, labels)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert seen == [int((labels != -100).sum())] and 0 < seen[0] < labels.numel()


def test_mask_tokens_and_greedy_decode():
    g = torch.Generator().manual_seed(0)
    ids = 5 + torch.randint(V - 5, (64, L), generator=g)
    ids[:, 0] = 2
    inputs, labels = mask_tokens(ids, 4, V, special_ids=(2,), prob=0.5, generator=g)
    chosen = labels != -100
    assert not chosen[:, 0].any() and 0.35 < chosen.float().mean() < 0.6
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    assert 0.7 < (inputs[chosen] == 4).float().mean() < 0.9
    with pytest.raises(ValueError, match="prob"):
        mask_tokens(ids, 4, V, prob=1.5)
    model, _ = seq2seq_family(parallel())
    out = model.eval().greedy_decode(counting(3, g), max_len=5)
    assert out.shape[0] == 3 and out.shape[1] <= 5 and (out[:, 0] == 1).all()


def _half_depth(model):
    """The same family built with every other layer, run serially: an independent oracle for
    coarse views."""
    if isinstance(model, BertClassifier):
        return BertClassifier(_half_depth(model.bert), 2, dropout=0.0)
    serial = dataclasses.replace(model.config.parallel, mgrit=xbt.MGRITConfig(levels=1))
    c = dataclasses.replace(model.config, parallel=serial)
    if isinstance(model, Seq2Seq):
        return Seq2Seq(dataclasses.replace(c, num_encoder_layers=c.num_encoder_layers // 2,
                                           num_decoder_layers=c.num_decoder_layers // 2))
    return type(model)(dataclasses.replace(c, num_layers=c.num_layers // 2))


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_coarse_view_of_every_family_is_the_half_depth_model(name, offset):
    """multilevel.coarse_view works on every family: layers offset::2 with step 2h give the
    network built with half the layers (step 2h) and those layers' weights, in serial mode and
    with converged MGRIT."""
    from xbraid_transformers.multilevel import coarse_view
    model, loss_fn = FAMILIES[name](parallel(fwd_iters=8, bwd_iters=8))
    half = _half_depth(model)
    state = {}
    for key, value in model.state_dict().items():
        match = re.match(r"(.*\.layers\.)(\d+)(\..*)", key)
        if match is None:
            state[key] = value
        elif int(match[2]) % 2 == offset:
            state[f"{match[1]}{int(match[2]) // 2}{match[3]}"] = value
    half.load_state_dict(state)
    model.eval(), half.eval()
    with torch.no_grad():
        expected = loss_fn(half, torch.Generator().manual_seed(3))
        for parallel_mode in (False, True):
            for stack in xbt.find_stacks(model):
                stack.set_parallel(parallel_mode)
            with coarse_view(model, 2, offset):
                got = loss_fn(model, torch.Generator().manual_seed(3))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

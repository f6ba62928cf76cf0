"""The model families trained on 2 spawned gloo processes (layers split between them): the loss
is finite and decreases, every rank sees the same loss, and converged MGRIT over the two
processes gives the serial loss at the same weights."""
import pytest
import torch
from test_models import FAMILIES as SINGLE_PROCESS
from test_models import TINY, L, V, parallel, train

import xbraid_transformers as xbt
from xbraid_transformers.models import (GPT, Bert, BertClassifier, BertConfig, GPTConfig, Seq2Seq,
                                        Seq2SeqConfig, ViT, ViTConfig)

BUILD = {
    "gpt": lambda p, comm: GPT(GPTConfig(vocab_size=V, block_size=L, num_layers=4, parallel=p, **TINY), comm=comm),
    "bert": lambda p, comm: Bert(BertConfig(vocab_size=V, max_len=L, num_layers=4, parallel=p, **TINY), comm=comm),
    "classifier": lambda p, comm: BertClassifier(
        Bert(BertConfig(vocab_size=V, max_len=L, num_layers=4, parallel=p, **TINY), comm=comm), 2, dropout=0.0),
    "vit": lambda p, comm: ViT(ViTConfig(image_size=8, patch_size=4, channels=1, num_classes=2, num_layers=4,
                                         parallel=p, **TINY), comm=comm),
    "seq2seq": lambda p, comm: Seq2Seq(Seq2SeqConfig(src_vocab=V, tgt_vocab=V, max_len=L + 2, num_encoder_layers=2,
                                                     num_decoder_layers=2, parallel=p, **TINY), comm=comm),
}


def train_every_family(comm):
    out = {}
    for name, build in BUILD.items():
        torch.manual_seed(0)
        model = build(parallel(), comm)
        xbt.broadcast_replicated_(model)
        initial = xbt.gather_state_dict(model)         # references, like state_dict()
        initial = initial and {k: v.clone() for k, v in initial.items()}
        loss_fn = SINGLE_PROCESS[name](parallel())[1]
        losses = train(model, loss_fn, steps=8, lr=3e-3 if name == "classifier" else 1e-2)
        model.configure(fwd_iters=30, bwd_iters=30, tol=1e-6)
        with torch.no_grad():
            converged = loss_fn(model, torch.Generator().manual_seed(3)).item()
            model.serial()
            serial = loss_fn(model, torch.Generator().manual_seed(3)).item()
        owned = sum(p.numel() for stack in model.stacks() for p in stack.parameters())
        out[name] = dict(losses=losses, converged=converged, serial=serial, owned=owned,
                         initial=initial)
    return out


@pytest.fixture(scope="module")
def two_ranks():
    return xbt.spawn(train_every_family, 2, timeout=120)


@pytest.mark.parametrize("family", list(BUILD))
def test_family_trains_on_two_processes(two_ranks, family):
    first, second = (r[family] for r in two_ranks)
    losses = first["losses"]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert sum(losses[-2:]) / 2 < losses[0], losses
    assert second["losses"] == losses                       # the output is shared by the ranks
    assert first["converged"] == pytest.approx(first["serial"], rel=1e-5)
    torch.manual_seed(0)
    whole = BUILD[family](parallel(), None)
    # the same initialisation as one process: no weight depends on the layout
    assert sorted(first["initial"]) == sorted(whole.state_dict())
    for key, value in whole.state_dict().items():
        assert torch.equal(first["initial"][key], value), key
    total = sum(p.numel() for stack in whole.stacks() for p in stack.parameters())
    assert 0 < first["owned"] < total and 0 < second["owned"] < total   # the layers are split

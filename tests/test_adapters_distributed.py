"""Wrapped Hugging Face models split over 2 spawned gloo processes equal the same wrapped model
on one process: layer-parallel (MGRIT, 2 forward / 1 backward iteration, dropout on) and serial,
outputs, losses and every parameter gradient in float64; ``xbt.gather_state_dict`` assembles
the untouched model's keys and values on rank 0."""
import pytest
import torch
from test_adapters import CONVERGED, assert_same_gradients, build, run

import xbraid_transformers as xbt
from xbraid_transformers.adapters import make_layer_parallel, restore_blocks, set_parallel

FAMILIES = ("gpt2", "llama", "qwen2")    # qwen2: found through its _no_split_modules
MGRIT = dict(CONVERGED, fwd_iters=2, bwd_iters=1)     # not converged: the same iterates anyway


def wrapped_runs(comm, families=FAMILIES):
    """On every rank (and on one process with comm=None): per family, the untouched state, a
    layer-parallel and a serial forward/backward of the wrapped model, its gathered state."""
    results = {}
    for family in families:
        model, batch, loss_fn = build(family, dropout=0.1)
        untouched = {k: v.clone() for k, v in model.state_dict().items()}
        make_layer_parallel(model, mgrit=xbt.MGRITConfig(**MGRIT), dropout_seed=7, comm=comm)
        model.load_state_dict(untouched)   # the original keys load on any number of ranks
        parallel = run(model, batch, loss_fn)
        serial = run(set_parallel(model, False), batch, loss_fn)
        gathered = xbt.gather_state_dict(model)
        try:
            restore_blocks(model)
            restore_error = None
        except ValueError as error:
            restore_error = str(error)
        results[family] = dict(parallel=parallel, serial=serial, gathered=gathered,
                               untouched=untouched, restore_error=restore_error)
    return results


@pytest.fixture(scope="module")
def two_ranks():
    return xbt.spawn(wrapped_runs, 2, timeout=120)


@pytest.fixture(scope="module")
def one_process():
    return wrapped_runs(None)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["parallel", "serial"])
def test_two_processes_equal_one(two_ranks, one_process, family, mode):
    ref_out, ref_loss, ref_grads = one_process[family][mode]
    merged = {}
    for rank in two_ranks:
        out, loss, grads = rank[family][mode]
        torch.testing.assert_close(out, ref_out)        # every rank returns the whole output
        torch.testing.assert_close(loss, ref_loss)
        for name, grad in grads.items():
            if name in merged:                          # replicated: equal on both ranks
                torch.testing.assert_close(grad, merged[name])
            merged[name] = grad
    owned = [{n for n in rank[family][mode][2] if ".stack.layers." in n} for rank in two_ranks]
    assert owned[0] and owned[1] and not owned[0] & owned[1]      # the blocks are split
    worst = assert_same_gradients(merged, ref_grads)
    print(family, mode, f"out {(two_ranks[0][family][mode][0] - ref_out).abs().max():.1e}",
          f"grad {worst:.1e}")


@pytest.mark.parametrize("family", FAMILIES)
def test_gather_state_dict_gives_the_untouched_models_keys(two_ranks, family):
    first, second = (rank[family] for rank in two_ranks)
    assert second["gathered"] is None
    gathered, untouched = first["gathered"], first["untouched"]
    internal = [k for k in gathered if ".stack.layers." in k]
    assert not internal, ("gather_state_dict must call the rename_state_keys(state, prefix) "
                          f"method of the modules that define one; got {internal[:2]}")
    assert sorted(gathered) == sorted(untouched)
    for key, value in untouched.items():
        torch.testing.assert_close(gathered[key], value, msg=key)


def test_restoring_a_split_model_asks_for_gather_state_dict(two_ranks):
    for rank in two_ranks:
        assert "xbt.gather_state_dict(model)" in rank["gpt2"]["restore_error"]

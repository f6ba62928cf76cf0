"""The pipelining side of benchmarks/pipeline_vs_mgrit.py computes what the serial network
computes: torch.distributed.pipelining's GPipe and 1F1B schedules over 2 gloo processes, the
batch in 2 micro-batches, give the gradients of the serial layers through autograd (oracle: one
process, the same layers and loss), to round-off (the micro-batches change the reduction order).
The priced comparison is checked against its formula on hand-made step costs."""
import pytest
import torch

from xbraid_transformers.app.bench.pipeline import (ResidualStage, loss_fn, pipeline_gradients,
                                                    priced_rows)
from xbraid_transformers.app.bench.scaling import Shape, make_layers
from xbraid_transformers.distributed import spawn
from xbraid_transformers.mgrit.clock import LinkModel

SHAPE = Shape(d_model=8, heads=2, ff=16, batch=4, seq=3)


def worker(comm, name, microbatches):
    torch.manual_seed(0)
    x = SHAPE.input(1)
    return pipeline_gradients(comm, make_layers(4, SHAPE), x, torch.zeros_like(x), name, microbatches)


@pytest.mark.parametrize("name", ["GPipe", "1F1B"])
def test_pipeline_gradients_equal_serial(name):
    results = spawn(worker, 2, name, 2, timeout=60.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = ResidualStage(make_layers(4, SHAPE), 1.0 / 4)
        x = SHAPE.input(1)
        loss_fn(serial(x), torch.zeros_like(x)).backward()
    finally:
        torch.set_num_threads(threads)
    expected = {k: p.grad for k, p in serial.named_parameters()}
    got = {**results[0], **results[1]}
    assert set(got) == set(expected)
    assert {k.split(".")[1] for k in results[0]} == {"0", "1"}      # each rank its own stage
    for key, grad in expected.items():
        torch.testing.assert_close(got[key], grad, rtol=1e-5, atol=1e-7, msg=key)


def test_priced_pipeline_is_m_plus_p_minus_1_stage_steps():
    """8 layers on 4 ranks, 2 micro-batches: a stage step is 2 layers at 3 s each (the serial
    cost at half the batch), each hop 1 s (latency only): (2 + 4 - 1) x (6 + 2) = 40 s against
    a serial step of 8 x 5 s."""
    units = dict(serial=5.0, forward=1.0, record=1.0, adjoint=2.0, adjoint_final=2.0)
    costs = {1: units, 2: dict(units, serial=3.0)}
    link = LinkModel(latency=1.0, bandwidth=float("inf"))
    rows = priced_rows([8], [4], [1, 2], costs, Shape(batch=2), link)
    gpipe = next(r for r in rows if r["schedule"] == "GPipe" and r["microbatches"] == 2)
    assert gpipe["seconds_per_step"] == pytest.approx(40.0)
    assert gpipe["speedup_vs_serial"] == pytest.approx(40.0 / 40.0)
    whole = next(r for r in rows if r["schedule"] == "MGRIT" and r["microbatches"] == 1)
    halves = next(r for r in rows if r["schedule"] == "MGRIT, 2 solves")
    assert halves["seconds_per_step"] > whole["seconds_per_step"]    # same step costs, twice the solves

"""The multilevel experiment: FLOPs counted per step against the matmul count worked out from the
model's shapes, the run's FLOP accounting over a schedule, the benchmark script running on the
shared core, and the verdict rule on hand-made results."""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from xbraid_transformers.app.bench import multilevel as core
from xbraid_transformers.app.reproduce.base import CONFIRMED, CONTRADICTED, NOT_MEASURABLE
from xbraid_transformers.app.reproduce.multilevel import NESTED, SINGLE, V_CYCLE, checks, tables, verdict
from xbraid_transformers.models.gpt import GPT, GPTConfig

B, T, D, HEADS, LAYERS, VOCAB = 2, 8, 16, 2, 4, 32


def matmul_flops(layers: int, backward: bool) -> int:
    """2 m n k per product. A layer: the q, k, v and output projections (4 d^2) and the MLP
    (2 * 4 d^2) per token, and the attention's scores and weighted values (T d each per token);
    then the tied output head (d V per token). Backward: twice the forward for every linear
    product (gradients of input and weight); flash attention's backward recomputes the scores and
    forms four gradient products, 5/2 of its forward."""
    linear = 2 * B * T * (layers * 12 * D * D + D * VOCAB)
    attention = layers * 2 * (2 * B * T * T * D)
    return linear + attention if not backward else 3 * linear + attention + 5 * attention // 2


@pytest.fixture(scope="module")
def gpt_and_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=T, d_model=D, n_heads=HEADS, num_layers=LAYERS)).serial()
    x, y = torch.randint(VOCAB, (B, T)), torch.randint(VOCAB, (B, T))
    return model, lambda m, step: m(x, y)[1]


def test_step_flops_equal_the_matmul_count_of_each_view(gpt_and_loss):
    model, loss_on = gpt_and_loss
    for stride in (1, 2, 4):
        assert core.step_flops(model, loss_on, stride, 0) == matmul_flops(LAYERS // stride, backward=True)
    assert core.step_flops(model, loss_on, 2, 1) == matmul_flops(LAYERS // 2, backward=True)
    assert core.step_flops(model, loss_on, 1, 0, backward=False) == matmul_flops(LAYERS, backward=False)


def test_run_adds_up_the_flops_of_every_step_of_a_schedule(gpt_and_loss):
    model, loss_on = gpt_and_loss
    model = copy.deepcopy(model)
    flops_of = core.view_flops(model, loss_on)
    schedule = core.MultilevelSchedule.nested([2, 3, 1])           # 2 steps on N/4, 3 on N/2, 1 on N
    optimizer = core.make_optimizer("adamw", model.parameters(), dict(sgd=0.1, adamw=1e-3))
    curve = core.run(model, optimizer, loss_on, schedule, lambda m: loss_on(m, 0).item(), flops_of,
                     eval_every=100, clip=1.0)
    expected = 2 * matmul_flops(1, True) + 3 * matmul_flops(2, True) + matmul_flops(4, True)
    assert [point[0] for point in curve] == [0, 2 * matmul_flops(1, True),
                                             2 * matmul_flops(1, True) + 3 * matmul_flops(2, True), expected]
    assert core.to_target(curve, curve[2][2]) == (curve[2][0], curve[2][1])
    assert core.to_target(curve, -1.0) == (None, None)


def test_the_benchmark_script_measures_with_the_core():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "multilevel.py"
    spec = importlib.util.spec_from_file_location("multilevel_benchmark", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.measure is core.measure and script.FAMILIES is core.FAMILIES


def _record(family, optimizer, schedule, flops, target=5.0, start=6.0):
    runs = [dict(seed=s, flops=f, seconds=None if f is None else f / 10, flop_ratio=None, time_ratio=None,
                 final_val=target) for s, f in enumerate(flops)]
    curves = {str(s): [[0, 0.0, start], [f or 99, (f or 99) / 10, target]] for s, f in enumerate(flops)}
    return dict(family=family, optimizer=optimizer, schedule=schedule, target=target, runs=runs, curves=curves)


def _result(v_cycle_adamw=(8, 9), nested=(5, 6), target=5.0):
    records = []
    for optimizer in ("sgd", "adamw"):
        records += [_record("gpt", optimizer, SINGLE, (10, 12), target),
                    _record("gpt", optimizer, V_CYCLE, v_cycle_adamw if optimizer == "adamw" else (8, 9), target),
                    _record("gpt", optimizer, NESTED, nested, target)]
    return {"settings": dict(seeds=2, steps=10, phase=5, eval_every=5, clip=1.0, families={"gpt": {}}),
            "data": {"gpt": "hand-made"}, "records": records}


def test_verdict_follows_the_medians_of_flops_to_target():
    base = _result()
    assert verdict(base).label == CONFIRMED                        # V-cycle 8.5 against 11
    assert "+23%" in verdict(base).evidence and "+23%" in tables(base)
    assert verdict(_result(nested=(20, None))).label == CONFIRMED  # nested is reported, not judged
    slower = _result(v_cycle_adamw=(11, 12))                       # median 11.5 > 11
    assert verdict(slower).label == CONTRADICTED and checks(slower) == {"gpt/sgd": True, "gpt/adamw": False}
    assert verdict(_result(v_cycle_adamw=(10.5, 11.4))).label == CONFIRMED   # 10.95 < 11
    unreached = _result(v_cycle_adamw=(1, None))                   # a seed that never gets there: infinite
    assert verdict(unreached).label == CONTRADICTED
    untrained = _result(target=6.5)                                # single-level ends above its start
    assert verdict(untrained).label == NOT_MEASURABLE

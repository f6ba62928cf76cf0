"""The multilevel experiment: FLOPs counted per step against the matmul count worked out from the
model's shapes, the run's FLOP accounting over a schedule, the benchmark script running on the
shared core, the learning-rate tuning, and the verdict rule (the V-cycle's saving against the
paper's 44%) on hand-made curves."""
import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from xbraid_transformers.app.bench import multilevel as core
from xbraid_transformers.app.reproduce import multilevel
from xbraid_transformers.app.reproduce.base import CONFIRMED, CONTRADICTED, INCONCLUSIVE, NOT_MEASURABLE
from xbraid_transformers.app.reproduce.multilevel import (NESTED, SETTINGS, SINGLE, V_CYCLE, check, lateness,
                                                          savings, tables, verdict)
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


# ---------------------------------------------------------------------------- the verdict rule
SINGLE_CURVE = [[0, 0.0, 6.0], [25, 2.5, 5.0], [50, 5.0, 4.6], [75, 7.5, 4.45], [100, 10.0, 4.4]]


def _multilevel_curve(saving):
    """Reaches the single-level final loss 4.4 after (1 - saving) x 100 FLOPs; None: never does
    within its 133 FLOPs."""
    if saving is None:
        return [[0, 0.0, 6.0], [133, 13.3, 4.5]]
    return [[0, 0.0, 6.0], [100 * (1 - saving), 10 * (1 - saving), 4.39], [133, 13.3, 4.3]]


def _result(v_cycle, nested=None, single=SINGLE_CURVE, adamw=None):
    """Hand-made curves: per seed the single-level curve and the multilevel ones with these
    FLOP savings; AdamW's V-cycle saves ``adamw``."""
    seeds = list(range(len(v_cycle)))

    def by_seed(curves):
        return {str(seed): curve for seed, curve in zip(seeds, curves)}
    curves = {opt: {SINGLE: by_seed([single] * len(seeds)),
                    NESTED: by_seed(map(_multilevel_curve, nested or [0.6] * len(seeds))),
                    V_CYCLE: by_seed(map(_multilevel_curve, v_cycle if opt == "sgd" else adamw or [0.0] * len(seeds)))}
              for opt in ("sgd", "adamw")}
    lrs = {"sgd": {name: 0.3 for name in curves["sgd"]}, "adamw": {name: 3e-3 for name in curves["sgd"]}}
    return {"settings": dict(SETTINGS["micro"], seeds=seeds), "seeds": seeds, "data": "hand-made",
            "tuning": {opt: {name: {str(lr): 4.0 for lr in SETTINGS["micro"]["lrs"][opt]} for name in curves[opt]}
                       for opt in curves}, "lrs": lrs, "curves": curves, "flops_per_step": {}}


@pytest.mark.parametrize("v_cycle, label", [
    ((0.40, 0.45, 0.50, 0.42, 0.48), CONFIRMED),          # interval holds 44% and lies above 0
    ((0.60, 0.62, 0.65), CONFIRMED),                      # lies above 44%
    ((0.44, 0.44, 0.44), CONFIRMED),                      # reaches 44% exactly: holds it
    ((0.10, 0.12, 0.15, 0.11, 0.13), CONTRADICTED),       # a saving, but entirely below 44%
    ((0.0, 0.0, 0.0), CONTRADICTED),                      # a tie with single-level: no saving at all
    ((-0.2, 0.6, 0.1, 0.5), INCONCLUSIVE),                # holds 0 and 44%: within the noise
    ((0.5,), INCONCLUSIVE),                               # one seed: no interval
    ((0.5, 0.5, None), INCONCLUSIVE),                     # a seed never reached: its bound -33% widens it
    ((None, None, None), CONTRADICTED),                   # none reached: every bound (-33%) below 44%
])
def test_verdict_judges_the_size_of_the_v_cycle_saving_against_44_percent(v_cycle, label):
    result = _result(v_cycle)
    assert verdict(result).label == label
    assert check(result) == {CONFIRMED: True, CONTRADICTED: False, INCONCLUSIVE: INCONCLUSIVE}[label]


def test_savings_per_seed_are_flops_to_each_seed_s_single_level_loss():
    result = _result((0.40, 0.45, None))
    assert [round(v, 6) for v, _ in savings(result, "sgd", V_CYCLE)] == [0.4, 0.45, round(1 - 133 / 100, 6)]
    assert [r for _, r in savings(result, "sgd", V_CYCLE)] == [True, True, False]
    assert savings(result, "sgd", V_CYCLE, key=1)[0][0] == pytest.approx(0.4)      # seconds: 6 against 10
    assert "+40%, +45%, -33% (no)" in tables(result)


def test_nested_iteration_and_adamw_are_reported_not_judged():
    confirmed = _result((0.40, 0.45, 0.50, 0.42, 0.48))
    assert verdict(_result((0.40, 0.45, 0.50, 0.42, 0.48), nested=[-1.0] * 5, adamw=[None] * 5)).label == CONFIRMED
    assert "nested" in verdict(confirmed).headline and "V-cycle" in verdict(confirmed).headline


def test_an_early_target_or_an_untrained_baseline_is_not_measurable():
    linear = [[25 * i, 2.5 * i, 6.0 - 0.5 * i] for i in range(5)]       # last quarter: a third of the drop
    assert lateness(_result((0.5, 0.5, 0.5), single=linear)) == pytest.approx(1 / 3)
    assert lateness(_result((0.5, 0.5, 0.5))) == pytest.approx(0.05 / 0.6)   # 4.45 -> 4.4 of 5.0 -> 4.4
    assert verdict(_result((0.5, 0.5, 0.5), single=linear)).label == NOT_MEASURABLE
    risen = [[0, 0.0, 6.0], [50, 5.0, 6.2], [100, 10.0, 6.1]]            # ends above its start
    assert verdict(_result((0.5, 0.5, 0.5), single=risen)).label == NOT_MEASURABLE


def test_each_scheme_keeps_the_learning_rate_of_its_lowest_tuning_loss(monkeypatch):
    """The tuning seed picks the rate (best at 1 for SGD, 3e-3 for AdamW, whatever the schedule;
    a diverged rate, first in the grid, ranks last) and only the judged seeds train at it."""
    calls = []

    def fake_curve(family, optimizer, lr, schedule, seed, flops_of, eval_every, clip):
        calls.append((optimizer, lr, seed))
        best = {"sgd": 1.0, "adamw": 3e-3}[optimizer]
        final = math.nan if lr == SETTINGS["micro"]["lrs"]["sgd"][0] else 4.0 + abs(math.log(lr / best))
        return [(0, 0.0, 6.0), (10, 1.0, final)]
    monkeypatch.setattr(multilevel, "train_curve", fake_curve)
    s = SETTINGS["micro"]
    result = multilevel.run(dict(s), lambda message: None)
    assert result["lrs"] == {"sgd": {name: 1.0 for name in (SINGLE, NESTED, V_CYCLE)},
                             "adamw": {name: 3e-3 for name in (SINGLE, NESTED, V_CYCLE)}}
    tuned = [c for c in calls if c[2] == s["tune_seed"]]
    assert len(tuned) == 3 * 3 * 2 and s["tune_seed"] not in s["seeds"]
    assert {c[2] for c in calls} - {s["tune_seed"]} == set(s["seeds"]) and result["seeds"] == s["seeds"]
    assert all(lr == {"sgd": 1.0, "adamw": 3e-3}[opt] for opt, lr, seed in calls if seed != s["tune_seed"])

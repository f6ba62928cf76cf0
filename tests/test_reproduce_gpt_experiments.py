"""The rules of the GPT reproduction experiments (convergence, gradient-bias, dropout, buffers) on
made-up numbers: each confirms, contradicts, is inconclusive (ties included) and not measurable
where the numbers say so."""
import json

import pytest

from xbraid_transformers.app.reproduce import buffers, convergence, dropout, gradient_bias, run_experiment
from xbraid_transformers.app.reproduce.base import (CONFIRMED, CONTRADICTED, INCONCLUSIVE,
                                                    NOT_MEASURABLE, mean_factor)

SEEDS = [0, 1, 2]
JITTER = (0.0, 0.01, -0.01)      # small seed-to-seed noise


# ---------------------------------------------------------------------------- convergence
def _convergence(rho, *, layers=32, iters=3):
    """``rho[cfactor]``: per seed, rho at each checkpoint (steps 0, 100, ...)."""
    settings = dict(convergence.SETTINGS["quick"], layers=layers, iters=iters, seeds=SEEDS,
                    cfactors=sorted(rho), judged_cfactor=4)
    runs = []
    for i, seed in enumerate(SEEDS):
        rows = [{"step": 100 * j, "cfactor": m, "rho_forward": value * 0.9, "rho_backward": value,
                 "exact_within": layers // m <= iters}
                for m, per_seed_values in rho.items() for j, value in enumerate(per_seed_values[i])]
        runs.append({"seed": seed, "rows": rows})
    return {"settings": settings, "seeds": SEEDS, "runs": runs, "data": "made up", "step_size": {}}


def _scaled(values, factor):
    return [[v * factor for v in seed] for seed in values]


CROSSES = [[0.05, 0.4, 1.2 + j, 1.5] for j in JITTER]
APPROACHES = [[0.05, 0.4, 0.8 + j, 0.9] for j in JITTER]
SHORT = [[0.05, 0.1 + j, 0.2, 0.3] for j in JITTER]


def _label(rho):
    return convergence.verdict(_convergence(rho)).label


def test_convergence_confirmed_when_rho_crosses_1_in_every_seed_and_large_cfactor_is_worse():
    assert _label({2: _scaled(CROSSES, 0.7), 4: CROSSES, 8: _scaled(CROSSES, 1.5)}) == CONFIRMED
    assert convergence.crossing([(0, 0.1), (100, 0.99), (200, 1.0), (300, 2.0)]) == 200
    assert convergence.crossing([(0, 0.1), (100, 0.99)]) is None


def test_convergence_contradicted():
    # rho >= 1 at initialisation
    started = [[1.1, 1.2, 1.3, 1.4]] + CROSSES[1:]
    assert _label({2: _scaled(CROSSES, 0.7), 4: started, 8: _scaled(CROSSES, 1.5)}) == CONTRADICTED
    # rho falls during training in every seed
    falling = [[0.6 + j, 0.3, 0.2, 0.1] for j in JITTER]
    assert _label({2: _scaled(falling, 0.7), 4: falling, 8: _scaled(falling, 1.5)}) == CONTRADICTED
    # the largest cfactor converges better over the whole run
    assert _label({2: _scaled(CROSSES, 1.5), 4: CROSSES, 8: _scaled(CROSSES, 0.7)}) == CONTRADICTED


def test_convergence_inconclusive_when_rho_approaches_1_unseen_or_cfactors_tie():
    assert _label({2: _scaled(APPROACHES, 0.7), 4: APPROACHES, 8: _scaled(APPROACHES, 1.5)}) == INCONCLUSIVE
    some = CROSSES[:2] + APPROACHES[2:]                 # crossed in two of three seeds
    assert _label({2: _scaled(some, 0.7), 4: some, 8: _scaled(some, 1.5)}) == INCONCLUSIVE
    assert _label({2: CROSSES, 4: CROSSES, 8: CROSSES}) == INCONCLUSIVE      # a tie
    mixed = [_scaled(CROSSES[:1], 1.5)[0], _scaled(CROSSES[1:2], 0.7)[0], CROSSES[2]]
    assert _label({2: CROSSES, 4: CROSSES, 8: mixed}) == INCONCLUSIVE        # within the noise


def test_convergence_not_measurable_when_rho_never_approaches_1_or_one_cfactor_is_solvable():
    assert _label({2: _scaled(SHORT, 0.7), 4: SHORT, 8: _scaled(SHORT, 1.5)}) == NOT_MEASURABLE
    # 32 layers / cfactor 16 = 2 coarse intervals: 3 iterations solve it exactly, so it is left
    # out, and cfactor 4 alone cannot be compared
    result = _convergence({4: CROSSES, 16: _scaled(CROSSES, 2.0)})
    assert convergence.verdict(result).label == NOT_MEASURABLE


# ---------------------------------------------------------------------------- gradient-bias
def _gradient_bias(eval_loss, *, rho=0.5, unigram=3.3, more=(2, 3)):
    """``eval_loss[(fwd, bwd)]``: per seed."""
    settings = dict(gradient_bias.SETTINGS["quick"], seeds=SEEDS, more=list(more), window=2)
    runs = [{"seed": seed, "scheme": f"{f},{b}", "loss": [3.0, 2.9, 2.8], "eval_loss": values[i],
             "rho_end": rho, "gradient_error": 0.1}
            for (f, b), values in eval_loss.items() for i, seed in enumerate(SEEDS)]
    return {"settings": settings, "seeds": SEEDS, "runs": runs, "unigram_loss": unigram, "data": "made up"}


def _losses(forward_heavy, mirror, more=(2, 3)):
    out = {}
    for k in more:
        out[(k, 1)] = [forward_heavy + j for j in JITTER]
        out[(1, k)] = [mirror + j for j in JITTER]
    return out


def test_gradient_bias_follows_the_eval_losses():
    label = lambda result: gradient_bias.verdict(result).label  # noqa: E731
    assert label(_gradient_bias(_losses(2.5, 2.6))) == CONFIRMED
    assert label(_gradient_bias(_losses(2.6, 2.5))) == CONTRADICTED
    assert label(_gradient_bias(_losses(2.5, 2.5))) == INCONCLUSIVE          # a tie
    noisy = _losses(2.5, 2.6)
    noisy[(1, 3)] = [2.4, 2.6, 2.7]                                         # within the noise
    assert label(_gradient_bias(noisy)) == INCONCLUSIVE
    one_way = _losses(2.5, 2.6)
    one_way[(1, 3)] = [2.4, 2.41, 2.39]                                     # (1,3) wins: contradicted
    assert label(_gradient_bias(one_way)) == CONTRADICTED


def test_gradient_bias_not_measurable_outside_rho_below_1_or_without_training():
    assert gradient_bias.verdict(_gradient_bias(_losses(2.5, 2.6), rho=1.05)).label == NOT_MEASURABLE
    # the runs' own training losses (3.0, 2.9, 2.8; window 2) did not fall below the unigram loss
    assert gradient_bias.verdict(_gradient_bias(_losses(2.5, 2.6), unigram=2.84)).label == NOT_MEASURABLE
    assert gradient_bias.verdict(_gradient_bias(_losses(2.5, 2.6), unigram=2.86)).label == CONFIRMED


def test_gradient_bias_judges_the_effect_not_a_precondition():
    # the mirror schemes trained on their own inexact forward (training loss below unigram) but
    # their exact network evaluates above the unigram loss: that is the effect, not a failed run
    assert gradient_bias.verdict(_gradient_bias(_losses(2.5, 3.6))).label == CONFIRMED
    # one noisy rho reading of 1.2 at a run's end among rho 0.5: the median run stays below 1
    result = _gradient_bias(_losses(2.5, 2.6))
    result["runs"][0]["rho_end"] = 1.2
    assert gradient_bias.verdict(result).label == CONFIRMED
    for run in result["runs"][: len(result["runs"]) // 2 + 1]:
        run["rho_end"] = 1.2
    assert gradient_bias.verdict(result).label == NOT_MEASURABLE


def test_gradient_bias_figure_draws_every_scheme_with_its_own_style(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib import pyplot

    captured = {}
    close = pyplot.close
    pyplot.close = lambda fig=None: captured.setdefault("fig", fig)
    try:
        gradient_bias.plot(_gradient_bias(_losses(2.5, 2.6)), str(tmp_path / "g.png"))
    finally:
        pyplot.close = close
    for ax in captured["fig"].axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
        assert len(labels) == len(lines) == 2 * len(SEEDS)      # every line is in the legend
        styles = {(line.get_color(), line.get_marker(), line.get_linestyle()) for line in lines}
        assert len(styles) == 2                                 # the two schemes look different
    assert (tmp_path / "g.png").stat().st_size > 10_000


# ---------------------------------------------------------------------------- dropout
def _dropout(sync_rho, fresh_rho, sync_eval, fresh_eval, serial=2.5, unigram=3.3):
    runs = []
    for i, seed in enumerate(SEEDS):
        def masks(rho, loss):
            return {"fwd_residuals": [0.3 * rho ** n for n in range(6)], "rho_forward": rho,
                    "rho_backward": rho, "mean_factor": rho, "eval_loss": loss[i]}
        runs.append({"seed": seed, "serial_eval_loss": serial, "synchronised": masks(sync_rho[i], sync_eval),
                     "fresh": masks(fresh_rho[i], fresh_eval)})
    return {"settings": dropout.SETTINGS["quick"], "seeds": SEEDS, "runs": runs, "unigram_loss": unigram,
            "data": "made up"}


def test_dropout_follows_the_residuals_and_the_gap():
    label = lambda *a, **k: dropout.verdict(_dropout(*a, **k)).label  # noqa: E731
    low, high = [0.05, 0.06, 0.04], [1.05, 1.1, 1.0]
    near, far = [2.5, 2.51, 2.49], [2.8, 2.85, 2.75]
    assert label(low, high, near, far) == CONFIRMED
    assert label(high, low, near, far) == CONTRADICTED                     # fresh converges better
    assert label(low, high, far, near) == CONTRADICTED                     # fresh trains closer
    assert label(low, high, near, near) == INCONCLUSIVE                    # a tie in the gap
    assert label(low, high, near, [2.6, 2.4, 2.55]) == INCONCLUSIVE        # within the noise
    assert label(low, high, near, far, serial=3.4) == NOT_MEASURABLE       # serial did not train


def test_mean_factor_is_the_average_reduction_per_iteration():
    assert mean_factor([1.0, 0.5, 0.25, 0.125]) == pytest.approx(0.5)
    assert mean_factor([2.0, 2.0]) == pytest.approx(1.0)


# ---------------------------------------------------------------------------- buffers
def _buffers(none_gap, buffered_gap, serial=2.5, unigram=3.3):
    runs = []
    for i, seed in enumerate(SEEDS):
        lipschitz = [{"step": 0, "values": [1.0] * 20}, {"step": 100, "values": [3.0] * 2 + [1.1] * 18}]
        runs.append({"seed": seed, "lipschitz": lipschitz, "eval_loss": {
            "no buffers": {"serial": serial, "parallel": serial + none_gap[i]},
            "2 + 16 + 2": {"serial": serial, "parallel": serial + buffered_gap[i]}}})
    return {"settings": buffers.SETTINGS["quick"], "seeds": SEEDS, "runs": runs, "unigram_loss": unigram,
            "data": "made up"}


def test_buffers_judge_the_gap_only():
    label = lambda *a, **k: buffers.verdict(_buffers(*a, **k)).label  # noqa: E731
    wide, narrow = [0.3, 0.35, 0.25], [0.02, 0.03, 0.01]
    assert label(wide, narrow) == CONFIRMED
    assert label(narrow, wide) == CONTRADICTED
    assert label(narrow, narrow) == INCONCLUSIVE                            # a tie
    assert label(narrow, [0.05, -0.02, 0.04]) == INCONCLUSIVE              # within the noise
    # the no-buffer layer-parallel run stayed at the unigram loss: it did not train
    assert label([0.9, 0.95, 0.85], narrow) == NOT_MEASURABLE
    # the Lipschitz observation does not enter the verdict: the same gaps, growth anywhere
    result = _buffers(wide, narrow)
    for run in result["runs"]:
        run["lipschitz"][1]["values"] = [1.0] * 18 + [5.0] * 2
    assert buffers.verdict(result).label == CONFIRMED
    assert buffers.growth(result["runs"][0], 2) == {"first": 1.0, "middle": 1.0, "last": 5.0}


# ---------------------------------------------------------------------------- records
@pytest.mark.parametrize("experiment", [convergence.EXPERIMENT, gradient_bias.EXPERIMENT, dropout.EXPERIMENT,
                                        buffers.EXPERIMENT], ids=lambda e: e.name)
def test_micro_record_stores_the_settings_it_ran_and_one_result_per_seed(experiment, tmp_path):
    pytest.importorskip("matplotlib")
    record = run_experiment(experiment, "micro", str(tmp_path), progress=lambda message: None)
    settings = experiment.settings["micro"]
    # the settings as the code has them (not one seed's copy), and every seed's run
    assert record["result"]["settings"] == json.loads(json.dumps(settings))
    assert record["result"]["seeds"] == settings["seeds"]
    assert sorted({run["seed"] for run in record["result"]["runs"]}) == sorted(settings["seeds"])

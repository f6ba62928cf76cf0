"""The indicator experiment's analysis and verdict rule on hand-made results (known answers)."""
import copy

from xbraid_transformers.app.reproduce.base import CONFIRMED, CONTRADICTED, NOT_MEASURABLE
from xbraid_transformers.app.reproduce.indicator import (analyse, checks, first_probe_above,
                                                        parting_batch, trailing_mean, verdict)


def test_trailing_mean_and_parting_batch():
    assert trailing_mean([1, 3, 5, 7], 2) == [1, 2, 4, 6]
    serial = [1.0] * 10
    # parts at 4 for good; an early excursion at 1 that comes back does not count
    parallel = [1.0, 1.5, 1.0, 1.0, 1.1, 1.1, 1.2, 1.2, 1.3, 1.3]
    assert parting_batch(serial, parallel, 1, 0.05) == 4
    assert parting_batch(serial, serial, 1, 0.05) is None
    assert parting_batch(serial, [1.0] * 9 + [1.2], 1, 0.05) == 9
    probes = [{"step": 0, "rho": None}, {"step": 10, "rho": 0.5}, {"step": 20, "rho": 1.2}]
    assert first_probe_above(probes, "rho", 1.0) == 20 and first_probe_above(probes, "rho", 2) is None


def _run(losses, final, probes=(), switch=None):
    return {"loss": list(losses), "final_eval_loss": final, "switch_step": switch,
            "probes": [{"step": s, "rho": r, "grad_error": g} for s, r, g in probes], "seconds": 0.0}


def _result(rho_cross=30, gap_rho=0.01, gap_gradient=0.005):
    serial = [2.0] * 50
    parallel = [2.0] * 20 + [2.5] * 30                 # parts at batch 20
    probes = [(s, 0.5 if s < rho_cross else 1.5, 0.2 if s < 20 else 0.8) for s in range(0, 50, 10)]
    runs = {"serial": _run(serial, 2.0), "parallel": _run(parallel, 2.4, probes),
            "adaptive-rho": _run(serial, 2.0 * (1 + gap_rho), switch=rho_cross),
            "adaptive-gradient": _run(serial, 2.0 * (1 + gap_gradient), switch=20)}
    family = dict(probe_every=10)
    return {"settings": {"seeds": [0], "window": 1, "part_tol": 0.02, "threshold": 1.0,
                         "grad_threshold": 0.5, "families": {"gpt": family}},
            "families": {"gpt": {"seeds": {"0": runs}}}}


def test_verdict_follows_the_stated_rule():
    on_time = _result(rho_cross=30)             # one probe interval after the parting: on time
    row = analyse(on_time)["gpt"]["rows"][0]
    assert (row["parts"], row["rho_crosses"], row["grad_crosses"], row["late"]) == (20, 30, 20, False)
    assert abs(row["gap_parallel"] - 0.2) < 1e-12 and abs(row["gap_rho"] - 0.01) < 1e-12
    assert verdict(on_time).label == CONFIRMED
    assert checks(on_time)["gpt"]["gradient_better"] is True
    late = _result(rho_cross=40)                # two intervals after: late
    assert analyse(late)["gpt"]["rows"][0]["late"] is True
    assert verdict(late).label == CONTRADICTED
    far = _result(gap_rho=0.05)                 # adaptive (rho) ends 5 % above serial
    assert verdict(far).label == CONTRADICTED and checks(far)["gpt"]["reaches"] is False
    worse = _result(gap_gradient=0.02)
    assert checks(worse)["gpt"]["gradient_better"] is False
    never = copy.deepcopy(on_time)              # rho never crosses although the losses part
    for p in never["families"]["gpt"]["seeds"]["0"]["parallel"]["probes"]:
        p["rho"] = 0.5
    assert analyse(never)["gpt"]["rows"][0]["late"] is True and verdict(never).label == CONTRADICTED


def test_timing_needs_losses_that_part():
    apart = _result()
    together = copy.deepcopy(apart)             # layer-parallel never falls behind serial
    runs = together["families"]["gpt"]["seeds"]["0"]
    runs["parallel"]["loss"] = list(runs["serial"]["loss"])
    assert checks(together)["gpt"]["timely"] is None
    assert verdict(together).label == NOT_MEASURABLE
    # a second family whose losses part makes the timing measurable again
    together["settings"]["families"]["bert"] = apart["settings"]["families"]["gpt"]
    together["families"]["bert"] = apart["families"]["gpt"]
    assert verdict(together).label == CONFIRMED

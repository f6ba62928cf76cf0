"""The indicator experiment's analysis and verdict rule on hand-made results (known answers)."""
import copy

import pytest

from xbraid_transformers.app.reproduce.base import (CONFIRMED, CONTRADICTED, INCONCLUSIVE, NOT_MEASURABLE,
                                                    seed_tolerance)
from xbraid_transformers.app.reproduce.indicator import (GAP_FLOOR, analyse, checks, first_probe_above,
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


def _seed(rho_cross, gap_adaptive, serial_final=2.0, parts=20):
    """One seed's three runs: the layer-parallel loss parts at ``parts`` (None: never), rho
    crosses 1 at the probe ``rho_cross`` (None: never), the adaptive run ends ``gap_adaptive``
    (relative) above serial."""
    serial = [2.0] * 60
    parallel = serial if parts is None else [2.0] * parts + [2.5] * (60 - parts)
    probes = [(s, 1.5 if rho_cross is not None and s >= rho_cross else 0.5, 0.2) for s in range(0, 60, 10)]
    return {"serial": _run(serial, serial_final), "parallel": _run(parallel, serial_final * 1.2, probes),
            "adaptive": _run(serial, serial_final * (1 + gap_adaptive), switch=rho_cross)}


def _result(*seeds, family="gpt"):
    """``seeds``: (rho_cross, gap_adaptive[, serial_final[, parts]]) per seed."""
    return {"settings": {"seeds": list(range(len(seeds))), "window": 1, "part_tol": 0.02, "threshold": 1.0,
                         "grad_threshold": 0.5, "families": {family: dict(probe_every=10, steps=60)}},
            "families": {family: {"seeds": {str(i): _seed(*args) for i, args in enumerate(seeds)}}}}


def test_per_seed_rows_and_the_tolerance_from_serials_spread():
    result = _result((20, 0.001, 2.0), (30, 0.002, 2.1), (20, 0.0, 1.9))
    a = analyse(result)["gpt"]
    row = a["rows"][1]
    assert (row["parts"], row["rho_crosses"], row["lateness"], row["switch"]) == (20, 30, 0, 30)
    assert row["gap_parallel"] == pytest.approx(0.2) and row["gap_adaptive"] == pytest.approx(0.002)
    # twice the seed SD of serial's final loss relative to its mean: 2 x 0.1 / 2.0
    assert a["tolerance"] == pytest.approx(seed_tolerance([1.0, 1.05, 0.95])) == pytest.approx(0.1)
    # identical serial runs: the floor
    assert analyse(_result((20, 0.0), (20, 0.0)))["gpt"]["tolerance"] == GAP_FLOOR


def test_confirmed_when_the_switch_reaches_serial_and_rho_rises_in_time():
    result = _result((10, 0.004), (20, 0.002), (10, 0.003))       # lateness -20, -10, -20
    assert checks(result)["gpt"] == {"reaches": True, "timely": True}
    assert verdict(result).label == CONFIRMED


def test_contradicted_when_the_switch_stays_behind_serial():
    # 5 % above serial in every seed, serial's spread 0: beyond the 1 % floor, interval excludes 0
    result = _result((10, 0.05), (10, 0.052), (10, 0.048))
    assert checks(result)["gpt"]["reaches"] is False and verdict(result).label == CONTRADICTED
    diverged = _result((10, 0.0), (10, 0.0), (10, 0.0))
    diverged["families"]["gpt"]["seeds"]["1"]["adaptive"]["final_eval_loss"] = None
    assert checks(diverged)["gpt"]["reaches"] is False


def test_contradicted_when_rho_crosses_late_in_every_seed():
    late = _result((50, 0.0), (50, 0.0), (40, 0.0))               # lateness 20, 20, 10
    assert checks(late)["gpt"]["timely"] is False and verdict(late).label == CONTRADICTED
    never = _result((None, 0.0), (None, 0.0), (None, 0.0))         # never crosses: counts at the end
    assert [r["lateness"] for r in analyse(never)["gpt"]["rows"]] == [30, 30, 30]
    assert verdict(never).label == CONTRADICTED


def test_inconclusive_within_the_noise_and_on_ties():
    # the mean gap (2 %) is beyond the 1 % floor but the seeds disagree on its sign
    noisy = _result((10, 0.06), (10, -0.02), (10, 0.02))
    assert checks(noisy)["gpt"]["reaches"] == INCONCLUSIVE and verdict(noisy).label == INCONCLUSIVE
    # rho crosses exactly one probe interval after the parting in every seed: a tie
    tie = _result((30, 0.0), (30, 0.0), (30, 0.0))
    assert checks(tie)["gpt"]["timely"] == INCONCLUSIVE and verdict(tie).label == INCONCLUSIVE
    # early in one seed, late in another: the timing is within the noise
    mixed = _result((10, 0.0), (50, 0.0), (20, 0.0))
    assert checks(mixed)["gpt"]["timely"] == INCONCLUSIVE
    # the losses part in one seed only: one lateness, no interval
    one = _result((10, 0.0), (10, 0.0, 2.0, None), (10, 0.0, 2.0, None))
    assert analyse(one)["gpt"]["parted"] == 1 and checks(one)["gpt"]["timely"] == INCONCLUSIVE


def test_not_measurable_when_the_losses_never_part():
    together = _result((None, 0.0, 2.0, None), (None, 0.0, 2.0, None), (None, 0.0, 2.0, None))
    assert checks(together)["gpt"] == {"reaches": None, "timely": None}
    assert verdict(together).label == NOT_MEASURABLE
    # a second family whose losses part makes the verdict measurable again
    both = copy.deepcopy(together)
    apart = _result((10, 0.004), (20, 0.002), (10, 0.003), family="vit")
    both["settings"]["families"].update(apart["settings"]["families"])
    both["families"].update(apart["families"])
    assert verdict(both).label == CONFIRMED
    assert "not measurable" in verdict(both).headline

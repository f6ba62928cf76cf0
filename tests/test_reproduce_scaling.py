"""The scaling experiment: its verdict follows the numbers it reads, and the measurement core
(``app.bench.scaling``, shared with ``benchmarks/scaling.py``) counts and prices what independent
sources say.

Oracles: XBraid's evaluation counts (``tests/data/xbraid_counts.json``) for one rank; the grid of
hierarchies enumerated by hand; the link model's documented prices (NVLink-class: 5 us a hop,
150 GB/s; a collective ``2 ceil(log2 P)`` hops); an encoder layer's parameters counted from its
shapes.
"""
import copy
import json
import math
from pathlib import Path

import pytest
import torch

from xbraid_transformers.app.bench.scaling import (Shape, allreduce_time, configurations, make_layers,
                                                   measure_world, training_iterations, unit_costs)
from xbraid_transformers.app.reproduce import run_experiment
from xbraid_transformers.app.reproduce.base import CONFIRMED, CONTRADICTED
from xbraid_transformers.app.reproduce.scaling import EXPERIMENT, SETTINGS, run, tables, verdict

TABLE = json.loads((Path(__file__).parent / "data" / "xbraid_counts.json").read_text())
TINY = Shape(d_model=8, heads=2, ff=16, batch=1, seq=4)


# ---------------------------------------------------------------------------- the verdict rule
def row(n, p, speedup, levels=2, cfactor=4):
    return dict(layers=n, ranks=p, levels=levels, cfactor=cfactor, serial_s=1.0, parallel_s=1 / speedup,
                speedup=speedup, model_speedup=speedup, calibrated_speedup=speedup, counts_match_model=True,
                config=f"L{levels} m{cfactor} F=FCF 1/1")


def synthetic(depth_speedups=(1.0, 2.0, 3.0), rank_speedups=(0.6, 1.2, 2.4, 4.0),
              times=(5.0, 3.0, 4.0, 6.0)):
    s = dict(SETTINGS["micro"], depths=[32, 64, 128], depth_ranks=8, ranks=[1, 2, 4, 8], ranks_layers=256,
             grid=[128, 8], grid_levels=[2], cfactors=[4], data=dict(layers=64, ranks=8, batch=16, seq=16))
    worlds = {f"{n}/8": [row(n, 8, v)] for n, v in zip(s["depths"], depth_speedups)}
    worlds |= {f"256/{p}": [row(256, p, v)] for p, v in zip(s["ranks"], rank_speedups)}
    data = [dict(data=2 ** i, layer=8 // 2 ** i, batch=16 // 2 ** i, config="L2 m4 F=FCF 1/1", step_s=t * 1e-3,
                 allreduce_s=0.0, time_s=t * 1e-3, gradients=1, counts_match_model=True, serial_full_batch_s=0.01)
            for i, t in enumerate(times)]
    return {"settings": s, "seeds": [], "repetitions": 2, "worlds": worlds, "data_parallel": data,
            "training_iterations": {"source": "study.json", "rows": []}}


def test_verdict_confirms_rising_speedups_and_an_interior_minimum():
    assert verdict(synthetic()).label == CONFIRMED


@pytest.mark.parametrize("perturbed", [
    dict(depth_speedups=(3.0, 2.0, 1.0)),             # speedup falls with depth
    dict(depth_speedups=(2.0, 2.1, 2.2)),             # rises by less than the 1.2x asked
    dict(rank_speedups=(4.0, 2.4, 1.2, 0.6)),         # falls with ranks
    dict(times=(3.0, 4.0, 5.0, 6.0)),                 # least at d = 1
    dict(times=(6.0, 5.0, 4.0, 3.0)),                 # least at d = P
    dict(times=(5.0, 4.9, 5.1, 6.0)),                 # interior, but within the margin of d = 1
])
def test_verdict_follows_perturbed_numbers(perturbed):
    assert verdict(synthetic(**perturbed)).label == CONTRADICTED


def test_every_speedup_says_emulated():
    result = synthetic()
    assert "emulated" in EXPERIMENT.title and verdict(result).headline.startswith("emulated speedup")
    assert verdict(result).evidence.startswith("emulated speedup")
    headers = [line for line in tables(result).splitlines() if line.startswith("| ") and "speedup" in line]
    assert len(headers) == 3
    for header in headers:
        assert all("emulated" in cell for cell in header.split("|") if "speedup" in cell)
    assert "not measured again" in tables(result) and "not found" in tables(result)


def _study_row(n, p, speedup, levels=2, cfactor=4, relax="F", iters="2/1", link="NVLINK"):
    return dict(layers=n, ranks=p, levels=levels, cfactor=cfactor, relax=relax, iters=iters, link=link,
                speedup=speedup, model_speedup=2 * speedup)


def test_training_iteration_speedups_are_cited_from_the_study(tmp_path):
    """The study's best 2/1 NVLink row per (N, P) at P = 8 and at the largest N, with the default
    hierarchy's beside it; other iterations, links and cells are left out."""
    rows = [_study_row(128, 8, 1.5), _study_row(128, 8, 2.5, levels=4), _study_row(128, 8, 9.0, iters="1/1"),
            _study_row(128, 8, 9.0, levels=3, link="INFINIBAND"), _study_row(128, 4, 1.2),
            _study_row(512, 4, 1.9, cfactor=8), _study_row(512, 8, 3.4, levels=3, cfactor=8)]
    path = tmp_path / "scaling.json"
    path.write_text(json.dumps({"provenance": {"commit": "abc1234"}, "rows": rows}))
    cited = training_iterations(str(path))
    assert [(r["layers"], r["ranks"], r["speedup"], r["default_speedup"]) for r in cited["rows"]] == [
        (128, 8, 2.5, 1.5), (512, 4, 1.9, None), (512, 8, 3.4, None)]
    assert cited["rows"][0]["config"] == "L4 m4 F 2/1" and cited["provenance"]["commit"] == "abc1234"
    assert training_iterations(str(tmp_path / "absent.json"))["rows"] == []
    table = tables(dict(synthetic(), training_iterations=cited))
    assert "| 128 | 8 | L4 m4 F 2/1 | 2.5 | 5 | 1.5 |" in table and "abc1234" in table


def test_one_dip_in_a_rising_series_is_tolerated():
    assert verdict(synthetic(rank_speedups=(0.6, 1.2, 3.0, 2.8))).label == CONFIRMED


# ---------------------------------------------------------------------------- the measurement core
def test_configurations_are_the_hierarchies_that_fit_the_layers():
    # N = 32: spacing m^(L-1) divides 32 for (L, m) = (2, 2), (2, 4), (2, 8), (3, 2), (3, 4),
    # (4, 2); any P <= N runs each (coarse levels live on the ranks that own their points);
    # each once with 1/1 iterations, with F and FCF for 2/1
    got = {(c["levels"], c["cfactor"], c["relax"], c["fwd_iters"]) for c in configurations(32, 4)}
    hierarchies = [(2, 2), (2, 4), (2, 8), (3, 2), (3, 4), (4, 2)]
    assert got == {(lv, m, "FCF", 1) for lv, m in hierarchies} | {(lv, m, r, 2) for lv, m in hierarchies
                                                                   for r in ("F", "FCF")}
    assert len(configurations(32, 4)) == 18
    assert configurations(32, 64) == []          # more ranks than layers


def test_one_rank_counts_are_xbraids():
    rows = [r for r in TABLE["rows"] if r["skip"] and r["iterations"] <= 2 and r["levels"] <= 3]
    plan = [(dict(levels=r["levels"], cfactor=r["cfactor"], relax=r["relax"], fwd_iters=r["iterations"],
                  bwd_iters=r["iterations"]), ["NVLINK"]) for r in rows]
    x = TINY.input()
    measured = measure_world(32, 1, plan, make_layers(32, TINY), x, 1, unit_costs(x, TINY, reps=1, n=4))
    for expected, got in zip(rows, measured):
        c = got["counts_critical"]
        assert (c["forward_fine"], c["forward_coarse"], c["adjoint_fine"], c["adjoint_coarse"]) == \
            (expected["fine"], expected["coarse"], expected["fine"], expected["coarse"]), expected
        assert got["counts_match_model"] and got["parallel_s"] > 0 and got["serial_s"] > 0


def test_all_reduce_costs_the_documented_collective():
    """5 us per hop, 2 ceil(log2 d) hops, 150 GB/s: the latency term alone for a small message
    (plus the thread's own few microseconds of work), the bandwidth term as the difference of two."""
    small, large = 250_000, 2_000_000
    assert allreduce_time(small, 1) == 0.0
    for ranks in (2, 4, 8):
        hops = 2 * math.ceil(math.log2(ranks))
        t_small, t_large = allreduce_time(small, ranks), allreduce_time(large, ranks)
        assert t_small == pytest.approx(hops * 5e-6 + 4 * small / 150e9, abs=5e-6)
        assert t_large - t_small == pytest.approx(4 * (large - small) / 150e9, rel=0.1)


def test_micro_run_counts_the_gradients_and_the_steps(tmp_path):
    torch.set_num_threads(1)
    record = run_experiment(EXPERIMENT, "micro", str(tmp_path), progress=lambda _: None)
    result = record["result"]
    d, ff = result["settings"]["d_model"], result["settings"]["ff"]
    per_layer = 4 * d * d + 4 * d + 2 * d * ff + ff + d + 4 * d       # attention, feed-forward, 2 norms
    n = result["settings"]["data"]["layers"]
    for r in result["data_parallel"]:
        assert r["gradients"] == per_layer * n // r["layer"]
        assert r["time_s"] == pytest.approx(r["step_s"] + r["allreduce_s"])
    assert all(r["counts_match_model"] for rows in result["worlds"].values() for r in rows)
    assert result["seeds"] == [] and result["repetitions"] == result["settings"]["reps"]      # timing, not training
    assert record["verdict"] == verdict(copy.deepcopy(result)).as_dict()


def test_settings_that_cannot_be_measured_are_clear_errors():
    s = SETTINGS["micro"]
    with pytest.raises(ValueError, match="fits 4 layers on 8 ranks"):
        run(dict(s, depths=[4], depth_ranks=8), lambda _: None)     # more ranks than layers
    with pytest.raises(ValueError, match="power-of-two"):
        run(dict(s, data=dict(s["data"], ranks=3)), lambda _: None)

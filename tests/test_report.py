"""The comparison report's time to target, on hand-made run summaries."""
import pytest

from xbraid_transformers.app.report import table, target_loss, time_to_target


def run(evals, final_eval, total_virtual):
    """A summary whose history holds evaluations (step, eval loss, virtual time)."""
    history = [{"step": s, "loss": 9.0, "virtual_time": t} for s, _, t in evals]
    for record, (_, loss, _) in zip(history, evals):
        record["eval_loss"] = loss
    history.insert(1, {"step": 1, "loss": 9.0, "virtual_time": 0.5})    # a record without eval
    return {"history": history, "final_eval_loss": final_eval, "virtual_seconds": total_virtual,
            "final_loss": 9.0, "seconds_per_step": 0.1, "virtual_seconds_per_step": 0.1}


def test_time_to_target_is_the_first_evaluation_at_or_below_the_target():
    serial = run([(9, 3.0, 10.0), (19, 2.5, 20.0)], 2.0, 30.0)
    fast = run([(9, 2.9, 4.0), (19, 2.01, 8.0)], 2.009, 12.0)     # 2.01 <= 2.0 + 0.005 * 2.0
    slow = run([(9, 2.9, 4.0), (19, 2.1, 8.0)], 2.011, 12.0)      # just above 2.01: never
    late = run([(9, 2.9, 4.0), (19, 2.1, 8.0)], 2.0, 12.0)        # only the final evaluation
    runs = {"serial": serial, "fast": fast, "slow": slow, "late": late}
    target = target_loss(runs)
    assert target == pytest.approx(2.01)
    assert time_to_target(serial, target) == 30.0
    assert time_to_target(fast, target) == 8.0
    assert time_to_target(slow, target) is None
    assert time_to_target(late, target) == 12.0
    rows = {line.split("|")[1].strip(): line for line in table(runs).splitlines()[2:]}
    assert "| 8.000 | 3.75x |" in rows["fast"] and "| never | - |" in rows["slow"]
    assert "| 30.000 | 1.00x |" in rows["serial"]


def test_no_serial_run_means_no_target():
    assert target_loss({"parallel": run([], 2.0, 1.0)}) is None
    assert time_to_target(run([], 2.0, 1.0), None) is None

"""The encoder-parity experiment: layer-parallel accuracy judged against the serial control with
the tolerance that serial's own seed spread sets, on hand-made results (confirm, contradict,
within the noise, a serial run that never learned), the determinism observation kept out of the
verdict, and the experiment at micro size (its held-out metrics against the model itself)."""
import copy

import pytest
import torch

from xbraid_transformers.app.reproduce import run_experiment
from xbraid_transformers.app.reproduce.base import CONFIRMED, CONTRADICTED, INCONCLUSIVE, NOT_MEASURABLE
from xbraid_transformers.app.reproduce.encoder_parity import EXPERIMENT, SETTINGS, run, tables, verdict

SERIAL = (0.80, 0.82, 0.81)            # SD 0.01: the tolerance is 2 x 0.01 = 0.02


def _runs(accuracies, loss_shift=0.0):
    return [{"loss": [2.3, 1.5 + loss_shift, 1.0], "accuracy": a, "eval_loss": 1.0, "prior_accuracy": 0.11,
             "prior_loss": 2.3} for a in accuracies]


def _result(differences, serial=SERIAL, ranks=(1, 2, 4, 8)):
    """Layer-parallel accuracy = serial's + ``differences`` (per seed) on every process count."""
    s = dict(SETTINGS["full"], ranks=list(ranks))
    runs = {"serial": _runs(serial)}
    runs.update({str(p): _runs([a + d for a, d in zip(serial, differences)]) for p in ranks})
    return {"settings": s, "seeds": [0, 1, 2], "runs": runs}


@pytest.mark.parametrize("differences, label", [
    ((0.005, -0.004, 0.0), CONFIRMED),        # within 0.02 of serial
    ((0.0, 0.0, 0.0), CONFIRMED),             # a tie with serial is what the claim says
    ((-0.10, -0.11, -0.09), CONTRADICTED),    # 0.1 below, the interval excludes 0
    ((-0.10, 0.08, -0.12), INCONCLUSIVE),     # mean beyond 0.02, the interval holds 0
])
def test_verdict_judges_accuracy_against_serial_with_serial_s_seed_tolerance(differences, label):
    assert verdict(_result(differences)).label == label


def test_one_process_count_that_differs_decides():
    result = _result((0.0, 0.0, 0.0))
    result["runs"]["8"] = _runs([a - 0.1 for a in SERIAL])
    assert verdict(result).label == CONTRADICTED and "P = 8: -0.1" in verdict(result).evidence


def test_a_serial_control_near_the_label_prior_is_not_measurable():
    near_prior = (0.15, 0.16, 0.14)           # within 0.1 of the prior's 0.11
    assert verdict(_result((0.0, 0.0, 0.0), serial=near_prior)).label == NOT_MEASURABLE


def test_the_tolerance_grows_with_serial_s_spread():
    noisy = (0.70, 0.80, 0.90)                # SD 0.1: tolerance 0.2
    assert verdict(_result((-0.15, -0.14, -0.16), serial=noisy)).label == CONFIRMED
    assert verdict(_result((-0.15, -0.14, -0.16))).label == CONTRADICTED


def test_determinism_is_reported_not_judged():
    result = _result((0.0, 0.0, 0.0))
    result["runs"]["2"] = _runs([a for a in SERIAL], loss_shift=0.15)        # 1.65 against 1.5: 10%
    assert verdict(result).label == CONFIRMED
    assert "P = 2: 0.1" in verdict(result).evidence and "| 0.1 |" in tables(result)


def test_micro_run_evaluates_the_same_held_out_batches_for_every_run(tmp_path):
    torch.set_num_threads(1)
    record = run_experiment(EXPERIMENT, "micro", str(tmp_path), progress=lambda _: None)
    result = record["result"]
    assert result["seeds"] == SETTINGS["micro"]["seeds"] and list(result["runs"]) == ["serial", "1", "2"]
    priors = {(r["prior_accuracy"], r["prior_loss"]) for runs in result["runs"].values() for r in runs}
    assert len(priors) == 1                   # the same labels for every seed and run
    prior_accuracy, prior_loss = priors.pop()
    # the best constant guess: its accuracy is at least 1 / classes, its loss at most log(classes)
    classes = SETTINGS["micro"]["seq_len"] + 1
    assert 1 / classes <= prior_accuracy <= 1 and 0 <= prior_loss <= torch.log(torch.tensor(classes)).item()
    for ranks in ("1", "2"):                  # layer-parallel on 2 processes: the 1-process numbers
        assert result["runs"][ranks] == result["runs"]["1"]
    assert record["verdict"] == verdict(copy.deepcopy(result)).as_dict()


def test_ranks_without_one_process_is_a_clear_error():
    with pytest.raises(ValueError, match="ranks must include 1"):
        run(dict(SETTINGS["micro"], ranks=[2]), lambda _: None)

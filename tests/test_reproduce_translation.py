"""The translation reproduction: its verdict follows the numbers, and its BLEU is sacrebleu's."""
import copy

import pytest
import torch

from xbraid_transformers.app.reproduce import run_experiment
from xbraid_transformers.app.reproduce.base import CONFIRMED, CONTRADICTED, INCONCLUSIVE, NOT_MEASURABLE
from xbraid_transformers.app.reproduce.translation import (EXPERIMENT, SETTINGS, analyse, evaluate, load_pairs,
                                                           make_model, run_seed)
from xbraid_transformers.core.layer_parallel import find_stacks
from xbraid_transformers.data.translation import greedy_bleu, synthetic_pairs

sacrebleu = pytest.importorskip("sacrebleu")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return run_experiment(EXPERIMENT, "micro", str(tmp_path_factory.mktemp("translation")))


def _with(result, serial, parallel, switched):
    """``result`` with the given final BLEU per seed for each run."""
    out = copy.deepcopy(result)
    seed = next(iter(out["per_seed"].values()))
    out["per_seed"] = {str(i): copy.deepcopy(seed) for i in range(len(serial))}
    out["seeds"] = list(range(len(serial)))
    for name, values in (("serial", serial), ("parallel", parallel), ("switched", switched)):
        for i, value in enumerate(values):
            out["per_seed"][str(i)]["runs"][name]["final_bleu"] = value
    return out


def test_micro_run_records_the_runs_of_every_seed(record):
    result = record["result"]
    assert result["seeds"] == SETTINGS["micro"]["seeds"] and set(result["per_seed"]) == {"0", "1"}
    assert EXPERIMENT.verdict(result).as_dict() == record["verdict"]
    for r in result["per_seed"].values():
        assert set(r["runs"]) == {"serial", "parallel", "switched"}
        # serial and layer-parallel start from the same weights on the same batch: the same first loss
        assert r["runs"]["serial"]["loss"][0] == pytest.approx(r["runs"]["parallel"]["loss"][0], rel=1e-4)
        assert len(r["runs"]["switched"]["loss"]) == SETTINGS["micro"]["steps"]
    # the seed changes the initial weights
    first = [r["runs"]["serial"]["loss"][0] for r in result["per_seed"].values()]
    assert first[0] != first[1]


@pytest.mark.parametrize("threshold", [1e-12, 1e12])
def test_the_switch_is_made_at_the_first_probe_whose_rho_exceeds_the_threshold(threshold):
    s = dict(SETTINGS["micro"], steps=12, probe_every=4, threshold=threshold)
    pairs = load_pairs(s)
    out = run_seed(pairs, s, seed=0)
    parallel, switched = out["runs"]["parallel"], out["runs"]["switched"]
    assert [p[0] for p in parallel["probes"]] == [0, 4, 8]         # probed all along
    if threshold < 1:            # rho > 1e-12 at the first probe (step 0): switch before step 1
        assert out["switch_step"] == 1 and all(p[1] > threshold for p in parallel["probes"])
        assert switched["loss"][:1] == parallel["loss"][:1]          # the shared part
        assert switched["loss"][1:] != parallel["loss"][1:]          # serial after the switch
    else:                        # never: the controller never switches, switched is layer-parallel
        assert out["switch_step"] is None and switched["loss"] == parallel["loss"]


def test_verdict_follows_the_numbers(record):
    verdict = EXPERIMENT.verdict
    result = record["result"]
    # serial has not learnt to translate: nothing to compare
    assert verdict(_with(result, [1.5, 1.6, 1.4], [1.5] * 3, [1.5] * 3)).label == NOT_MEASURABLE
    # within the 1-BLEU floor of the tolerance (a higher BLEU is never held against the run)
    assert verdict(_with(result, [20.0] * 3, [15.0] * 3, [19.3, 19.2, 19.4])).label == CONFIRMED
    assert verdict(_with(result, [20.0] * 3, [20.0] * 3, [25.0, 26.0, 24.0])).label == CONFIRMED
    # short of serial by more than the tolerance in every seed
    assert verdict(_with(result, [20.0] * 3, [20.0] * 3, [18.5, 18.4, 18.6])).label == CONTRADICTED
    # short on average but the seeds disagree: within the noise
    assert verdict(_with(result, [20.0] * 3, [20.0] * 3, [16.0, 21.0, 18.0])).label == INCONCLUSIVE
    # pure layer-parallel is reported, not judged
    assert verdict(_with(result, [20.0] * 3, [10.0] * 3, [20.0] * 3)).label == CONFIRMED


def test_tolerance_is_twice_serials_seed_spread():
    result = {"per_seed": {str(i): {"runs": {n: {"final_bleu": b} for n in ("serial", "parallel", "switched")}}
                           for i, b in enumerate([18.0, 20.0, 22.0])}}
    assert analyse(result)["tolerance"] == pytest.approx(4.0)     # 2 x SD 2
    result["per_seed"] = {k: v for k, v in result["per_seed"].items() if k == "0"}
    assert analyse(result)["tolerance"] == 1.0                    # one seed: the floor


class _Parrot:
    """Stands in for a Seq2Seq whose greedy translation is a given tensor."""

    def __init__(self, output, config):
        self.output, self.config = output, config

    def greedy_decode(self, src, max_len):
        return self.output


def test_bleu_of_identical_translations_is_100():
    s = dict(SETTINGS["micro"])
    model = make_model(s, load_pairs(s))
    src, tgt = synthetic_pairs(20, seed=7, vocab=s["vocab"], min_words=4, max_words=8)
    assert greedy_bleu(_Parrot(tgt, model.config), src, tgt) == pytest.approx(100.0)
    # one sentence wrong: sacrebleu on the same strings, computed here, is the oracle
    wrong = tgt.clone()
    wrong[0, 1:5] = torch.tensor([3, 3, 3, 3])
    hyps = [" ".join(str(i) for i in row.tolist() if i > 2) for row in wrong]
    refs = [" ".join(str(i) for i in row.tolist() if i > 2) for row in tgt]
    assert greedy_bleu(_Parrot(wrong, model.config), src, tgt) == pytest.approx(
        sacrebleu.corpus_bleu(hyps, [refs]).score)


def test_evaluate_scores_the_models_own_greedy_translations_with_sacrebleu():
    s = dict(SETTINGS["micro"], bleu_pairs=16, eval_pairs=16)
    pairs = load_pairs(s)
    model = make_model(s, pairs).layer_parallel()
    src, tgt = pairs.val[0][:16], pairs.val[1][:16]
    model.eval().serial()
    out = model.greedy_decode(src, max_len=tgt.shape[1])
    model.layer_parallel()
    text = [[" ".join(str(i) for i in row.tolist() if i > 2) for row in t] for t in (out, tgt)]
    measured = evaluate(model, pairs, s)
    assert measured["bleu"] == pytest.approx(sacrebleu.corpus_bleu(text[0], [text[1]]).score)
    assert all(stack.parallel for stack in find_stacks(model))   # evaluation restored the mode


def test_synthetic_pairs_reverse_and_map_every_word():
    src, tgt = synthetic_pairs(50, seed=5, vocab=20)
    mapping = {}
    for s_row, t_row in zip(src.tolist(), tgt.tolist()):
        words = s_row[:s_row.index(2)]
        assert t_row[0] == 1 and t_row[len(words) + 1] == 2
        for a, b in zip(reversed(words), t_row[1:len(words) + 1]):
            assert mapping.setdefault(a, b) == b        # one dictionary for every sentence
    assert len(set(mapping.values())) == len(mapping)  # and a one-to-one one

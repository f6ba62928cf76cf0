"""The translation reproduction: its verdict follows the numbers, and its BLEU is sacrebleu's."""
import copy

import pytest
import torch

from xbraid_transformers.app.reproduce import run_experiment
from xbraid_transformers.app.reproduce.base import CONFIRMED, CONTRADICTED, NOT_MEASURABLE
from xbraid_transformers.app.reproduce.translation import (EXPERIMENT, SETTINGS, evaluate, load_pairs,
                                                           make_model)
from xbraid_transformers.core.layer_parallel import find_stacks
from xbraid_transformers.data.translation import greedy_bleu, synthetic_pairs

sacrebleu = pytest.importorskip("sacrebleu")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return run_experiment(EXPERIMENT, "micro", str(tmp_path_factory.mktemp("translation")))


def _with(result, serial, parallel, switched, se):
    out = copy.deepcopy(result)
    for name, value in (("serial", serial), ("parallel", parallel), ("switched", switched)):
        out["runs"][name]["final_bleu"] = value
    out["serial_bleu_se"] = se
    return out


def test_micro_run_records_three_runs_from_one_start(record):
    result = record["result"]
    assert set(result["runs"]) == {"serial", "parallel", "switched"}
    assert EXPERIMENT.verdict(result).as_dict() == record["verdict"]
    parallel, switched = result["runs"]["parallel"], result["runs"]["switched"]
    shared = result["switch_step"]
    # the switched run is the layer-parallel run up to the switch, then its own
    assert switched["loss"][:shared] == parallel["loss"][:shared]
    assert switched["loss"][shared:] != parallel["loss"][shared:]
    # serial and layer-parallel start from the same weights on the same batch: the same first loss
    assert result["runs"]["serial"]["loss"][0] == pytest.approx(parallel["loss"][0], rel=1e-4)


def test_verdict_follows_the_numbers(record):
    verdict = EXPERIMENT.verdict
    result = record["result"]
    # serial has not learnt to translate: nothing to compare
    assert verdict(_with(result, 1.5, 1.5, 1.5, 0.1)).label == NOT_MEASURABLE
    # within the absolute tolerance of 1 BLEU (a higher BLEU is never held against a run)
    assert verdict(_with(result, 20.0, 19.2, 25.0, 0.1)).label == CONFIRMED
    assert verdict(_with(result, 20.0, 18.5, 20.0, 0.1)).label == CONTRADICTED
    assert verdict(_with(result, 20.0, 20.0, 18.5, 0.1)).label == CONTRADICTED
    # a noisier serial BLEU widens the tolerance to twice its standard error
    assert verdict(_with(result, 20.0, 17.0, 17.0, 2.0)).label == CONFIRMED
    assert verdict(_with(result, 20.0, 17.0, 17.0, 1.0)).label == CONTRADICTED


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

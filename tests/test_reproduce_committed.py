"""The committed reports (full size in ``benchmarks/results/reproduce/``, quick size beside it) are
what their JSON files say: every stored verdict follows from the stored numbers by the
experiment's current rule, each REPORT.md is the report rebuilt from them, and the README's
summary table is the full report's."""
import json
import os
import shutil

import pytest

from xbraid_transformers.app.reproduce import EXPERIMENTS, load_records, summary_table, write_report
from xbraid_transformers.app.reproduce.time_to_quality import headline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "benchmarks", "results", "reproduce")
REPORTS = {"full": COMMITTED, "quick": COMMITTED + "-quick"}
TIMING_ONLY = {"scaling"}   # emulated timings of untrained networks: no training seeds
MARKERS = ("<!-- reproduce-summary -->\n", "<!-- /reproduce-summary -->")


@pytest.mark.parametrize("mode", list(REPORTS))
@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_experiment_has_a_record_whose_verdict_follows_its_numbers(name, mode):
    with open(os.path.join(REPORTS[mode], f"{name}.json"), encoding="utf-8") as handle:
        record = json.load(handle)
    assert record["mode"] == mode
    # the sizes the code runs today (as JSON stores them: tuples become lists)
    assert record["result"]["settings"] == json.loads(json.dumps(EXPERIMENTS[name].settings[mode]))
    assert EXPERIMENTS[name].verdict(record["result"]).as_dict() == record["verdict"]
    assert os.path.getsize(os.path.join(REPORTS[mode], record["figure"])) > 10_000
    # training results are statistics: every experiment that trains ran at least three seeds
    seeds = record["result"]["seeds"]
    assert len(set(seeds)) == len(seeds) and (name in TIMING_ONLY or len(seeds) >= 3)


@pytest.mark.parametrize("mode", list(REPORTS))
def test_report_is_the_one_rebuilt_from_the_json_files(tmp_path, mode):
    for name in EXPERIMENTS:
        shutil.copy(os.path.join(REPORTS[mode], f"{name}.json"), tmp_path)
    with open(write_report(str(tmp_path)), encoding="utf-8") as rebuilt, \
            open(os.path.join(REPORTS[mode], "REPORT.md"), encoding="utf-8") as committed:
        assert rebuilt.read() == committed.read()


def test_readme_summary_is_the_committed_report_s():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    start, end = readme.index(MARKERS[0]) + len(MARKERS[0]), readme.index(MARKERS[1])
    expected = summary_table(load_records(COMMITTED))
    assert readme[start:end].strip() == expected, "README's summary table differs; it should be:\n" + expected


def test_readme_headline_is_the_committed_time_to_quality_record_s():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    start = readme.index("<!-- time-to-quality -->\n") + len("<!-- time-to-quality -->\n")
    end = readme.index("<!-- /time-to-quality -->")
    with open(os.path.join(COMMITTED, "time-to-quality.json"), encoding="utf-8") as handle:
        expected = headline(json.load(handle)["result"])
    assert readme[start:end].strip() == expected, "README's headline table differs; it should be:\n" + expected

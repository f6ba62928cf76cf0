"""The committed full-size report in ``benchmarks/results/reproduce/`` is what its JSON files say:
every stored verdict follows from the stored numbers by the experiment's current rule, REPORT.md
is the report rebuilt from them, and the README's summary table is the report's."""
import json
import os
import shutil

import pytest

from xbraid_transformers.app.reproduce import EXPERIMENTS, load_records, summary_table, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "benchmarks", "results", "reproduce")
MARKERS = ("<!-- reproduce-summary -->\n", "<!-- /reproduce-summary -->")


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_experiment_has_a_full_size_record_whose_verdict_follows_its_numbers(name):
    with open(os.path.join(COMMITTED, f"{name}.json"), encoding="utf-8") as handle:
        record = json.load(handle)
    assert record["mode"] == "full"
    # the sizes the code runs today (as JSON stores them: tuples become lists)
    assert record["result"]["settings"] == json.loads(json.dumps(EXPERIMENTS[name].settings["full"]))
    assert EXPERIMENTS[name].verdict(record["result"]).as_dict() == record["verdict"]
    assert os.path.getsize(os.path.join(COMMITTED, record["figure"])) > 10_000


def test_report_is_the_one_rebuilt_from_the_json_files(tmp_path):
    for name in EXPERIMENTS:
        shutil.copy(os.path.join(COMMITTED, f"{name}.json"), tmp_path)
    with open(write_report(str(tmp_path)), encoding="utf-8") as rebuilt, \
            open(os.path.join(COMMITTED, "REPORT.md"), encoding="utf-8") as committed:
        assert rebuilt.read() == committed.read()


def test_readme_summary_is_the_committed_report_s():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    start, end = readme.index(MARKERS[0]) + len(MARKERS[0]), readme.index(MARKERS[1])
    expected = summary_table(load_records(COMMITTED))
    assert readme[start:end].strip() == expected, "README's summary table differs; it should be:\n" + expected

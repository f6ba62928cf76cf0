"""Every committed results file says which code made it: each JSON file under
``benchmarks/results/`` has a top-level ``"provenance"`` (commit, date, machine, command) and each
Markdown file the same facts in a line; the helpers that write them record what git and the
command line say."""
from __future__ import annotations

import datetime
import glob
import json
import os
import re
import subprocess
import sys

import pytest

from xbraid_transformers.app.provenance import (FIELDS, UNKNOWN_COMMIT, provenance, provenance_line, stamped,
                                                write_json, write_markdown)
from xbraid_transformers.app.reproduce import EXPERIMENTS, section, write_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def _results(ext):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(RESULTS, "**", f"*.{ext}"), recursive=True))


JSON_FILES, MARKDOWN_FILES = _results("json"), _results("md")
# `git describe --always --dirty`: an abbreviated hash, or tag-N-ghash, optionally -dirty
DESCRIBED = re.compile(r"^([\w.\-/]+-\d+-g)?[0-9a-f]{7,40}(-dirty)?$")


def _load(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        return json.load(handle)


def _check_facts(facts, where):
    assert isinstance(facts, dict), f"{where}: no top-level provenance object"
    for field in FIELDS:
        assert isinstance(facts.get(field), str) and facts[field].strip(), f"{where}: provenance lacks {field!r}"
    assert facts["commit"] == UNKNOWN_COMMIT or DESCRIBED.match(facts["commit"]), \
        f"{where}: commit {facts['commit']!r} is neither `git describe --always --dirty` output nor {UNKNOWN_COMMIT!r}"
    datetime.datetime.fromisoformat(facts["date"].replace("Z", "+00:00"))   # raises on a malformed date


def test_results_are_found():
    assert "benchmarks/results/emulator_honesty.json" in JSON_FILES
    assert "benchmarks/results/reproduce/time-to-quality.json" in JSON_FILES
    assert "benchmarks/results/reproduce-quick/REPORT.md" in MARKDOWN_FILES


@pytest.mark.parametrize("path", JSON_FILES)
def test_every_committed_json_result_carries_its_provenance(path):
    _check_facts(_load(path).get("provenance"), path)


@pytest.mark.parametrize("path", MARKDOWN_FILES)
def test_every_committed_markdown_result_carries_the_provenance_of_its_numbers(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        text = handle.read()
    folder, name = os.path.split(path)
    if name == "REPORT.md":   # one section per experiment, each from its own JSON record
        sources = [os.path.join(folder, f"{e}.json") for e in EXPERIMENTS
                   if os.path.exists(os.path.join(ROOT, folder, f"{e}.json"))]
    else:
        sources = [path[:-len(".md")] + ".json"]
    lines = [line for line in text.splitlines() if line.startswith("*Provenance:*")]
    assert lines, f"{path} has no provenance line"
    for source in sources:
        assert os.path.exists(os.path.join(ROOT, source)), f"{path}: its numbers' JSON file {source} is missing"
        assert provenance_line(_load(source)["provenance"]) in lines, f"{path} lacks the provenance line of {source}"


def test_provenance_records_what_git_and_the_command_line_say():
    described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    facts = provenance([os.path.join(ROOT, "benchmarks", "memory.py"), "--smoke", "--out", "a dir"])
    after = datetime.datetime.now(datetime.timezone.utc)
    assert set(facts) == set(FIELDS)
    assert facts["commit"] == described
    assert before <= datetime.datetime.fromisoformat(facts["date"].replace("Z", "+00:00")) <= after
    assert facts["command"] == "python benchmarks/memory.py --smoke --out 'a dir'"
    assert provenance([os.path.join(sys.prefix, "bin", "xbt"), "reproduce"])["command"] == "xbt reproduce"
    assert provenance([os.path.join(os.path.dirname(pytest.__file__), "__main__.py"), "-q"])["command"] == \
        "python -m pytest -q"
    import torch
    assert f"torch {torch.__version__}" in facts["machine"] and f"{os.cpu_count()} cores" in facts["machine"]


def test_the_line_and_the_files_carry_every_fact(tmp_path):
    facts = dict(commit="abc1234-dirty", date="2026-01-02T03:04:05Z", machine="a machine", command="python x.py")
    line = provenance_line(facts)
    assert all(value in line for value in facts.values())
    write_json(str(tmp_path / "r.json"), {"provenance": {"stale": 1}, "rows": [1, 2]}, facts)
    stored = json.loads((tmp_path / "r.json").read_text())
    assert stored == {"provenance": facts, "rows": [1, 2]} and next(iter(stored)) == "provenance"
    write_markdown(str(tmp_path / "r.md"), "| a |\n|---|\n", facts)
    assert (tmp_path / "r.md").read_text().splitlines()[-1] == line


def test_incomplete_provenance_or_a_non_object_result_is_refused():
    facts = dict(commit="abc1234", date="2026-01-02T03:04:05Z", machine="m", command="")
    with pytest.raises(ValueError, match="command"):
        stamped({}, facts)
    with pytest.raises(TypeError, match="object"):
        stamped([1, 2], dict(facts, command="c"))


def test_a_reproduce_record_and_its_report_section_carry_the_run_s_provenance(tmp_path):
    experiment = EXPERIMENTS["convergence"]
    committed = _load("benchmarks/results/reproduce-quick/convergence.json")
    facts = dict(commit="abc1234", date="2026-01-02T03:04:05Z", machine="m", command="xbt reproduce --quick")
    record = write_record(experiment, "quick", str(tmp_path), committed["result"], 1.0, facts)
    assert _load(str(tmp_path / "convergence.json"))["provenance"] == facts == record["provenance"]
    assert provenance_line(facts) in section(record)
    default = write_record(experiment, "quick", str(tmp_path), committed["result"], 1.0)
    assert default["provenance"]["command"] == provenance()["command"]

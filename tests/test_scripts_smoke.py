"""Every script in ``benchmarks/`` and ``examples/`` runs, through the command a user types, at
micro size: ``python SCRIPT --smoke --out DIR`` must exit 0 within seconds and write what the
script promises into DIR (never into the committed results).

Scripts are found by glob, so a new script without ``--smoke`` fails here. A benchmark promises
JSON results carrying their provenance (and Markdown ones ending in its line); an example
promises ``metrics.json`` with the validation metrics of each mode it trained. A script whose
optional data package or library is missing is skipped with the command that installs it.
The scripts run in subprocesses, as many at a time as there are cores, when the first test of
this file asks for them.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from xbraid_transformers.app.provenance import FIELDS, provenance_line

pytestmark = pytest.mark.slow   # every script in a subprocess: about a minute of CPU time in all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(os.path.relpath(path, ROOT)
                 for folder in ("benchmarks", "examples")
                 for path in glob.glob(os.path.join(ROOT, folder, "*.py"))
                 if not os.path.basename(path).startswith("_"))   # private helpers (examples/_common.py)
# files a script writes beyond its family's promise
PROMISES = {
    "benchmarks/emulator_honesty.py": ["emulator_honesty.json", "emulator_honesty.md"],
    "benchmarks/memory.py": ["memory.json"],
    "benchmarks/multilevel.py": ["multilevel.json", "multilevel.md"],
    "benchmarks/serial_overhead.py": ["serial_overhead.json"],
}
# optional libraries (setup.py's extras) and how to install them
OPTIONAL_MODULES = {"transformers": 'pip install -e ".[hf]"', "tokenizers": 'pip install -e ".[data]"',
                    "sacrebleu": 'pip install -e ".[data]"', "matplotlib": 'pip install -e ".[cli]"',
                    "timm": "pip install --no-deps timm==1.0.31"}
TIMEOUT_S = 300   # a cold tokenizer cache costs up to a minute (README.md); a warm smoke run, seconds


def _run(script: str, out: str) -> dict:
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1", XBT_TIMEOUT="120")
    try:
        done = subprocess.run([sys.executable, script, "--smoke", "--out", out], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        partial = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x
                          for x in (exc.stdout or "", exc.stderr or ""))
        code, output = None, f"timed out after {TIMEOUT_S} s\n{partial}"
    return dict(code=code, output=output, seconds=time.perf_counter() - start, out=out)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """Every selected script that has a ``--smoke`` flag, run once."""
    selected = {item.callspec.params["script"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "script" in item.callspec.params}
    have_flag = [s for s in SCRIPTS
                 if s in selected and "--smoke" in open(os.path.join(ROOT, s), encoding="utf-8").read()]
    outs = {s: str(tmp_path_factory.mktemp(os.path.splitext(os.path.basename(s))[0])) for s in have_flag}
    before = _committed_results()
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        futures = {s: pool.submit(_run, s, outs[s]) for s in have_flag}
        results = {s: f.result() for s, f in futures.items()}
    after = _committed_results()
    for script, run in results.items():   # a results file named after the script, touched by its run
        stem = os.path.splitext(os.path.basename(script))[0]
        run["touched"] = [p for p in after if os.path.basename(p).startswith(stem) and after[p] != before.get(p)]
    summary = ", ".join(f"{s} {r['seconds']:.1f} s" for s, r in results.items())
    print(f"\nsmoke runs: {summary}")
    return results


def _committed_results() -> dict:
    """{path: modification time} of every file under benchmarks/results/."""
    paths = glob.glob(os.path.join(ROOT, "benchmarks", "results", "**", "*"), recursive=True)
    return {p: os.stat(p).st_mtime_ns for p in paths if os.path.isfile(p)}


def _missing_dependency(output: str):
    """The install command of a missing data package or optional library, from a run's output."""
    data = re.search(r"DataSourceMissing: .*? Install it with:\n\s+(.+)", output, re.S)
    if data:
        return data.group(1).strip()
    module = re.search(r"ModuleNotFoundError: No module named '([\w.]+)'", output)
    if module and module.group(1).split(".")[0] in OPTIONAL_MODULES:
        return OPTIONAL_MODULES[module.group(1).split(".")[0]]
    return None


def _numbers(value):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)


def _check_benchmark(script: str, out: str):
    written = sorted(os.listdir(out))
    missing = [name for name in PROMISES.get(script, []) if name not in written]
    assert not missing, f"{script} did not write {missing} into --out (wrote {written})"
    results = [name for name in written if name.endswith(".json")]
    assert results, f"{script} wrote no JSON results into --out (wrote {written})"
    for name in results:
        with open(os.path.join(out, name), encoding="utf-8") as handle:
            facts = json.load(handle).get("provenance", {})
        assert all(facts.get(field) for field in FIELDS), f"{name}: provenance {facts} lacks one of {FIELDS}"
        assert "--smoke" in facts["command"], f"{name}: provenance names the command {facts['command']!r}"
        table = os.path.join(out, name[:-len(".json")] + ".md")
        if os.path.exists(table):
            with open(table, encoding="utf-8") as handle:
                assert provenance_line(facts) in handle.read(), f"{table} lacks the provenance line of {name}"


def _check_example(script: str, out: str):
    path = os.path.join(out, "metrics.json")
    assert os.path.exists(path), f"{script} did not write metrics.json into --out (wrote {os.listdir(out)})"
    with open(path, encoding="utf-8") as handle:
        metrics = json.load(handle)
    numbers = list(_numbers(metrics))
    assert numbers and all(math.isfinite(x) for x in numbers), f"{script}: metrics {metrics}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_at_micro_size_and_writes_what_it_promises(script, runs):
    assert script in runs, f"{script} has no --smoke flag: every benchmark and example needs one (micro size, " \
                           "seconds) and --out DIR for its outputs"
    run = runs[script]
    assert run["code"] is not None, f"{script} --smoke: {run['output'][-3000:]}"
    if run["code"] != 0:
        install = _missing_dependency(run["output"])
        if install:
            pytest.skip(f"{script}: a data package or optional library is missing; install it with: {install}")
    assert run["code"] == 0, f"{script} --smoke exited with {run['code']}:\n{run['output'][-3000:]}"
    assert not run["touched"], f"{script} --smoke --out DIR wrote over committed results: {run['touched']}"
    if script.startswith("benchmarks/"):
        _check_benchmark(script, run["out"])
    else:
        _check_example(script, run["out"])


def test_scripts_are_found():
    """The glob sees the scripts the README documents (and not the private helpers)."""
    for script in ("benchmarks/emulator_honesty.py", "benchmarks/memory.py", "examples/gpt_shakespeare.py",
                   "examples/dropin_encoder.py"):
        assert script in SCRIPTS
    assert "examples/_common.py" not in SCRIPTS

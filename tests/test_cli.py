"""The xbt command: argparse errors for bad input, tiny runs that write their files."""
import json
import subprocess
import sys

import pytest

from xbraid_transformers.app.cli import main

TINY = ["--task", "synthetic", "--layers", "4", "--d-model", "8", "--heads", "2",
        "--seq-len", "4", "--batch-size", "2", "--cfactor", "2", "--no-progress"]


@pytest.mark.parametrize("argv, message", [
    (["train", "--task", "nope"], "invalid choice"),
    (["train", "--task", "synthetic", "--layers", "0"], "positive integer"),
    (["train", "--task", "synthetic", "--lr", "abc"], "positive number"),
    (["train", "--task", "synthetic", "--mode", "fast"], "invalid choice"),
    (["train", "--task", "synthetic", "--layers", "6", "--cfactor", "4"], "multiple of"),
    (["compare"], "required: --task"),
    (["train", "--task", "synthetic", "--schedule", "multilevel", "--steps", "40"], "no fine steps"),
    (["train", "--task", "synthetic", "--emulate", "--threads", "2"], "one torch thread"),
    (["train", "--task", "synthetic", "--mode", "serial", "--schedule", "multilevel",
      "--steps", "40"], "no fine steps"),
    (["train", "--task", "synthetic", "--schedule", "multilevel", "--cycle", "w"], "invalid choice"),
    (["train", "--task", "synthetic", "--optimizer", "lion"], "invalid choice"),
    (["train", "--task", "synthetic", "--trigger", "loss"], "invalid choice"),
    (["train", "--task", "synthetic", "--grad-threshold", "0"], "positive number"),
    (["train", "--task", "synthetic", "--momentum", "1"], "in [0, 1)"),
    (["train", "--task", "synthetic", "--schedule", "multilevel", "--coarse-gradients", "half"],
     "invalid choice"),
    ([], "required"),
])
def test_bad_arguments_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_without_checkpoint_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY, "--out", str(tmp_path), "--resume"])
    assert exit_info.value.code == 2 and "no checkpoint" in capsys.readouterr().err


def test_bad_arguments_print_no_traceback():
    result = subprocess.run([sys.executable, "-m", "xbraid_transformers.cli", "train", "--task",
                             "synthetic", "--steps", "-3"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "--steps" in result.stderr


def test_train_writes_metrics_summary_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "3", "--mode", "adaptive", "--probe-every", "2",
                 "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert (out / "checkpoint.pt").exists()
    # resume to 5 steps continues the same files
    assert main(["train", *TINY, "--steps", "5", "--mode", "adaptive", "--probe-every", "2",
                 "--out", str(out), "--resume"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]


def test_train_with_a_multilevel_schedule(tmp_path):
    out = tmp_path / "ml"
    assert main(["train", *TINY, "--layers", "8", "--steps", "7", "--mode", "parallel",
                 "--schedule", "multilevel", "--cycle", "v", "--coarse-steps", "2",
                 "--fine-steps", "1", "--optimizer-state", "reset", "--mgopt",
                 "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stride"], r["offset"]) for r in records] == [(2, 0), (2, 0), (2, 1), (2, 1),
                                                             (1, 0), (2, 0), (2, 0)]
    config = json.loads((out / "summary.json").read_text())["config"]["multilevel"]
    assert config["cycle"] == "v" and config["mgopt"] and config["optimizer_state"] == "reset"


def _check_compare(out):
    for name in ("report.md", "loss.png", "rho.png", "residuals.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    for mode in ("serial", "parallel", "adaptive"):
        assert f"| {mode} |" in report
        assert (out / mode / "metrics.jsonl").read_text().count("\n") == 4
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_writes_report_plots_and_jsonl(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--steps", "4", "--probe-every", "2", "--out", str(out)]) == 0
    _check_compare(out)


def test_compare_on_two_processes(tmp_path):
    """The same files from 2 gloo ranks."""
    out = tmp_path / "cmp2"
    argv = ["compare", *TINY, "--steps", "4", "--probe-every", "2", "--out", str(out),
            "--nprocs", "2"]
    assert main(argv) == 0
    _check_compare(out)


def test_info(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "torch" in text and "gloo" in text and "synthetic" in text

"""Long and concurrent runs, a locked run directory, the first multi-process run on an empty
data cache, errors in one line, interrupts, resume rules (the second round of reliability).

Every test runs the ``xbt`` command, in this process or as a subprocess where a signal, a pipe
or a resource limit is part of the story.
"""
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_reliability_distributed import wait_for

from xbraid_transformers.app.checkpoint import load_checkpoint
from xbraid_transformers.app.cli import main
from xbraid_transformers.distributed import launch

TINY = ["--task", "synthetic", "--layers", "4", "--d-model", "8", "--heads", "2", "--seq-len", "4",
        "--batch-size", "2", "--cfactor", "2", "--no-progress"]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process tools")
pytestmark = pytest.mark.usefixtures("one_thread")


def _xbt(*argv, before=None):
    """``xbt ARGV`` as a process of its own session, with Ctrl-C's default disposition (a
    background test runner may hand on SIGINT ignored, which Python then keeps); ``before``
    runs in the child before the command (a resource limit)."""
    def child():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if before is not None:
            before()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", "import sys; from xbraid_transformers.app.cli "
                             "import main; sys.argv[0] = 'xbt'; sys.exit(main())", *argv],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=child)


def _stop(job):
    if job.poll() is None:
        os.killpg(job.pid, signal.SIGKILL)
    return job.communicate()


def _usage_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------------- long runs
def test_a_spawned_run_has_no_whole_run_time_limit_and_prints_rank_0s_progress(tmp_path, monkeypatch,
                                                                               caplog):
    """spawn's guard for tests (timeout + a grace) must not cap a healthy training run: with
    the grace cut to 0.5 s and a 1 s timeout, the run below outlives the guard."""
    monkeypatch.setenv("XBT_TIMEOUT", "1")
    monkeypatch.setattr(launch, "JOIN_GRACE", 0.5)
    start = time.monotonic()
    with caplog.at_level(logging.INFO):
        assert main(["train", *TINY, "--steps", "100", "--print-every", "25", "--nprocs", "2",
                     "--mode", "serial", "--out", str(tmp_path / "run")]) == 0
    guard = 1 + 0.5
    assert time.monotonic() - start > guard + 0.5, "the run was too short to test the limit"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 100
    # rank 0's progress lines, forwarded to this process's log handlers
    assert [m.split(" loss")[0] for m in caplog.messages if m.startswith("serial step")] == [
        f"serial step {i}/100" for i in (1, 26, 51, 76, 100)]


# ---------------------------------------------------------------------------- an empty data cache
def _own_data(tmp_path):
    """Small files in the formats of each tokenised task's --data-path."""
    # many random words of equal frequency: the tokenizer trainers meet ties they break
    # differently in every process, as on the real corpora
    rng = torch.Generator().manual_seed(0)
    letters = torch.randint(26, (3000, 6), generator=rng)
    words = ["".join(chr(97 + int(c)) for c in row) for row in letters]

    def sentence(n):
        return " ".join(words[int(i)] for i in torch.randint(len(words), (n,), generator=rng))
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(sentence(12) for _ in range(300)))
    reviews = tmp_path / "reviews.csv"
    rows = [f'"{sentence(30)}",{i % 2},imdb' for i in range(200)]
    rows += [f'"{sentence(10)}",{i % 2},rotten_tomatoes' for i in range(400)]
    reviews.write_text("text,label,source\n" + "\n".join(rows) + "\n")
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("\n".join(f"{sentence(8)}\t{sentence(8)}" for _ in range(400)) + "\n")
    return {"gpt": text, "bert": reviews, "cls": reviews, "mt": pairs}


@pytest.mark.parametrize("task", ["gpt", "bert", "cls", "mt"])
def test_every_tokenised_task_trains_on_an_empty_cache_with_several_processes(task, tmp_path,
                                                                              monkeypatch):
    """The ranks used to tokenise at the same time, each training its own tokenizer (the
    trainers break ties differently in every process), and disagreed on the input."""
    monkeypatch.setenv("XBT_DATA_DIR", str(tmp_path / "empty-cache"))
    data = _own_data(tmp_path)[task]
    assert main(["train", "--task", task, "--data-path", str(data), "--layers", "8", "--d-model", "16",
                 "--heads", "2", "--seq-len", "16", "--batch-size", "4", "--steps", "2",
                 "--eval-batches", "1", "--nprocs", "2", "--mode", "parallel", "--no-progress",
                 "--out", str(tmp_path / "run")]) == 0


def _tokens_of(comm, path):
    from xbraid_transformers.data.text import text_file_lm
    data = text_file_lm(path, "wordpiece", 300)      # WordPiece: ties broken per process
    return [data.splits["train"].tobytes(), data.tokenizer.tok.to_str()]


def test_concurrent_jobs_preparing_one_cache_get_the_same_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("XBT_DATA_DIR", str(tmp_path / "cache"))
    results = launch.spawn(_tokens_of, 3, str(_own_data(tmp_path)["gpt"]), timeout=120)
    assert results[0] == results[1] == results[2]
    assert len(list((tmp_path / "cache" / "textfile").glob("*.lock"))) == 1


# ---------------------------------------------------------------------------- the run directory
@linux_only
def test_a_second_run_in_a_directory_in_use_is_refused_and_a_killed_run_leaves_no_lock(tmp_path, capsys):
    out = str(tmp_path / "run")
    first = _xbt("train", *TINY, "--steps", "100000", "--checkpoint-every", "0", "--out", out)
    try:
        lock = tmp_path / "run" / ".xbt-lock"
        wait_for(lambda: lock.exists() and lock.read_text().strip(), 60, "the first run took no lock")
        error = _usage_error(capsys, ["train", *TINY, "--steps", "5", "--out", out, "--overwrite"])
        assert f"in use by another run (process {first.pid} " in error
        error = _usage_error(capsys, ["compare", *TINY, "--steps", "2", "--out", out, "--overwrite"])
        assert f"process {first.pid}" in error
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    # the kernel dropped the killed run's lock
    assert main(["train", *TINY, "--steps", "2", "--out", out, "--overwrite"]) == 0


def test_compare_refuses_to_replace_runs_unless_told_to(tmp_path, capsys):
    out = str(tmp_path / "cmp")
    argv = ["compare", *TINY, "--steps", "2", "--probe-every", "1", "--out", out]
    assert main(argv) == 0
    checkpoint = tmp_path / "cmp" / "serial" / "checkpoint.pt"
    before = checkpoint.read_bytes()
    error = _usage_error(capsys, argv)
    assert "already holds a run" in error and "--overwrite" in error
    assert checkpoint.read_bytes() == before
    assert main([*argv, "--overwrite"]) == 0


# ---------------------------------------------------------------------------- interrupts
@linux_only
@pytest.mark.parametrize("nprocs", [1, 2])
def test_ctrl_c_exits_130_with_one_line_naming_the_checkpoint(nprocs, tmp_path):
    out = tmp_path / "run"
    job = _xbt("train", *TINY, "--layers", "8", "--steps", "100000", "--checkpoint-every", "5",
               "--nprocs", str(nprocs), "--out", str(out))
    try:
        wait_for(lambda: (out / "checkpoint.pt").exists(), 120, "no checkpoint")
        os.killpg(job.pid, signal.SIGINT)        # what Ctrl-C does: the whole foreground group
        _, err = job.communicate(timeout=60)
    finally:
        _stop(job)
    assert job.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert str(out / "checkpoint.pt") in lines[0] and "--resume" in lines[0]


@linux_only
def test_an_interrupted_run_without_checkpoints_is_told_how_to_start_again(tmp_path, capsys):
    out = tmp_path / "run"
    job = _xbt("train", *TINY, "--steps", "100000", "--checkpoint-every", "0", "--log-every", "1",
               "--out", str(out))
    try:
        wait_for(lambda: (out / "metrics.jsonl").exists(), 60, "no metrics")
        os.killpg(job.pid, signal.SIGINT)
        _, err = job.communicate(timeout=60)
    finally:
        _stop(job)
    assert job.returncode == 130 and "no checkpoint" in err and "--overwrite" in err, err
    error = _usage_error(capsys, ["train", *TINY, "--steps", "2", "--out", str(out)])
    assert "--overwrite" in error and "--resume" not in error
    error = _usage_error(capsys, ["train", *TINY, "--steps", "2", "--out", str(out), "--resume"])
    assert "no checkpoint" in error and "--overwrite" in error


@linux_only
def test_a_closed_pipe_ends_the_command_quietly(tmp_path):
    done = subprocess.run(f"{sys.executable} -m xbraid_transformers.cli train {' '.join(TINY)} "
                          f"--steps 300 --print-every 1 --out {tmp_path / 'run'} | head -1",
                          shell=True, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.stdout.count("\n") == 1
    assert "Logging error" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


# ---------------------------------------------------------------------------- errors in one line
def _one_line_error(capsys, argv, code=1):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_an_out_that_is_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("mine")
    err = _one_line_error(capsys, ["train", *TINY, "--steps", "2", "--out", str(target)])
    assert str(target) in err and "is a file" in err and target.read_text() == "mine"


@linux_only
def test_an_unwritable_out_is_one_line(capsys):
    # /sys refuses new entries to every user, root included
    err = _one_line_error(capsys, ["train", *TINY, "--steps", "2", "--out", "/sys/xbt-run"])
    assert "/sys/xbt-run" in err and "not permitted" in err


@linux_only
def test_an_unwritable_data_cache_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XBT_DATA_DIR", "/sys/xbt-data")
    err = _one_line_error(capsys, ["train", "--task", "gpt", "--data-path",
                                   str(_own_data(tmp_path)["gpt"]), "--layers", "4", "--steps", "1",
                                   "--no-progress", "--out", str(tmp_path / "run")])
    assert "/sys/xbt-data" in err


def test_a_checkpoint_path_that_is_a_directory_is_refused(tmp_path, capsys):
    (tmp_path / "run" / "checkpoint.pt").mkdir(parents=True)
    error = _usage_error(capsys, ["train", *TINY, "--steps", "2", "--out", str(tmp_path / "run"),
                                  "--overwrite"])
    assert "is a directory" in error
    error = _usage_error(capsys, ["train", *TINY, "--steps", "2", "--out", str(tmp_path / "other"),
                                  "--resume", str(tmp_path / "run" / "checkpoint.pt")])
    assert "is a directory" in error


@linux_only
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--out", str(out)]) == 0
    before = load_checkpoint(str(out / "checkpoint.pt"))

    def small_files():         # a file-size limit fails writes as a full disk does
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
    job = _xbt("train", *TINY, "--steps", "4", "--out", str(out), "--resume", before=small_files)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "could not write the checkpoint" in lines[0], err
    after = load_checkpoint(str(out / "checkpoint.pt"))
    assert after["step"] == before["step"] == 2


def test_tensorboard_without_its_package_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)     # what a missing package looks like
    error = _usage_error(capsys, ["train", *TINY, "--steps", "2", "--tensorboard",
                                  "--out", str(tmp_path / "run")])
    assert "pip install tensorboard" in error and not (tmp_path / "run").exists()


def test_errors_of_spawned_ranks_are_one_line_from_the_parent(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*TINY, "--layers", "8", "--out", str(out)]
    assert main(["train", *argv, "--steps", "2"]) == 0     # checkpoints resume on any rank count
    argv += ["--nprocs", "2"]
    capsys.readouterr()
    # a resume the ranks refuse
    error = _usage_error(capsys, ["train", *argv, "--steps", "4", "--resume", "--seed", "1"])
    assert len(error.strip().splitlines()) == 1 and "--seed 0" in error, error
    # a data file that is not there
    err = _one_line_error(capsys, ["train", "--task", "gpt", "--data-path", str(tmp_path / "none.txt"),
                                   "--layers", "8", "--steps", "1", "--nprocs", "2", "--no-progress",
                                   "--out", str(tmp_path / "gpt")])
    assert "none.txt" in err and "not found" in err


# ---------------------------------------------------------------------------- option values
@pytest.mark.parametrize("option, value", [
    ("--dropout", "1.5"), ("--seed", "99999999999999999999"), ("--step-size", "1e308"),
    ("--step-size", "inf"), ("--weight-decay", "inf")])
def test_option_values_that_would_fail_later_are_argparse_errors(option, value, tmp_path, capsys):
    error = _usage_error(capsys, ["train", *TINY, option, value, "--out", str(tmp_path / "run")])
    assert option in error and value in error


@pytest.mark.parametrize("options, message", [
    (["--mgopt"], "--schedule multilevel"),
    (["--line-search"], "--schedule multilevel"),
    (["--cycle", "v"], "--schedule multilevel"),
    (["--tokenizer", "bpe"], "own tokenization")])
def test_options_the_run_would_ignore_are_errors(options, message, tmp_path, capsys):
    error = _usage_error(capsys, ["train", *TINY, *options, "--out", str(tmp_path / "run")])
    assert message in error


def test_sizes_that_cannot_fit_are_refused_with_the_figure(tmp_path, capsys):
    error = _usage_error(capsys, ["train", *TINY, "--seq-len", "100000", "--batch-size", "100000",
                                  "--out", str(tmp_path / "run")])
    # 4 layers x 1e10 tokens x 16 activations of 8 float32s: at least 19,073 GiB
    assert "at least 19073.5 GiB" in error and "--seq-len 100000" in error


# ---------------------------------------------------------------------------- resume rules
@pytest.mark.parametrize("option, value", [("--seed", "3"), ("--batch-size", "3"),
                                           ("--dropout", "0.2"), ("--grad-accum", "2")])
def test_a_resume_that_changes_what_the_run_continues_is_refused(option, value, tmp_path, capsys):
    argv = ["train", *TINY, "--out", str(tmp_path / "run")]
    assert main([*argv, "--steps", "2"]) == 0
    capsys.readouterr()
    error = _usage_error(capsys, [*argv, "--steps", "4", "--resume", option, value])
    assert f"{option} {value}" in error and "start a new run" in error


def test_a_resume_with_more_steps_says_how_the_learning_rate_moves(tmp_path, caplog):
    argv = ["train", *TINY, "--out", str(tmp_path / "run"), "--warmup", "0", "--lr", "1e-3"]
    assert main([*argv, "--steps", "4"]) == 0
    caplog.clear()
    assert main([*argv, "--steps", "8", "--resume"]) == 0
    # cosine from 1e-3 down to 0.1 * 1e-3 at the last step: at step 4 of 4 that is the floor; of
    # 8, half way, where cos(pi / 2) = 0: the lr jumps back up
    was, now = 1e-3 * 0.1, 1e-3 * (0.1 + 0.9 * 0.5)
    assert "--steps 8 (was 4)" in caplog.text
    assert f"learning rate at step 4 is {now:.3g} (it was {was:.3g})" in caplog.text


def test_lost_metrics_are_named_and_edited_lines_are_skipped(tmp_path, caplog):
    out = tmp_path / "run"
    argv = ["train", *TINY, "--out", str(out), "--log-every", "1"]
    assert main([*argv, "--steps", "6"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    edited = json.loads(lines[1])
    edited["step"] = "one"
    (out / "metrics.jsonl").write_text("\n".join([lines[0], json.dumps(edited)]) + "\n")
    caplog.clear()
    assert main([*argv, "--steps", "8", "--resume"]) == 0
    assert "skipped 1 damaged line(s): line 2" in caplog.text
    assert "records of steps 1 to 5 are lost" in caplog.text
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 6, 7]

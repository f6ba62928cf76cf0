"""Failed runs, run directories, resume rules, file integrity and early errors (issue 16), in
one process; the multi-process guarantees are in test_reliability_distributed.py."""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import xbraid_transformers as xbt
from xbraid_transformers.app.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from xbraid_transformers.app.cli import main
from xbraid_transformers.app.rundir import read_run
from xbraid_transformers.app.tasks import TaskConfig, build_task
from xbraid_transformers.app.trainer import TrainConfig, Trainer, seed_everything
from xbraid_transformers.mgrit.comm_backends import default_timeout
from xbraid_transformers.mgrit.config import MGRITConfig

TINY = ["--task", "synthetic", "--layers", "4", "--d-model", "8", "--heads", "2", "--seq-len", "4",
        "--batch-size", "2", "--cfactor", "2", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _task(**changes):
    options = dict(name="synthetic", layers=4, d_model=8, heads=2, seq_len=4, batch_size=2,
                   mgrit=MGRITConfig(levels=2, cfactor=2, fwd_iters=1, bwd_iters=1))
    return TaskConfig(**{**options, **changes})


def _trainer(task=None, **options):
    task = task or _task()
    seed_everything(task.seed)
    return Trainer(build_task(task), TrainConfig(**{"mode": "parallel", "print_every": 100, **options}))


# ---------------------------------------------------------------------------- failed runs
def test_a_diverged_run_exits_non_zero_and_keeps_its_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    # plain SGD at lr 1e3, no clipping: the step-2 checkpoint is good, the solve diverges at step 3
    code = main(["train", *TINY, "--steps", "20", "--mode", "parallel", "--checkpoint-every", "2",
                 "--warmup", "10", "--optimizer", "sgd", "--clip", "0", "--lr", "1e3",
                 "--out", str(out)])
    assert code == 1
    assert "diverged at step 3" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged"].startswith("step 3")
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 2                                 # not overwritten by the diverged state
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    trainer = _trainer(steps=4, out_dir=str(tmp_path))
    trainer.fit(until=1)
    good = (tmp_path / "checkpoint.pt").read_bytes()
    with torch.no_grad():
        next(trainer.model.parameters())[0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        trainer.save()
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    summary = trainer.fit()          # the next checkpoint (the end of the run) is refused too
    assert summary["diverged"] and (tmp_path / "checkpoint.pt").read_bytes() == good


def test_an_infinite_learning_rate_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY, "--lr", "inf"])
    assert exit_info.value.code == 2 and "finite" in capsys.readouterr().err


# ---------------------------------------------------------------------------- run directories
def test_a_fresh_run_refuses_an_existing_run_unless_resumed_or_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    run = ["train", *TINY, "--steps", "2", "--mode", "serial", "--out", str(out)]
    assert main(run) == 0
    before = (out / "checkpoint.pt").read_bytes(), (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(run)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--resume" in error and "--overwrite" in error
    assert ((out / "checkpoint.pt").read_bytes(), (out / "metrics.jsonl").read_text()) == before
    with pytest.raises(SystemExit):
        main(run + ["--resume", "--overwrite"])
    assert main(run + ["--overwrite"]) == 0                   # starts again: one copy of the steps
    assert [r["step"] for r in _records(out)] == [0, 1]


# ---------------------------------------------------------------------------- resume rules
def test_resume_refuses_a_checkpoint_of_a_different_network(tmp_path):
    _trainer(steps=2, out_dir=str(tmp_path)).fit()
    # four heads instead of two: the same parameter shapes, a different network
    with pytest.raises(ValueError, match="--heads 2 there, 4 here"):
        _trainer(_task(heads=4), steps=4, out_dir=str(tmp_path), resume="auto")


def test_xbt_train_reports_a_checkpoint_it_cannot_resume_without_a_traceback(tmp_path, capsys):
    _trainer(steps=2, out_dir=str(tmp_path)).fit()
    argv = ["train", *TINY, "--mode", "parallel", "--steps", "4", "--out", str(tmp_path), "--resume"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--heads", "4"])
    assert exit_info.value.code == 2 and "--heads 2 there, 4 here" in capsys.readouterr().err


def test_resume_with_another_learning_rate_uses_it_and_says_so(tmp_path, caplog):
    _trainer(steps=4, lr=1e-2, warmup=0, min_lr_ratio=1.0, out_dir=str(tmp_path)).fit(until=2)
    with caplog.at_level(logging.WARNING):
        resumed = _trainer(steps=4, lr=1e-3, warmup=0, min_lr_ratio=1.0, out_dir=str(tmp_path),
                           resume="auto")
    assert "--lr 0.001 (was 0.01)" in caplog.text
    assert "learning rate at step 2 is 0.001 (it was 0.01)" in caplog.text
    resumed.fit()
    assert [r["lr"] for r in resumed.history] == [1e-3, 1e-3]  # constant schedule: the new peak


def test_resume_drops_replayed_and_half_written_metrics(tmp_path):
    out = tmp_path
    _trainer(steps=4, out_dir=str(out)).fit(until=2)          # checkpoint at step 2
    # the run went on past its checkpoint and was killed while writing a line
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"step": 2, "loss": 1.0}) + "\n" + '{"step": 3, "lo')
    _trainer(steps=4, out_dir=str(out), resume="auto").fit()
    assert [r["step"] for r in _records(out)] == [0, 1, 2, 3]


def test_reading_a_run_skips_a_half_written_metrics_line(tmp_path):
    """What ``--nprocs`` reads back after training (it crashed with JSONDecodeError)."""
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 2}))
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "lo')
    assert [r["step"] for r in read_run(str(tmp_path))["history"]] == [0, 1]


def test_resuming_a_finished_run_keeps_its_summary(tmp_path):
    _trainer(steps=2, out_dir=str(tmp_path)).fit()
    finished = json.loads((tmp_path / "summary.json").read_text())
    checkpoint = (tmp_path / "checkpoint.pt").read_bytes()
    summary = _trainer(steps=2, out_dir=str(tmp_path), resume="auto").fit()
    assert summary["final_loss"] == finished["final_loss"] is not None
    assert json.loads((tmp_path / "summary.json").read_text())["final_loss"] == finished["final_loss"]
    assert (tmp_path / "checkpoint.pt").read_bytes() == checkpoint     # nothing trained, nothing saved


# ---------------------------------------------------------------------------- file integrity
def test_a_flipped_bit_in_a_checkpoint_is_detected(tmp_path):
    marker = torch.full((64,), 1.2345678, dtype=torch.float32)     # easy to find in the file
    path = save_checkpoint(tmp_path / "c.pt", {"step": 1, "model": {"w": marker}})
    data = bytearray(open(path, "rb").read())
    at = data.find(marker[:4].numpy().tobytes())
    assert at > 0
    data[at + 8] ^= 0x01                                           # one bit of one weight
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)


def test_temporary_files_of_killed_writers_are_removed(tmp_path):
    dead = tmp_path / ".tmp-c.pt-999999999-abc"       # a pid above any pid_max: never alive
    older = tmp_path / ".tmp-c.pt-xyz"                # the naming of earlier versions
    live = tmp_path / f".tmp-c.pt-{os.getppid()}-abc"  # a writer that is still running
    other = tmp_path / ".tmp-d.pt-999999999-abc"      # another file's temporary
    for stray in (dead, older, live, other):
        stray.write_bytes(b"PK partial")
    save_checkpoint(tmp_path / "c.pt", {"step": 0, "model": {}})
    assert sorted(os.listdir(tmp_path)) == sorted(["c.pt", live.name, other.name])


# ---------------------------------------------------------------------------- early, clear errors
def test_a_bad_xbt_timeout_names_the_variable(monkeypatch, capsys):
    for text in ("abc", "0", "-1", "nan", "inf"):
        monkeypatch.setenv("XBT_TIMEOUT", text)
        with pytest.raises(ValueError, match="XBT_TIMEOUT"):
            default_timeout()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY, "--steps", "1"])
    assert exit_info.value.code == 2 and "XBT_TIMEOUT" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--d-model", "30", "--heads", "4"], "multiple of --heads 4"),
    (["--nprocs", "16"], "16 ranks but only 8 layers"),
    (["--data-path", "mine.txt"], "does not read a data file"),
])
def test_impossible_options_are_argparse_errors_before_any_process_starts(
        options, message, tmp_path, monkeypatch, capsys):
    def no_spawn(*args, **kwargs):
        raise AssertionError("processes were spawned before the options were checked")
    monkeypatch.setattr("xbraid_transformers.distributed.spawn", no_spawn)
    argv = ["train", "--task", "synthetic", "--layers", "8", "--no-progress", "--out", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv + options)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_one_pair_tsv_is_a_clear_error(tmp_path):
    pytest.importorskip("tokenizers")
    from xbraid_transformers.data.translation import tsv_translation
    path = tmp_path / "pairs.tsv"
    path.write_text("hello world\thola mundo\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"1 sentence pair are too few.*val split would be empty; "
                                         r"give at least \d+ pairs"):
        tsv_translation(path, root=tmp_path / "cache")


def test_random_bytes_in_the_token_cache_are_a_clear_error(tmp_path):
    from xbraid_transformers.data.cache import TokenData, save_tokens, write_meta
    save_tokens(tmp_path / "train.bin", [1, 2, 3] * 10)
    save_tokens(tmp_path / "val.bin", [3, 2, 1] * 10)
    write_meta(tmp_path, {"splits": ["train", "val"], "vocab_size": 8})
    assert TokenData.load(tmp_path).vocab_size == 8
    (tmp_path / "train.bin").write_bytes(bytes(range(256)) * 4)      # damaged: ids up to 65535
    with pytest.raises(ValueError, match="train.bin: token id .* outside the vocabulary of 8"):
        TokenData.load(tmp_path)


# ---------------------------------------------------------------------------- library
def test_retain_graph_set_on_a_drop_in_reaches_its_stack():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, norm_first=True, batch_first=True)
    enc = xbt.LayerParallelTransformerEncoder(layer, 4, mgrit=xbt.MGRITConfig(levels=2, cfactor=2))
    enc.retain_graph = True
    assert enc.stack.retain_graph and enc.retain_graph
    loss = enc(torch.randn(2, 3, 8, requires_grad=True)).sum()
    loss.backward()
    loss.backward()                   # a second backward through the same forward


def test_the_input_checksum_sees_every_element_and_its_position():
    from xbraid_transformers.core.ownership import content_checksum
    x = torch.randn(3, 5)
    assert content_checksum(x) == content_checksum(x.clone())
    changed = x.clone()
    changed[2, 4] = torch.nextafter(changed[2, 4], torch.tensor(1e9))  # one ulp
    swapped = x.clone()
    swapped[0, 0], swapped[0, 1] = x[0, 1], x[0, 0]
    assert len({content_checksum(t) for t in (x, changed, swapped)}) == 3
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool):
        content_checksum(x.to(dtype))


def test_init_distributed_destroys_its_process_group_at_exit(tmp_path):
    """The torchrun recipe: init_distributed() without an explicit destroy_process_group()."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = (
        "import atexit, torch.distributed as dist\n"
        "atexit.register(lambda: print('initialised at exit:', dist.is_initialized()))\n"
        "from xbraid_transformers.distributed import init_distributed\n"
        "init_distributed('gloo', timeout=30)\n"
        "print('initialised:', dist.is_initialized())\n")
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    # atexit runs last-registered first: init_distributed's clean-up runs before this check
    assert "initialised: True" in result.stdout and "initialised at exit: False" in result.stdout

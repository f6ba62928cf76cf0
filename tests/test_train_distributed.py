"""The trainer and ``xbt`` over several processes, against the single-process run.

Gradient clipping by the whole model's norm, optimizer state and checkpoints that do not depend
on the number of ranks, resuming on another rank count, virtual time, and the command run
unchanged by torchrun and by mpiexec (mpi4py).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import xbraid_transformers as xbt
from xbraid_transformers.app.tasks import TaskConfig, build_task
from xbraid_transformers.app.trainer import TrainConfig, Trainer, seed_everything
from xbraid_transformers.control import ControlConfig
from xbraid_transformers.distributed import (clip_grad_norm_, gather_optimizer_state,
                                             load_optimizer_state, spawn)
from xbraid_transformers.mgrit.comm import SERIAL
from xbraid_transformers.mgrit.config import MGRITConfig
from xbraid_transformers.multilevel import MultilevelConfig

from dist_utils import mpiexec_or_skip

TIMEOUT = 60.0
TASK = dict(name="synthetic", layers=8, d_model=16, heads=2, seq_len=6, batch_size=4,
            dropout=0.1, mgrit=MGRITConfig(levels=2, cfactor=2, fwd_iters=1, bwd_iters=1))
# clip 0.05: far below the gradient norm (about 1), so every step is clipped
TRAIN = dict(mode="adaptive", steps=6, lr=1e-2, warmup=2, grad_accum=2, clip=0.05,
             control=ControlConfig(probe_every=2), print_every=100)


pytestmark = pytest.mark.usefixtures("one_thread")


def train(comm, out_dir=None, until=None, resume=None, **changes):
    """Runs on every rank (and with ``SERIAL`` in this process): the synthetic task's trainer."""
    seed_everything(0)
    trainer = Trainer(build_task(TaskConfig(**TASK), comm),
                      TrainConfig(**{**TRAIN, **changes, "out_dir": out_dir, "resume": resume}))
    trainer.fit(until=until)
    state = trainer.state_dict()                        # collective: the gathered model
    return {"records": trainer.history, "model": state["model"],
            "optimizer": state["optimizer"], "rank": trainer.rank}


def _run(nprocs, *args, **kwargs):
    if nprocs == 1:
        return train(SERIAL, *args, **kwargs)
    return spawn(_worker, nprocs, args, kwargs, timeout=TIMEOUT)[0]


def _worker(comm, args, kwargs):
    return train(comm, *args, **kwargs)


def _close_runs(got, want):
    torch.testing.assert_close([r["loss"] for r in got["records"]],
                               [r["loss"] for r in want["records"]], rtol=1e-5, atol=0)
    assert list(got["model"]) == list(want["model"])
    for key, value in want["model"].items():
        torch.testing.assert_close(got["model"][key], value, rtol=1e-4, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def serial_run():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(SERIAL)
    finally:
        torch.set_num_threads(threads)


def test_two_ranks_train_like_one_process_with_clipping(serial_run):
    """Every step is clipped: the norm must be the whole model's on every rank, or the ranks'
    replicated parameters (embedding, head) drift apart and the losses leave the oracle's."""
    got = _run(2)
    assert got["rank"] == 0
    _close_runs(got, serial_run)
    # the optimizer state covers every parameter of the whole model, by name
    assert set(got["optimizer"]["state"]) == set(serial_run["optimizer"]["state"]) == set(
        serial_run["model"])
    for name, state in serial_run["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(got["optimizer"]["state"][name][key], value,
                                       rtol=1e-4, atol=1e-7, msg=f"{name} {key}")


@pytest.mark.parametrize("first, second", [(1, 2), (2, 1)])
def test_resume_on_another_rank_count(tmp_path, serial_run, first, second):
    out = str(tmp_path / "run")
    cut = _run(first, out, until=3)
    assert [r["step"] for r in cut["records"]] == [0, 1, 2]
    resumed = _run(second, out, resume="auto")
    assert [r["step"] for r in resumed["records"]] == [3, 4, 5]
    _close_runs({"records": cut["records"] + resumed["records"], "model": resumed["model"]},
                serial_run)
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in records] == list(range(6))


@pytest.mark.parametrize("mode, multilevel, strides", [
    # MGRIT over both ranks in the coarse view; layer 3 (rank 0) interpolates towards layer 4
    ("parallel", MultilevelConfig(cycle="nested", coarse_steps=3, levels=2, prolongation="linear",
                                  mgopt=True), [2, 2, 2, 1, 1, 1]),
    # one layer per rank at stride 4: the coarse view relays serially over the ranks
    ("serial", MultilevelConfig(cycle="nested", coarse_steps=2, levels=3, prolongation="linear",
                                mgopt=True), [4, 4, 2, 2, 1, 1]),
    ("parallel", MultilevelConfig(cycle="v", coarse_steps=1, fine_steps=1, mgopt=True,
                                  line_search=True), [2, 2, 1, 2, 2, 1]),
])
def test_multilevel_schedule_on_two_ranks_equals_one_process(mode, multilevel, strides):
    """Coarse views keep each rank's share of the layers: the same arithmetic as one process
    (a coarse view whose MGRIT hierarchy does not fit the ranks' blocks runs serially, which
    differs from one process where it fits, so these cases fit or are serial throughout)."""
    changes = dict(mode=mode, multilevel=multilevel)
    got, want = _run(2, **changes), train(SERIAL, **changes)
    assert [r["stride"] for r in want["records"]] == strides
    assert [r["loss"] for r in got["records"]] == [r["loss"] for r in want["records"]]
    assert list(got["model"]) == list(want["model"])
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), key


def test_clip_grad_norm_equals_torch_in_one_process():
    import copy
    for norm_type in (2.0, 1.0, float("inf")):
        ours = nn.Sequential(nn.Linear(4, 8), xbt.LayerParallel([nn.Linear(8, 8) for _ in range(4)]),
                             nn.Linear(8, 2))
        ours(torch.randn(5, 4)).pow(2).sum().backward()
        theirs = copy.deepcopy(ours)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            b.grad = a.grad.clone()
        norm = clip_grad_norm_(ours, 0.1, norm_type)
        expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.1, norm_type)
        assert expected > 0.2                           # the gradients are really scaled
        torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="norm_type"):
        clip_grad_norm_(ours, 1.0, 0.5)


def test_optimizer_state_by_name_round_trip():
    model = nn.Sequential(nn.Linear(3, 3), xbt.LayerParallel([nn.Linear(3, 3) for _ in range(4)]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    state = gather_optimizer_state(model, optimizer)
    assert set(state["state"]) == {n for n, _ in model.named_parameters()}
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)
    load_optimizer_state(model, fresh, state)
    assert fresh.param_groups[0]["lr"] == 0.1
    for p in model.parameters():
        for key, value in optimizer.state[p].items():
            assert torch.equal(fresh.state[p][key], value)
    other = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="no parameter"):
        load_optimizer_state(other, torch.optim.AdamW(other.parameters()),
                             {"state": {}, "param_groups": [{"params": ["x"], "lr": 0.1}]})


def test_virtual_time_is_recorded_on_one_and_two_ranks(serial_run):
    for run in (serial_run, _run(2, mode="parallel", steps=3)):
        times = [r["virtual_time"] for r in run["records"]]
        assert all(t is not None and t > 0 for t in times)
        assert all(b > a for a, b in zip(times, times[1:])), times


# ---------------------------------------------------------------------- launchers
CLI = ["train", "--task", "synthetic", "--layers", "4", "--d-model", "8", "--heads", "2",
       "--seq-len", "4", "--batch-size", "2", "--cfactor", "2", "--no-progress", "--steps", "3",
       "--mode", "parallel"]


def _launch(command, out, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", XBT_TIMEOUT=str(TIMEOUT), **(env or {}))
    proc = subprocess.run(command + ["--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_cli(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return _launch([sys.executable, "-m", "xbraid_transformers.cli", *CLI], out)[1]


def _check_launched(stdout, records, single):
    assert stdout.count("parallel: 3 steps") == 1          # rank 0 speaks, once
    torch.testing.assert_close([r["loss"] for r in records], [r["loss"] for r in single],
                               rtol=1e-5, atol=0)


def test_xbt_under_torchrun(tmp_path, single_cli):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "xbraid_transformers.cli", *CLI]
    _check_launched(*_launch(command, tmp_path / "run"), single_cli)


def test_xbt_under_mpiexec(tmp_path, single_cli):
    exe = mpiexec_or_skip()
    command = [exe, "-n", "2", sys.executable, "-m", "xbraid_transformers.cli", *CLI]
    _check_launched(*_launch(command, tmp_path / "run"), single_cli)


def test_nprocs_under_a_launcher_is_an_argparse_error(tmp_path):
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    proc = subprocess.run([sys.executable, "-m", "xbraid_transformers.cli", *CLI, "--nprocs", "2",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "leave it out" in proc.stderr and "Traceback" not in proc.stderr

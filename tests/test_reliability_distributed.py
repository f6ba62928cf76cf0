"""Process lifetimes and rank agreement on two processes (issue 16): workers that die with their
parent, a parent that forwards SIGTERM/SIGHUP, an MPI job that ends when a rank hangs, a
rendezvous that listens on no network interface, and ranks that pass different data."""
import os
import signal
import subprocess
import sys
import time

import pytest

from xbraid_transformers.distributed import spawn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import reliability_workers as workers  # noqa: E402
from dist_utils import mpiexec_or_skip  # noqa: E402

linux_only = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc (Linux)")


def _alive(pid):
    """Running (a zombie waiting for its reaper has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(parent, marker):
    """The pids of ``parent``'s children whose command line contains ``marker``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                command = handle.read().decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if ppid == parent and marker in command:
            found.append(int(pid))
    return found


def wait_for(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {seconds} s")
        time.sleep(0.05)


def _end_all(pids):
    """Clean-up of a failed test: leave no process behind."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")


# ---------------------------------------------------------------------------- process lifetimes
@linux_only
def test_sigterm_to_xbt_train_stops_its_workers_and_exits_non_zero(tmp_path):
    """The issue's reproduction: a long ``xbt train --nprocs 2`` whose parent gets SIGTERM."""
    out = tmp_path / "run"
    parent = subprocess.Popen(
        [sys.executable, "-m", "xbraid_transformers.cli", "train", "--task", "synthetic",
         "--layers", "4", "--d-model", "8", "--heads", "2", "--seq-len", "4", "--batch-size", "2",
         "--cfactor", "2", "--steps", "100000", "--print-every", "100000", "--no-progress",
         "--nprocs", "2", "--out", str(out)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    pids = []
    try:
        wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0 or parent.poll() is not None,
                  60, "the workers did not start training")
        assert parent.poll() is None, parent.communicate()
        pids = _children(parent.pid, "spawn_main")
        assert len(pids) == 2
        parent.send_signal(signal.SIGTERM)
        code = parent.wait(30)
        wait_for(lambda: not any(map(_alive, pids)), 10, "the workers outlived their parent")
        assert code == 128 + signal.SIGTERM, parent.communicate()
        assert "SIGTERM" in parent.communicate()[1]
        size = metrics.stat().st_size
        time.sleep(0.5)
        assert metrics.stat().st_size == size                       # no one trains on
    finally:
        _end_all([parent.pid] + pids)


@linux_only
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGHUP])
def test_spawned_workers_die_with_their_parent(tmp_path, signum):
    """SIGKILL: the parent cannot act, the workers must notice; SIGHUP: forwarded like SIGTERM."""
    parent = subprocess.Popen([sys.executable, os.path.join(HERE, "reliability_workers.py"),
                               "spawn-sleepers", str(tmp_path)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = []
    try:
        files = [tmp_path / f"worker-{r}.pid" for r in (0, 1)]
        wait_for(lambda: all(f.exists() for f in files) or parent.poll() is not None, 60,
                  "the workers did not start")
        assert parent.poll() is None, parent.communicate()
        pids = [int(f.read_text()) for f in files]
        parent.send_signal(signum)
        code = parent.wait(30)
        wait_for(lambda: not any(map(_alive, pids)), 10, "the workers outlived their parent")
        assert code != 0
    finally:
        _end_all([parent.pid] + pids)


# ---------------------------------------------------------------------------- mpiexec
def test_mpiexec_ends_when_a_rank_hangs(tmp_path):
    exe = mpiexec_or_skip()
    job = subprocess.Popen([exe, "-n", "2", sys.executable, os.path.join(HERE, "reliability_workers.py"),
                            "mpi-rank-hangs"], env=dict(_env(), XBT_TIMEOUT="2"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        _, err = job.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
        raise AssertionError("mpiexec did not end after rank 0's unhandled CommunicationError")
    assert job.returncode != 0
    assert "CommunicationError" in err and "did not complete within 2 s" in err


# ---------------------------------------------------------------------------- two ranks
@pytest.fixture(scope="module")
def two_ranks():
    """One spawn of two ranks for the checks below (each spawn costs seconds)."""
    return spawn(workers.probe, 2, timeout=30)


@linux_only
def test_the_spawn_rendezvous_listens_on_loopback_only(two_ranks):
    for rank, result in enumerate(two_ranks):
        outside = [a for a in result["listening"] if not workers.is_loopback(a)]
        assert not outside, f"rank {rank} listens on {outside} (hex, /proc/net/tcp*)"


def test_ranks_that_pass_different_inputs_get_an_error_naming_them(two_ranks):
    for result in two_ranks:
        message = result["different"]
        assert message is not None, "different inputs gave no error"
        assert "disagree on the input values" in message and "rank 0 vs rank 1" in message
        assert "check_inputs=False" in message
    # switched off: the stack runs (and every rank gets rank 0's answer, as documented)
    assert two_ranks[0]["unchecked"] == two_ranks[1]["unchecked"]

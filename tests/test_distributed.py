"""Layer-parallel runs over several processes against the single-process run (the oracle).

Pattern of torch.distributed.pipelining's tests: the same tiny model (d_model 8, 12 layers,
dropout on) is trained for two steps in one process and in P gloo processes spawned here; the
outputs, losses, input gradients and every parameter gradient of every rank must be
bit-identical: MGRIT repeats the single-process arithmetic point by point, and serial mode runs
each rank's block through autograd after the previous rank's. Results that involve another
reduction order (a data-parallel batch split, SGD steps compared after a state-dict gather of
round-off-equal runs) are compared to round-off.
"""
import os
import subprocess
import sys
import time

import dist_utils as du
import pytest
import torch
from torch import nn

import xbraid_transformers as xbt
from xbraid_transformers.core.ownership import partition_layers
from xbraid_transformers.distributed import SpawnError, spawn
from xbraid_transformers.mgrit.clock import emulate
from xbraid_transformers.mgrit.comm import SERIAL, CommunicationError, Communicator, SingleProcess
from xbraid_transformers.mgrit.comm_backends import BACKENDS

TIMEOUT = 30.0


@pytest.fixture(scope="module")
def reference():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # the workers use one thread: the same reduction order
    try:
        return du.reference_cases()
    finally:
        torch.set_num_threads(threads)


def close(a, b, exact, what):
    if exact:
        assert torch.equal(a, b), f"{what}: max difference {(a - b).abs().max():.3g}"
    else:
        rel = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
        assert rel <= 1e-6, f"{what}: relative difference {rel:.3g}"


def assert_matches(results, reference, nprocs):
    for name, _, options in du.CASES:
        ref = reference[name]
        owned_all = []
        for rank, mine in enumerate(results):
            got = mine[name]
            owned_all += got["owned"]
            for step in ("first", "second"):
                a, b = got[step], ref[step]
                where = f"{name}, rank {rank}/{nprocs}, {step} step"
                for key in ("out", "loss", "dx"):
                    close(a[key], b[key], True, f"{key} ({where})")
                local = a["grads"]
                # every parameter this rank holds, and no parameter of another rank's layers
                assert set(local) <= set(b["grads"])
                for pname, grad in local.items():
                    close(grad, b["grads"][pname], True, f"grad {pname} ({where})")
        if owned_all:
            assert sorted(owned_all) == list(range(12)), f"{name}: layers owned {owned_all}"


def _over_threads(nprocs, tmp_path):
    """Ranks as threads of this process (the thread backend, under the emulator's clocks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return emulate(du.run_cases, nprocs, timeout=TIMEOUT)
    finally:
        torch.set_num_threads(threads)


def _over_gloo(nprocs, tmp_path):
    """torch.distributed processes (gloo) spawned here."""
    return spawn(du.run_cases, nprocs, timeout=TIMEOUT)


def _over_mpiexec(nprocs, tmp_path):
    """mpiexec processes that join through ``init_distributed`` (mpi4py); they run the first
    three cases, the others are filled in from the reference by the caller."""
    exe = du.mpiexec_or_skip()
    out = tmp_path / "mpi"
    env = dict(os.environ, XBT_TIMEOUT=str(TIMEOUT), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([exe, "-n", str(nprocs), sys.executable, "-m", "mpi4py", du.__file__,
                           str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = [torch.load(f"{out}.{r}", weights_only=False) for r in range(nprocs)]
    assert all(r.pop("kind") == "MPIComm" for r in results)
    return results


# backend name -> (how its ranks are started, the rank counts tested): one entry for every
# backend of the registry (the test below fails for a backend registered without a parity run)
PARITY_RUNS = {
    "threads": (_over_threads, [2, 3, 4]),
    "torch.distributed": (_over_gloo, [1, 2, 3, 4]),
    "mpi4py": (_over_mpiexec, [2]),
}


def test_every_registered_backend_has_a_parity_run():
    assert sorted(PARITY_RUNS) == sorted(b.name for b in BACKENDS)


@pytest.mark.parametrize("backend, nprocs", [(name, n) for name, (_, counts) in PARITY_RUNS.items()
                                             for n in counts])
def test_parity_with_the_single_process_run_over_every_backend(backend, nprocs, reference, tmp_path):
    start, _ = PARITY_RUNS[backend]
    results = start(nprocs, tmp_path)
    for r in results:      # cases a run leaves out are taken from the reference (nothing owned)
        for name, *_ in du.CASES:
            r.setdefault(name, reference[name] | {"owned": []})
    assert_matches(results, reference, nprocs)
    if nprocs > 1:   # each rank holds only its own layers
        counts = [len(r["mgrit-1/1"]["first"]["grads"]) for r in results]
        assert max(counts) < len(reference["mgrit-1/1"]["first"]["grads"])


def test_gather_state_dict_round_trip_across_rank_counts(tmp_path):
    first, second = tmp_path / "after1.pt", tmp_path / "after2.pt"
    local = spawn(du.gather_worker, 2, 12, "", str(first), timeout=TIMEOUT)
    spawn(du.gather_worker, 3, 12, str(first), str(second), timeout=TIMEOUT)
    # the oracle: the same two SGD steps in one process
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = du.gather_worker(SERIAL, 12, "", str(tmp_path / "s1.pt"))
        du.gather_worker(SERIAL, 12, str(tmp_path / "s1.pt"), str(tmp_path / "s2.pt"))
    finally:
        torch.set_num_threads(threads)
    for ours, theirs in ((first, tmp_path / "s1.pt"), (second, tmp_path / "s2.pt")):
        a, b = torch.load(ours, weights_only=True), torch.load(theirs, weights_only=True)
        assert list(a) == list(b)                       # every key, in the serial order
        for key in b:
            close(a[key], b[key], False, key)
    model = du.TinyModel()                              # loads into a serial model
    model.load_state_dict(torch.load(second, weights_only=True))
    assert max(local) < serial                          # ranks hold a share of the parameters


def test_layer_by_data_parallel_equals_serial_data_parallel():
    mgrit = dict(levels=2, cfactor=2, fwd_iters=2, bwd_iters=1)
    results = spawn(du.data_parallel_worker, 4, 2, 2, mgrit, timeout=TIMEOUT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = du.data_parallel_reference(2, mgrit)
    finally:
        torch.set_num_threads(threads)
    got = results[0]
    assert got is not None and all(r is None for r in results[1:])
    assert set(got) == set(expected)
    for key, value in expected.items():   # batch halves change the matmul blocking: round-off
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("how, timeout", [("die", 5.0), ("hang", 3.0)])
def test_a_dead_or_hung_rank_ends_the_job_with_a_clear_error(how, timeout):
    start = time.monotonic()
    with pytest.raises(SpawnError) as info:
        spawn(du.fault_worker, 3, 1, how, timeout=timeout, join_timeout=timeout + 60)
    elapsed = time.monotonic() - start
    message = str(info.value)
    # the root cause first: the rank that died or hung, then the ranks that failed because of it
    assert [f.rank for f in info.value.failures][0] == 1 and message.splitlines()[1].startswith("rank 1:")
    assert ("killed" in message.splitlines()[1] or "exited with code 3" in message.splitlines()[1]
            if how == "die" else "stopped" in message.splitlines()[1]), message
    for rank in (0, 2):   # the survivors fail on their own, with the clear error
        line = next(l for l in message.splitlines() if l.startswith(f"rank {rank}:"))
        assert "clean failure" in line, message
        # a dead peer is noticed at once and said so; only a hung one costs the timeout
        assert ("failed after" in line and "within" not in line if how == "die"
                else "did not complete within" in line or "failed after" in line), message
    assert elapsed < timeout + 40, elapsed


def test_bad_input_is_reported_on_every_rank():
    results = spawn(du.bad_input_worker, 2, timeout=TIMEOUT)
    for messages in results:
        assert "disagree on the number of layers" in messages["layers"]
        assert "disagree on the input" in messages["input"]
        assert "cannot be split evenly over 2 ranks" in messages["even"]
        assert "partition [3, 8] cannot be used" in messages["counts"]
        assert "2 ranks but only 1 layers" in messages["ranks"]
    assert [m["owned"] for m in results] == [[0, 1, 2], [3, 4, 5, 6, 7, 8, 9]]


def test_partitions_are_balanced_to_one_layer():
    assert partition_layers(12, 2, 4) == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert partition_layers(14, 2, 4) == [(0, 4), (4, 8), (8, 11), (11, 14)]
    assert partition_layers(16, 16, 16) == [(n, n + 1) for n in range(16)]
    assert partition_layers(16, 4, 2, "even") == [(0, 8), (8, 16)]
    assert partition_layers(12, 2, 2, [5, 7]) == [(0, 5), (5, 12)]
    with pytest.raises(ValueError, match="9 ranks but only 8 layers"):
        partition_layers(8, 4, 9)
    with pytest.raises(ValueError, match="10 layers cannot be split into coarsest-level intervals of 4"):
        partition_layers(10, 4, 2)
    with pytest.raises(ValueError, match="cannot be split evenly over 4"):
        partition_layers(18, 2, 4, "even")


def test_reversed_view_swaps_neighbours():
    comm = SingleProcess()      # the neighbours are pure arithmetic on rank and size
    comm.rank, comm.size = 1, 3
    assert (comm.prev, comm.next) == (0, 2)
    view = comm.reversed()
    assert (view.prev, view.next) == (2, 0) and (comm.prev, comm.next) == (0, 2)
    assert view.reversed().prev == 0
    assert SERIAL.exchange(torch.ones(1)) is None


def test_a_backend_must_implement_every_primitive_and_can_be_registered():
    """The contract: a Communicator that forgets a primitive cannot be made (nothing falls back
    to single-process answers), and a registered backend is what comm= accepts."""
    from xbraid_transformers.mgrit import comm_backends

    class Forgetful(Communicator):       # everything but allgather
        def isend(self, tensor, dst): pass
        def recv(self, like, src): return like
        def allreduce(self, tensor, op="sum"): return tensor
        def broadcast(self, tensor, root): return tensor
        def flush(self): pass

    with pytest.raises(TypeError, match="allgather"):
        Forgetful()

    class Other:                         # another library's communicator
        pass

    with pytest.raises(TypeError, match="torch.distributed, mpi4py"):
        xbt.LayerParallel([nn.Linear(2, 2) for _ in range(4)], comm=Other())
    comm_backends.register_backend("other", lambda c: isinstance(c, Other), lambda c: SERIAL)
    try:
        stack = xbt.LayerParallel([nn.Linear(2, 2) for _ in range(4)], comm=Other())
        assert stack.comm is SERIAL
    finally:
        comm_backends.BACKENDS.pop()
    with pytest.raises(CommunicationError, match="no rank 1"):
        SERIAL.isend(torch.ones(1), 1)


def test_init_distributed_starts_the_registered_backend_of_the_launch(monkeypatch):
    """init_distributed asks the registry: a backend registered with a start is what
    backend= names under its launcher; a name no backend of the launcher lists is an error
    that names the choices."""
    from xbraid_transformers.mgrit import comm_backends
    started = []

    class Fake(SingleProcess):
        pass

    def start(choice, launcher, timeout):
        started.append((choice, launcher, timeout))
        return Fake()

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    comm_backends.register_backend("fake", start=start, choices=("fake",),
                                   starts_under=("torchrun",), communicator=Fake)
    try:
        assert isinstance(xbt.init_distributed("fake", timeout=7), Fake)
        assert started == [("fake", "torchrun", 7.0)]
        with pytest.raises(ValueError, match="no backend 'bogus' for a launch by torchrun: "
                                             "choose one of gloo, nccl, fake"):
            xbt.init_distributed("bogus")
    finally:
        comm_backends.BACKENDS.pop()
    with pytest.raises(ValueError, match="choices, starts_under and default_for need a start"):
        comm_backends.register_backend("broken", choices=("x",))

"""Virtual clocks of emulated ranks, and the cost model, on cases with known answers."""
import time

import pytest
import torch

from xbraid_transformers.perf import LinkModel, cost_model, emulate


def busy(seconds):
    """Burn CPU time of this thread (not wall time)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def ping(comm, work):
    comm.clock.reset()
    if comm.rank == 0:
        busy(work)
        comm.isend(torch.zeros(250), 1)           # 1000 bytes
    else:
        comm.recv(torch.zeros(250), 0)
    comm.clock.tick()
    return comm.clock.time, comm.clock.compute


def test_a_receive_takes_the_senders_clock_plus_the_link_cost():
    link = LinkModel(latency=1.0, bandwidth=1000.0)   # 1 s + 1000 B / 1000 B/s = 2 s
    (t0, c0), (t1, c1) = emulate(ping, 2, 0.05, link=link)
    assert 0.05 <= c0 < 0.2                           # rank 0 computed ~0.05 s
    assert c1 < 0.05                                  # rank 1 only waited
    assert t1 == pytest.approx(t0 + 2.0, abs=0.02)


def test_emulated_ranks_compute_one_at_a_time():
    """Only one rank computes at any moment (its CPU time is then its own), and a rank waiting
    for a message lets the others run (no deadlock)."""
    inside, most = [0], [0]
    a = torch.randn(128, 128)

    def work(comm):
        for _ in range(3):
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            for _ in range(20):
                a @ a                       # releases the GIL: other threads could run now
            inside[0] -= 1
            comm.isend(torch.ones(1), (comm.rank + 1) % comm.size)
            comm.recv(torch.ones(1), (comm.rank - 1) % comm.size)
        return comm.allreduce(torch.ones(1))

    results = emulate(work, 4)
    assert most[0] == 1
    assert all(float(r) == 4 for r in results)


def test_cost_model_limits():
    # one level is the serial chain: no speedup, whatever the ranks
    assert cost_model(64, 4, 1, 2, 1, 1)["speedup"] == pytest.approx(1.0)
    # two levels, F-relaxation, no skip, one rank: per iteration (m-1)/m N relaxation, 2N/m for
    # the FAS residual (fine at the C-points, coarse right-hand side), N/m coarse; the
    # interpolation only corrects C-points (the coarse level's serial solve set all of its
    # points, and the fine F-points are renewed by the final sweep); plus the final sweep N
    n, m = 64, 4
    one_iter = (m - 1) / m * n + 2 * n / m + n / m + n
    model = cost_model(n, 1, 2, m, 1, 1, relax="F", skip_first_downcycle=False)
    assert model["parallel"] == pytest.approx(3 * one_iter)
    assert model["serial"] == pytest.approx(3 * n)
    # more ranks never cost more on the critical path
    speedups = [cost_model(128, p, 3, 4, 1, 1)["speedup"] for p in (1, 2, 4, 8)]
    assert speedups == sorted(speedups)


def _stack_with_clock(comm, results):
    """A 4-layer stack split over the ranks, its messages stamped by one shared clock."""
    import xbraid_transformers as xbt
    from xbraid_transformers.mgrit.comm_backends import ThreadComm
    from xbraid_transformers.perf import ClockedComm, VirtualClock, attach_clock
    model = torch.nn.Sequential(xbt.LayerParallel([torch.nn.Linear(4, 4) for _ in range(4)],
                                                  mgrit=xbt.MGRITConfig(levels=2, cfactor=2),
                                                  comm=comm))
    link = LinkModel(latency=1.0, bandwidth=1e12)
    clock = attach_clock(model, link=link, clock=VirtualClock())
    again = attach_clock(model, link=link, clock=clock)  # re-attaching wraps once, not twice
    stack = model[0]
    wrapped = isinstance(stack.comm, ClockedComm) and isinstance(stack.comm.inner, ThreadComm)
    model(torch.ones(2, 4)).sum().backward()
    clock.tick()
    results[comm.rank] = (wrapped and again is clock, clock.messages, clock.time, clock.compute)


def test_attach_clock_stamps_the_messages_of_a_split_stack():
    """Every message costs 1 s of virtual time under this link: the clocks of both ranks move
    by whole seconds of waiting beyond their CPU time."""
    import threading

    from xbraid_transformers.mgrit.comm_backends import ThreadWorld
    world, results = ThreadWorld(2, timeout=30), [None, None]
    threads = [threading.Thread(target=_stack_with_clock, args=(world.comm(r), results))
               for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for wrapped, messages, total, compute in results:
        assert wrapped and messages > 0
        assert total >= compute + 1.0                     # at least one message waited for

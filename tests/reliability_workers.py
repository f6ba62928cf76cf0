"""Workers and entry points of the reliability tests that need processes of their own:
``python reliability_workers.py spawn-sleepers DIR`` spawns two workers that write their pids
into DIR and then wait forever (the tests signal the parent and watch the workers)."""
import os
import sys
import time

import torch


def sleeper(comm, directory):
    """Announce this worker's pid, then wait until something ends the process."""
    path = os.path.join(directory, f"worker-{comm.rank}.pid")
    with open(path + ".tmp", "w") as handle:
        handle.write(str(os.getpid()))
    os.replace(path + ".tmp", path)       # complete when it appears
    while True:
        time.sleep(1)


def listening_addresses():
    """The local addresses this process listens on (TCP, IPv4 and IPv6), from /proc."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:      # 0A: LISTEN
                    found.append(fields[1].split(":")[0])
    return found


def is_loopback(hex_address):
    """/proc/net/tcp* address in hex (little-endian words) -> is it 127.0.0.0/8 or ::1?"""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        return words[0] == 127
    if words[:12] == b"\0" * 10 + b"\xff\xff":        # IPv4-mapped
        return words[12] == 127
    return words == b"\0" * 15 + b"\1"


def probe(comm):
    """What the two-rank reliability tests look at, from one spawn: the sockets this rank listens
    on, and what a layer-parallel stack does when the ranks pass different inputs."""
    import xbraid_transformers as xbt
    result = {"listening": listening_addresses()}
    torch.manual_seed(0)
    stack = xbt.LayerParallel([torch.nn.Linear(4, 4) for _ in range(4)],
                              mgrit=xbt.MGRITConfig(levels=2, cfactor=2), comm=comm)
    same = torch.ones(2, 4)
    different = torch.ones(2, 4)
    different[1, 3] += comm.rank                  # one entry differs on rank 1
    stack(same)                                   # equal inputs pass
    try:
        stack(different)
        result["different"] = None
    except ValueError as error:
        result["different"] = str(error)
    stack.check_inputs = False                    # the documented switch: no content check
    result["unchecked"] = stack(different).tolist()
    return result


def mpi_rank_hangs():
    """Under ``mpiexec -n 2``: rank 1 hangs, rank 0's all-reduce times out (XBT_TIMEOUT) and its
    CommunicationError goes unhandled; the job must end instead of waiting for rank 1."""
    from xbraid_transformers.distributed import init_distributed
    comm = init_distributed()
    if comm.rank == 1:
        time.sleep(3600)
    comm.allreduce(torch.zeros(1))


if __name__ == "__main__":
    if sys.argv[1] == "spawn-sleepers":
        from xbraid_transformers.distributed import spawn
        spawn(sleeper, 2, sys.argv[2], timeout=60)
    elif sys.argv[1] == "mpi-rank-hangs":
        mpi_rank_hangs()

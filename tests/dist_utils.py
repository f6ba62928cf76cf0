"""Helpers of the multi-process tests: tiny models, one training step, and the workers that
``xbt.distributed.spawn`` (gloo) or ``mpiexec`` (mpi4py) run. The single-process reference is
computed with the same functions and ``comm=None``."""
import os
import shutil
import sys
import time

import torch
from torch import nn

import xbraid_transformers as xbt
from xbraid_transformers.distributed import gather_state_dict, init_distributed, layer_data_groups
from xbraid_transformers.mgrit.comm import CommunicationError

def mpiexec_or_skip() -> str:
    """The mpiexec beside this interpreter (the mpich wheel's) or on PATH; skips the test when
    it or mpi4py is missing."""
    exe = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        exe = None
    if exe is None:
        import pytest   # this module is also an mpiexec worker, which needs no pytest
        pytest.skip("mpi4py or mpiexec is missing: pip install mpi4py mpich (the dev extras)")
    return exe


D_MODEL, NHEAD, FF = 8, 2, 16
SEED, DROPOUT_SEED = 0, 1234

# (name, serial mode?, MGRIT options) of the parity cases; 12 layers, cfactor 2: 6 coarsest
# intervals with 2 levels, 3 with 3 levels (fewer than 4 ranks: the coarsest level then lives
# on 3 of them); cfactor 4: intervals of 4 layers that blocks of 3 layers (4 ranks) cut.
CASES = [
    ("serial", True, dict(levels=2, cfactor=2)),
    ("mgrit-1/1", False, dict(levels=2, cfactor=2, fwd_iters=1, bwd_iters=1)),
    ("mgrit-2/1", False, dict(levels=2, cfactor=2, fwd_iters=2, bwd_iters=1, relax="F")),
    ("mgrit-3/2", False, dict(levels=2, cfactor=2, fwd_iters=3, bwd_iters=2,
                              skip_first_downcycle=False)),
    ("mgrit-3lvl-2/1", False, dict(levels=3, cfactor=2, fwd_iters=2, bwd_iters=1, cycle="F")),
    ("mgrit-m4-2/2", False, dict(levels=2, cfactor=4, fwd_iters=2, bwd_iters=2)),
]


class TinyModel(nn.Module):
    """Replicated input layer -> layer-parallel encoder (with final norm) -> replicated head."""

    def __init__(self, comm=None, num_layers=12, dropout=0.1, mgrit=None):
        super().__init__()
        torch.manual_seed(SEED)   # the same weights on every rank (and in the reference)
        self.embed = nn.Linear(4, D_MODEL)
        layer = nn.TransformerEncoderLayer(D_MODEL, NHEAD, FF, dropout=dropout, norm_first=True,
                                           batch_first=True)
        self.encoder = xbt.LayerParallelTransformerEncoder(
            layer, num_layers, nn.LayerNorm(D_MODEL), mgrit=mgrit, dropout_seed=DROPOUT_SEED,
            comm=comm)
        self.head = nn.Linear(D_MODEL, 3)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)))


def batch(size=3, seq=5, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, seq, 4, generator=g), torch.randint(0, 3, (size, seq), generator=g)


def train_step(model, x, y):
    """One forward/backward; returns output, loss, input gradient, parameter gradients."""
    x = x.clone().requires_grad_()
    model.zero_grad()
    out = model(x)
    loss = nn.functional.cross_entropy(out.reshape(-1, 3), y.reshape(-1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return dict(out=out.detach(), loss=loss.detach(), dx=x.grad.clone(), grads=grads)


def run_cases(comm, cases=None):
    """Every parity case on this rank (two training steps each, so the dropout counters and
    the second call are covered); cases that this rank count refuses return the error."""
    results = {}
    x, y = batch()
    for name, serial, options in (cases or CASES):
        try:
            model = TinyModel(comm, mgrit=xbt.MGRITConfig(**options))
        except ValueError as error:
            results[name] = f"ValueError: {error}"
            continue
        if serial:
            model.encoder.serial()
        model.train()
        first = train_step(model, x, y)
        second = train_step(model, x * 0.5, y)
        results[name] = dict(first=first, second=second,
                             owned=list(model.encoder.stack.owned_layers))
    return results


def reference_cases(cases=None):
    return run_cases(None, cases)


# ---------------------------------------------------------------------- other workers
def gather_worker(comm, num_layers, path_in, path_out):
    """Build (optionally loading a full state dict), take an SGD step, gather to rank 0."""
    model = TinyModel(comm, num_layers=num_layers, dropout=0.0,
                      mgrit=xbt.MGRITConfig(levels=2, cfactor=2))
    if path_in:
        model.load_state_dict(torch.load(path_in, weights_only=True))
    local = sum(p.numel() for p in model.parameters())
    model.encoder.serial()
    x, y = batch()
    train_step(model, x, y)
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    full = gather_state_dict(model)
    if full is not None:
        torch.save(full, path_out)
    return local


def data_parallel_worker(comm, layer_size, steps, mgrit):
    """Layer x data parallel: each layer group trains on its slice of the global batch and the
    gradients are averaged over the data group. Returns the gathered state (rank 0)."""
    import torch.distributed as dist
    layer_comm, data_group = layer_data_groups(layer_size, timeout=comm.timeout)
    data_rank, data_size = dist.get_rank(data_group), dist.get_world_size(data_group)
    model = TinyModel(layer_comm, dropout=0.0, mgrit=xbt.MGRITConfig(**mgrit))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        x, y = batch(size=4, seed=10 + step)
        part = slice(data_rank * 4 // data_size, (data_rank + 1) * 4 // data_size)
        opt.zero_grad()
        out = model(x[part])
        loss = nn.functional.cross_entropy(out.reshape(-1, 3), y[part].reshape(-1))
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad, group=data_group)
            p.grad /= data_size
        opt.step()
    full = gather_state_dict(model)   # every rank of the layer group takes part
    return full if dist.get_rank() == 0 else None


def data_parallel_reference(steps, mgrit):
    model = TinyModel(None, dropout=0.0, mgrit=xbt.MGRITConfig(**mgrit))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        x, y = batch(size=4, seed=10 + step)
        opt.zero_grad()
        out = model(x)
        nn.functional.cross_entropy(out.reshape(-1, 3), y.reshape(-1)).backward()
        opt.step()
    return model.state_dict()


def fault_worker(comm, victim, how):
    """Rank ``victim`` dies (``how="die"``) or hangs (``"hang"``) before the forward; the
    others must fail with CommunicationError within the timeout. Returns nothing."""
    model = TinyModel(comm, mgrit=xbt.MGRITConfig(levels=2, cfactor=2))
    x, y = batch()
    if comm.rank == victim:
        if how == "die":
            os._exit(3)
        time.sleep(3600)
    start = time.monotonic()
    try:
        train_step(model, x, y)
    except CommunicationError as error:
        raise RuntimeError(f"clean failure after {time.monotonic() - start:.1f} s: {error}")
    raise AssertionError("the step succeeded although a rank was missing")


def bad_input_worker(comm):
    """Ranks that disagree (layer count, input shape) and partitions that cannot be used; each
    must fail on every rank with a clear ValueError. Returns the messages."""
    messages = {}
    mgrit = xbt.MGRITConfig(levels=2, cfactor=2)
    try:
        TinyModel(comm, num_layers=8 + 4 * comm.rank, mgrit=mgrit)
    except ValueError as error:
        messages["layers"] = str(error)
    model = TinyModel(comm, mgrit=mgrit)
    x, y = batch(size=2 + comm.rank)
    try:
        train_step(model, x, y)
    except ValueError as error:
        messages["input"] = str(error)
    layers = [nn.Linear(4, 4) for _ in range(10)]   # 5 coarsest intervals of 2 layers
    single = xbt.MGRITConfig(levels=1)
    bad = {"even": (layers[:9], single, "even"),     # 9 layers cannot be split evenly over 2
           "counts": (layers, mgrit, [3, 8]),       # do not sum to the layers
           "ranks": (layers[:1], single, None)}     # fewer layers than ranks
    for name, (some, config, partition) in bad.items():
        try:
            xbt.LayerParallel(some, mgrit=config, comm=comm, partition=partition)
        except ValueError as error:
            messages[name] = str(error)
    # blocks that are not multiples of the coarsest spacing are fine
    stack = xbt.LayerParallel(layers, mgrit=mgrit, comm=comm, partition=[3, 7])
    messages["owned"] = list(stack.owned_layers)
    return messages


def spread_worker(comm, num_layers, options, partition=None):
    """One training step of a stack of ``num_layers`` small layers (float64) under ``options``:
    output, input gradient and the gradients of this rank's parameters, by name."""
    torch.manual_seed(SEED)
    stack = xbt.LayerParallel([nn.Linear(4, 4, dtype=torch.float64) for _ in range(num_layers)],
                              rhs=lambda layer, x: torch.tanh(layer(x)),
                              mgrit=xbt.MGRITConfig(**options), comm=comm,
                              partition=partition if comm is not None else None)
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    x.requires_grad_()
    out = stack(x)
    out.square().sum().backward()
    return dict(out=out.detach(), dx=x.grad.clone(), owned=list(stack.owned_layers),
                grads={n: p.grad.clone() for n, p in stack.named_parameters()})


# ---------------------------------------------------------------------- mpiexec entry point
def mpi_main(out_path):
    """Run under ``mpiexec -n P python dist_utils.py OUT``: the parity cases over mpi4py."""
    comm = init_distributed()
    torch.set_num_threads(1)
    results = run_cases(comm, CASES[:3])
    results["kind"] = type(comm).__name__
    torch.save(results, f"{out_path}.{comm.rank}")


if __name__ == "__main__":
    mpi_main(sys.argv[1])

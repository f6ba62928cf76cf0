"""Training on ranks emulated as threads: the same numbers as one process, each rank its own
random state, evaluation not counted in virtual time, and the ``--emulate`` option."""
import json

import pytest
import torch

from xbraid_transformers.app.cli import main
from xbraid_transformers.app.runs import run_emulated, run_training
from xbraid_transformers.app.tasks import TaskConfig, build_task
from xbraid_transformers.app.trainer import TrainConfig, Trainer, seed_everything
from xbraid_transformers.mgrit.config import MGRITConfig
from xbraid_transformers.perf import emulate

pytestmark = pytest.mark.usefixtures("one_thread")


def _task(**changes):
    options = dict(name="synthetic", layers=8, d_model=16, heads=2, seq_len=6, batch_size=4, dropout=0.1,
                   mgrit=MGRITConfig(levels=2, cfactor=2, fwd_iters=2, bwd_iters=1))
    return TaskConfig(**{**options, **changes})


@pytest.mark.parametrize("mode", ["serial", "parallel"])
def test_emulated_ranks_train_exactly_as_one_process(mode):
    """Parallel equals serial across layouts: 1 process and 2 or 4 emulated ranks give the same
    losses, bit for bit (initialisation, dropout masks and MGRIT all independent of the layout)."""
    train = TrainConfig(mode=mode, steps=6, lr=3e-3, eval_every=3, progress=False)
    alone = run_training(_task(), train)
    for ranks in (2, 4):
        emulated = run_emulated(_task(), train, ranks)
        assert [r["loss"] for r in emulated["history"]] == [r["loss"] for r in alone["history"]]
        assert emulated["final_eval_loss"] == alone["final_eval_loss"]
        assert emulated["virtual_seconds"] > 0


def test_each_emulated_rank_keeps_its_own_random_state():
    """A rank that seeds and draws across message exchanges gets its own stream, as a process
    would, however the other ranks draw meanwhile."""
    def rank(comm):
        torch.manual_seed(100 + comm.rank)
        draws = []
        for _ in range(3):
            draws.append(torch.rand(4))
            comm.allreduce_sum(0.0)            # the other ranks run (and draw) here
        return torch.cat(draws)

    for r, got in enumerate(emulate(rank, 3)):
        expected = torch.rand(12, generator=torch.Generator().manual_seed(100 + r))
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_evaluation_is_not_counted_in_virtual_time():
    """The split evaluation exchanges messages (which advance virtual clocks); the clock is set
    back afterwards on every rank."""
    def rank(comm):
        seed_everything(0)
        trainer = Trainer(build_task(_task(), comm), TrainConfig(mode="parallel", steps=2, progress=False))
        trainer.train_step()
        before = trainer.clock.time
        trainer.evaluate()
        return trainer.clock.time - before

    assert emulate(rank, 2) == [0.0, 0.0]


def test_emulate_option_of_the_command(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--task", "synthetic", "--layers", "8", "--d-model", "8", "--heads", "2",
            "--seq-len", "4", "--batch-size", "2", "--cfactor", "2", "--steps", "3", "--mode", "parallel",
            "--nprocs", "4", "--emulate", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["virtual_time"] > 0 for r in records)
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    with pytest.raises(SystemExit) as exit_info:
        main(argv[:-1] + [str(tmp_path / "other"), "--threads", "2"])
    assert exit_info.value.code == 2 and "one torch thread" in capsys.readouterr().err

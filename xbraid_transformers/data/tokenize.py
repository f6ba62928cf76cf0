"""Tokenizers trained offline: byte-level BPE (GPT), WordPiece (BERT), characters (tests).

The BPE and WordPiece tokenizers use Hugging Face ``tokenizers`` (optional dependency,
imported lazily). All three share one small interface: ``encode``, ``encode_batch``,
``decode``, ``vocab_size``, ``token_to_id``, ``save``; :func:`load_tokenizer` reads any of them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence

from .cache import atomic_write_text
from .sources import PathLike, missing

__all__ = ["GPT_SPECIALS", "BERT_SPECIALS", "CharTokenizer", "HFTokenizer", "train_bpe",
           "train_wordpiece", "load_tokenizer", "cached_tokenizer"]

GPT_SPECIALS = ("<|endoftext|>",)
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _tokenizers():
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise missing("The Hugging Face 'tokenizers' package", "tokenizers") from None
    return tokenizers


class CharTokenizer:
    """Character-level vocabulary: special tokens first, then the sorted characters of the text."""

    kind = "char"

    def __init__(self, chars: Sequence[str], specials: Sequence[str] = (), unk: Optional[str] = None):
        self.itos = list(specials) + [c for c in chars if c not in specials]
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("duplicate symbols in character vocabulary")
        self.specials = list(specials)
        self.unk = unk
        if unk is not None and unk not in self.stoi:
            raise ValueError(f"unk token {unk!r} is not in the vocabulary")

    @classmethod
    def from_text(cls, text: str, specials: Sequence[str] = (), unk: Optional[str] = None) -> "CharTokenizer":
        return cls(sorted(set(text)), specials, unk)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.stoi.get(token)

    def encode(self, text: str) -> List[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            if self.unk is None:
                raise ValueError(f"character {e.args[0]!r} is not in the vocabulary") from None
            u = self.stoi[self.unk]
            return [self.stoi.get(c, u) for c in text]

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        sp = set(self.specials)
        return "".join(self.itos[int(i)] for i in ids if self.itos[int(i)] not in sp)

    def save(self, path: PathLike) -> Path:
        return atomic_write_text(path, json.dumps(
            {"type": "char", "symbols": self.itos, "specials": self.specials, "unk": self.unk}))


class HFTokenizer:
    """Thin wrapper of a ``tokenizers.Tokenizer`` with the shared interface."""

    def __init__(self, tok, kind: str):
        self.tok = tok
        self.kind = kind

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: PathLike) -> Path:
        data = json.loads(self.tok.to_str())
        data["xbt_kind"] = self.kind
        return atomic_write_text(path, json.dumps(data))


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, special_tokens: Sequence[str] = GPT_SPECIALS,
              min_frequency: int = 2) -> HFTokenizer:
    """Byte-level BPE (GPT-2 style) trained offline on ``texts``; lossless on any input."""
    tk = _tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tk.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, "bpe")


def train_wordpiece(texts: Iterable[str], vocab_size: int = 8192, special_tokens: Sequence[str] = BERT_SPECIALS,
                    lowercase: bool = True, min_frequency: int = 2) -> HFTokenizer:
    """BERT WordPiece (``BertNormalizer``, ``BertPreTokenizer``) trained offline on ``texts``."""
    tk = _tokenizers()
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    unk = "[UNK]" if "[UNK]" in special_tokens else special_tokens[0]
    tok = tk.Tokenizer(models.WordPiece(unk_token=unk))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(special_tokens), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, "wordpiece")


def load_tokenizer(path: PathLike):
    """Read a tokenizer saved by ``.save`` (character, BPE or WordPiece)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not a tokenizer JSON file ({e})") from None
    if data.get("type") == "char":
        return CharTokenizer(data["symbols"][len(data["specials"]):], data["specials"], data.get("unk"))
    tk = _tokenizers()
    kind = data.pop("xbt_kind", "hf")
    return HFTokenizer(tk.Tokenizer.from_str(json.dumps(data)), kind)


def _make_tokenizer(kind: str, texts: Callable[[], Iterable[str]], vocab_size: Optional[int] = None,
                   special_tokens: Optional[Sequence[str]] = None):
    """Train a tokenizer of ``kind`` in ``{"bpe", "wordpiece", "char"}`` on ``texts()``."""
    if kind == "bpe":
        return train_bpe(texts(), vocab_size or 4096, special_tokens if special_tokens is not None else GPT_SPECIALS)
    if kind == "wordpiece":
        return train_wordpiece(texts(), vocab_size or 8192,
                               special_tokens if special_tokens is not None else BERT_SPECIALS)
    if kind == "char":
        return CharTokenizer.from_text("".join(texts()), special_tokens or ())
    raise ValueError(f"unknown tokenizer kind {kind!r} (use 'bpe', 'wordpiece' or 'char')")


def cached_tokenizer(path: PathLike, kind: str, texts: Callable[[], Iterable[str]],
                     vocab_size: Optional[int] = None, special_tokens: Optional[Sequence[str]] = None):
    """Load the tokenizer JSON at ``path`` or train one and save it there."""
    path = Path(path)
    if path.exists():
        return load_tokenizer(path)
    tok = _make_tokenizer(kind, texts, vocab_size, special_tokens)
    tok.save(path)
    return tok

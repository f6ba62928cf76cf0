"""Translation data: the pairs of ``_pair_sources`` (KJV / Reina-Valera 1909 verses from the
SWORD zText modules, a user's TSV of sentence pairs, the Debian ``trans-de-en`` dictionary)
tokenised and cached, padded (src, tgt) batches, a synthetic pair task, and BLEU
(``sacrebleu``)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from . import sources
from .batching import DEFAULT_FRACTIONS, iterate_minibatches, pad_sequences, split_indices
from .cache import cache_dir, fingerprint, load_ragged, preparing, read_meta, save_ragged, write_meta
from .sources import PathLike
from ._pair_sources import (KJV, RV1909, bible_pairs, is_header, kjv_rv_pairs, osis_to_text, read_module,
                            read_tsv_pairs, read_ztext, trans_de_en_pairs)
from .tokenize import cached_tokenizer, load_tokenizer

__all__ = ["BPE_SPECIALS", "Seq2SeqBatch", "TranslationData", "kjv_rv_translation",
           "tsv_translation", "bleu", "synthetic_pairs", "row_texts", "greedy_translations",
           "greedy_bleu",
           "KJV", "RV1909", "read_ztext", "read_module", "osis_to_text", "is_header",
           "bible_pairs", "kjv_rv_pairs", "read_tsv_pairs", "trans_de_en_pairs"]

BPE_SPECIALS = ("<pad>", "<s>", "</s>")
_CACHE_VERSION = 2

# --- batches -------------------------------------------------------------------------------

class Seq2SeqBatch(NamedTuple):
    src: torch.Tensor          # [B, S] int64, right-padded with pad_id; ends with EOS
    src_lengths: torch.Tensor  # [B]
    tgt: torch.Tensor          # [B, T] int64: BOS ... EOS then pad; input tgt[:, :-1], labels tgt[:, 1:]
    tgt_lengths: torch.Tensor  # [B]
    pad_id: int


def _special_ids(tok) -> Tuple[int, int, int]:
    for pad, bos, eos in (("<pad>", "<s>", "</s>"), ("[PAD]", "[CLS]", "[SEP]")):
        ids = (tok.token_to_id(pad), tok.token_to_id(bos), tok.token_to_id(eos))
        if None not in ids:
            return ids  # type: ignore[return-value]
    raise ValueError("tokenizer needs <pad> <s> </s> (or [PAD] [CLS] [SEP]) special tokens")


class TranslationData:
    """Tokenized sentence pairs per split with padded batches.

    ``splits[name] = (src_ids, tgt_ids)``, lists of 1-D int arrays without BOS/EOS."""

    def __init__(self, splits: Dict[str, Tuple[List[np.ndarray], List[np.ndarray]]], tokenizer,
                 directory: Optional[Path] = None):
        self.splits = splits
        self.tokenizer = tokenizer
        self.pad_id, self.bos_id, self.eos_id = _special_ids(tokenizer)
        self.vocab_size = tokenizer.vocab_size
        self.directory = directory

    @classmethod
    def from_pairs(cls, pairs: Sequence[Tuple[str, str]], tokenizer, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                   seed: int = 0, max_len: Optional[int] = 128) -> "TranslationData":
        """Tokenize (truncating each side to ``max_len - 2`` tokens) and split with ``seed``."""
        src = _encode(tokenizer, [a for a, _ in pairs], max_len)
        tgt = _encode(tokenizer, [b for _, b in pairs], max_len)
        parts = split_indices(len(pairs), fractions, seed)
        return cls({k: ([src[i] for i in idx.tolist()], [tgt[i] for i in idx.tolist()])
                    for k, idx in parts.items()}, tokenizer)

    def __len__(self) -> int:
        return sum(len(s) for s, _ in self.splits.values())

    def collate(self, split: str, indices: Sequence[int]) -> Seq2SeqBatch:
        src_all, tgt_all = self.splits[split]
        src = [np.concatenate([src_all[i], [self.eos_id]]) for i in indices]
        tgt = [np.concatenate([[self.bos_id], tgt_all[i], [self.eos_id]]) for i in indices]
        s, sl = pad_sequences(src, self.pad_id)
        t, tl = pad_sequences(tgt, self.pad_id)
        return Seq2SeqBatch(s, sl, t, tl, self.pad_id)

    def get_batch(self, split: str, batch_size: int, generator: Optional[torch.Generator] = None) -> Seq2SeqBatch:
        """A random batch of pairs from ``split``."""
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; have {sorted(self.splits)}")
        n = len(self.splits[split][0])
        if n == 0:
            raise ValueError(f"split {split!r} is empty")
        return self.collate(split, torch.randint(n, (batch_size,), generator=generator).tolist())

    def batches(self, split: str, batch_size: int, shuffle: bool = False,
                generator: Optional[torch.Generator] = None):
        """Every pair of ``split`` once, as (indices, Seq2SeqBatch)."""
        for idx in iterate_minibatches(len(self.splits[split][0]), batch_size, shuffle, generator):
            yield idx, self.collate(split, idx.tolist())

    def references(self, split: str) -> List[str]:
        """Detokenized targets of ``split`` (for BLEU)."""
        return [self.tokenizer.decode(t) for t in self.splits[split][1]]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, stopping at the first EOS."""
        out = []
        for i in (int(x) for x in ids):
            if i == self.eos_id:
                break
            out.append(i)
        return self.tokenizer.decode(out)


def _encode(tok, texts: Sequence[str], max_len: Optional[int]) -> List[np.ndarray]:
    keep = None if max_len is None else max(max_len - 2, 1)
    return [np.asarray(ids[:keep] if keep else ids, dtype=np.int64) for ids in tok.encode_batch(list(texts))]


def _prepared_translation(name: str, pairs: Callable[[], Sequence[Tuple[str, str]]], source_files: Sequence[Path],
                        tokenizer: str = "bpe", vocab_size: int = 8000, max_len: Optional[int] = 128,
                        fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
                        root: Optional[PathLike] = None) -> TranslationData:
    """Train one joint tokenizer on both sides, tokenize, split and cache (uint16 ``.bin`` plus
    int64 ``.off`` offsets per split and side, tokenizer JSON, ``meta.json``)."""
    key = fingerprint(_CACHE_VERSION, tokenizer, vocab_size, max_len, tuple(fractions), seed,
                      *[Path(p) for p in source_files])
    d = cache_dir(name, f"{tokenizer}{vocab_size}-{key}", root)
    tok_path = d / "tokenizer.json"
    if read_meta(d) is None or not tok_path.exists():
        with preparing(d):
            if read_meta(d) is None or not tok_path.exists():     # not prepared while we waited
                _prepare_translation(d, name, pairs(), source_files, tokenizer, vocab_size, max_len,
                                     fractions, seed)
    meta = read_meta(d)
    tok = load_tokenizer(tok_path)
    splits = {s: (load_ragged(d / f"{s}.src"), load_ragged(d / f"{s}.tgt")) for s in meta["splits"]}
    for s, sides in splits.items():
        for side, seqs in zip(("src", "tgt"), sides):
            top = max((int(seq.max()) for seq in seqs if len(seq)), default=-1)
            if top >= tok.vocab_size:   # random bytes in the cache: a clear error, not IndexError
                raise ValueError(f"{d / f'{s}.{side}.bin'}: token id {top} is outside the vocabulary "
                                 f"of {tok.vocab_size}: the cache is damaged; delete {d} to rebuild it")
    return TranslationData(splits, tok, d)


def _prepare_translation(d: Path, name: str, ps: Sequence[Tuple[str, str]], source_files: Sequence[Path],
                         tokenizer: str, vocab_size: int, max_len: Optional[int],
                         fractions: Sequence[float], seed: int) -> None:
    specials = BPE_SPECIALS if tokenizer == "bpe" else None
    tok = cached_tokenizer(d / "tokenizer.json", tokenizer, lambda: (t for p in ps for t in p), vocab_size,
                           specials)
    data = TranslationData.from_pairs(ps, tok, fractions, seed, max_len)
    for s, (src, tgt) in data.splits.items():
        save_ragged(d / f"{s}.src", src)
        save_ragged(d / f"{s}.tgt", tgt)
    write_meta(d, {"name": name, "tokenizer": tokenizer, "vocab_size": tok.vocab_size, "pairs": len(ps),
                   "splits": list(data.splits), "sources": [str(p) for p in source_files]})


def kjv_rv_translation(direction: str = "en-es", tokenizer: str = "bpe", vocab_size: int = 8000,
                       max_len: Optional[int] = 128, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                       seed: int = 0, sword_root: Optional[PathLike] = None,
                       root: Optional[PathLike] = None) -> TranslationData:
    """KJV <-> Reina-Valera verse pairs, joint byte-level BPE, seeded train/val/test; cached."""
    files = [p for m in (KJV, RV1909) for t in ("ot", "nt")
             for p in [sources.sword_module_dir(m, sword_root) / f"{t}.bzz"] if p.exists()]
    return _prepared_translation(f"kjv-rv-{direction}", lambda: kjv_rv_pairs(sword_root, direction), files,
                               tokenizer, vocab_size, max_len, fractions, seed, root)


def tsv_translation(path: PathLike, tokenizer: str = "bpe", vocab_size: int = 8000, max_len: Optional[int] = 128,
                    fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
                    root: Optional[PathLike] = None) -> TranslationData:
    """A user's TSV of sentence pairs, prepared like :func:`kjv_rv_translation`."""
    p = Path(path)
    _check_enough_pairs(p, len(read_tsv_pairs(p)), fractions, seed)  # clear errors early
    return _prepared_translation("tsv", lambda: read_tsv_pairs(p), [p], tokenizer, vocab_size, max_len,
                               fractions, seed, root)


def _check_enough_pairs(path: PathLike, count: int, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                       seed: int = 0) -> None:
    """Raise ``ValueError`` when ``count`` pairs leave the train or validation split empty (a
    task draws batches from both), naming the smallest count that would do."""
    def empty(n: int) -> List[str]:
        parts = split_indices(n, fractions, seed)
        return [k for k in ("train", "val") if k in parts and len(parts[k]) == 0]
    missing = empty(count)
    if not missing:
        return
    enough = next((n for n in range(count + 1, 10_000) if not empty(n)), None)
    raise ValueError(f"{path}: {count} sentence pair{'s' if count != 1 else ''} are too few: split "
                     f"{tuple(fractions)} into train/val/test, the {' and '.join(missing)} split "
                     f"would be empty" + (f"; give at least {enough} pairs" if enough else ""))


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, default 13a tokenization) of detokenized strings."""
    try:
        import sacrebleu
    except ImportError:
        raise sources.missing("BLEU scoring needs 'sacrebleu', which", "sacrebleu") from None
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


# --- a pair task without data, and BLEU of greedy translations ------------------------------

SYNTHETIC_PAD, SYNTHETIC_BOS, SYNTHETIC_EOS = 0, 1, 2


def synthetic_pairs(n: int, seed: int, vocab: int = 40, min_words: int = 4, max_words: int = 11
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` pairs of a toy translation that needs no data: the target is the source reversed,
    every word mapped to another by one fixed permutation of the vocabulary (so the model must
    learn both the reordering and a dictionary). Returns (src [n, max_words + 1] ending in EOS,
    tgt [n, max_words + 2] as BOS ... EOS), PAD-filled; ids 0, 1, 2 are PAD, BOS, EOS."""
    specials = 3
    dictionary = specials + torch.randperm(vocab - specials, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_words, max_words + 1, (n,), generator=g)
    src = torch.full((n, max_words + 1), SYNTHETIC_PAD)
    tgt = torch.full((n, max_words + 2), SYNTHETIC_PAD)
    for i, k in enumerate(lengths.tolist()):
        words = torch.randint(vocab - specials, (k,), generator=g)
        src[i, :k + 1] = torch.cat([specials + words, torch.tensor([SYNTHETIC_EOS])])
        tgt[i, :k + 2] = torch.cat([torch.tensor([SYNTHETIC_BOS]), dictionary[words.flip(0)],
                                    torch.tensor([SYNTHETIC_EOS])])
    return src, tgt


def _content_ids(ids: Sequence[int], bos_id: int, eos_id: int, pad_id: int) -> List[int]:
    """The words of a generated or reference row: up to the first EOS, without BOS and PAD."""
    out = []
    for i in (int(x) for x in ids):
        if i == eos_id:
            break
        if i not in (bos_id, pad_id):
            out.append(i)
    return out


def row_texts(rows: torch.Tensor, bos_id: int, eos_id: int, pad_id: int,
              detokenize: Optional[Callable[[List[int]], str]] = None) -> List[str]:
    """Each row's words (:func:`_content_ids`) as text: ``detokenize(ids)``, by default the ids
    joined by spaces."""
    text = detokenize or (lambda ids: " ".join(map(str, ids)))
    return [text(_content_ids(row.tolist(), bos_id, eos_id, pad_id)) for row in rows]


def greedy_translations(model, src: torch.Tensor, max_len: int,
                        detokenize: Optional[Callable[[List[int]], str]] = None) -> List[str]:
    """Greedy translations of ``src`` by a ``models.Seq2Seq`` as text (:func:`row_texts`)."""
    c = model.config
    return row_texts(model.greedy_decode(src, max_len=max_len), c.bos_id, c.eos_id, c.pad_id, detokenize)


def greedy_bleu(model, src: torch.Tensor, tgt: torch.Tensor,
                detokenize: Optional[Callable[[List[int]], str]] = None) -> float:
    """Corpus BLEU of the model's greedy translations of ``src`` against the references ``tgt``
    (BOS ... EOS, PAD-filled), both made text by the same ``detokenize``."""
    c = model.config
    references = row_texts(tgt, c.bos_id, c.eos_id, c.pad_id, detokenize)
    return bleu(greedy_translations(model, src, tgt.shape[1], detokenize), references)

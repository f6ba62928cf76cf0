"""Where translation pairs come from: KJV / Reina-Valera 1909 verses read from the SWORD zText
modules (Debian ``sword-text-kjv``, ``sword-text-sparv``), a user's TSV of sentence pairs, and
the Debian ``trans-de-en`` dictionary."""
from __future__ import annotations

import html
import re
import struct
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from . import sources
from .sources import PathLike

__all__ = ["KJV", "RV1909", "read_ztext", "read_module", "osis_to_text", "is_header", "bible_pairs",
           "kjv_rv_pairs", "read_tsv_pairs", "trans_de_en_pairs"]

KJV = "engKJV2006eb"
RV1909 = "spaRV1909eb"


# --- SWORD zText ---------------------------------------------------------------------------


def read_ztext(module_dir: PathLike, testament: str) -> List[str]:
    """Raw OSIS text of every index entry of one testament (``"ot"`` or ``"nt"``).

    ``.bzs``: ``<III`` (offset in .bzz, compressed size, uncompressed size) per block;
    ``.bzv``: ``<IIH`` (block, offset in the uncompressed block, size) per entry;
    ``.bzz``: the zlib-compressed blocks."""
    d = Path(module_dir)
    bzs_p, bzv_p, bzz_p = (d / f"{testament}.{ext}" for ext in ("bzs", "bzv", "bzz"))
    for p in (bzs_p, bzv_p, bzz_p):
        if not p.is_file():
            raise FileNotFoundError(f"zText file '{p}' not found")
    bzs, bzv, bzz = bzs_p.read_bytes(), bzv_p.read_bytes(), bzz_p.read_bytes()
    if len(bzs) % 12:
        raise ValueError(f"{bzs_p}: size {len(bzs)} is not a multiple of 12-byte block records")
    if len(bzv) % 10:
        raise ValueError(f"{bzv_p}: size {len(bzv)} is not a multiple of 10-byte verse records")
    blocks = list(struct.iter_unpack("<III", bzs))
    cache: Dict[int, bytes] = {}

    def block(b: int, entry: int) -> bytes:
        if b not in cache:
            if b >= len(blocks):
                raise ValueError(f"{bzv_p}: record {entry} names block {b}, but {bzs_p} has {len(blocks)} blocks")
            off, csize, usize = blocks[b]
            if off + csize > len(bzz):
                raise ValueError(f"{bzs_p}: block {b} spans bytes {off}..{off + csize} of {bzz_p}, "
                                 f"which has only {len(bzz)} bytes")
            try:
                data = zlib.decompress(bzz[off:off + csize])
            except zlib.error as e:
                raise ValueError(f"{bzz_p}: block {b} is not valid zlib data ({e})") from None
            if len(data) != usize:
                raise ValueError(f"{bzz_p}: block {b} inflates to {len(data)} bytes, {bzs_p} says {usize}")
            cache[b] = data
        return cache[b]

    out: List[str] = []
    for i, (b, off, size) in enumerate(struct.iter_unpack("<IIH", bzv)):
        if size == 0:
            out.append("")
            continue
        data = block(b, i)
        if off + size > len(data):
            raise ValueError(f"{bzv_p}: record {i} (bytes {off}..{off + size} of block {b}) runs past the "
                             f"end of that block ({len(data)} bytes uncompressed) in {bzz_p}")
        try:
            out.append(data[off:off + size].decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{bzz_p}: record {i} is not UTF-8 ({e})") from None
    return out


def read_module(module_dir: PathLike) -> List[str]:
    """All entries of a zText module: the Old then the New Testament (those present)."""
    d = Path(module_dir)
    present = [t for t in ("ot", "nt") if (d / f"{t}.bzv").exists()]
    if not present:
        raise FileNotFoundError(f"no ot.bzv or nt.bzv in '{d}'")
    return [e for t in present for e in read_ztext(d, t)]


_NOTE = re.compile(r"<note\b[^>]*>.*?</note\s*>", re.S)
_NOTE_EMPTY = re.compile(r"<note\b[^>]*/>")
_TITLE = re.compile(r"<title\b([^>]*)>.*?</title\s*>", re.S)
_TAG = re.compile(r"<(/?)([\w:]*)[^>]*>")
# Inline elements wrap parts of words ("<w>earth</w>."); the others separate text.
_INLINE = {"w", "transChange", "divineName", "foreign", "q", "seg", "hi", "reference", "rdg", "name"}
_BOOK_START = re.compile(r"<div\b(?=[^>]*\btype=\"book\")(?=[^>]*\bsID=)[^>]*>")
_MAIN_TITLE = re.compile(r"<title\b[^>]*\btype=\"main\"")


def osis_to_text(raw: str) -> str:
    """Plain text of an OSIS entry: ``<note>...</note>`` and non-canonical headings (e.g. the
    Hebrew letters of Psalm 119) removed, all other tags dropped, entities unescaped, the
    paragraph sign removed and whitespace collapsed. Canonical psalm titles are kept."""
    s = _NOTE_EMPTY.sub("", _NOTE.sub(" ", raw))
    s = _TITLE.sub(lambda m: m.group(0) if 'canonical="true"' in m.group(1) else " ", s)
    s = _TAG.sub(lambda m: "" if m.group(2) in _INLINE else " ", s)
    return " ".join(html.unescape(s).replace("\u00b6", " ").split())


def is_header(raw: str) -> bool:
    """A book-title entry (the book's opening ``<div type="book" sID=...>`` or a main title)."""
    return bool(_BOOK_START.search(raw) or _MAIN_TITLE.search(raw))


def bible_pairs(src_module: str = KJV, tgt_module: str = RV1909, root: Optional[PathLike] = None
                ) -> List[Tuple[str, str]]:
    """Aligned verse pairs of two zText modules with the same versification: entry i is verse i
    in both. Pairs where either side is a header or empty are dropped."""
    src = read_module(sources.sword_module_dir(src_module, root))
    tgt = read_module(sources.sword_module_dir(tgt_module, root))
    if len(src) != len(tgt):
        raise ValueError(f"modules {src_module} ({len(src)} entries) and {tgt_module} ({len(tgt)}) "
                         f"do not share a versification")
    pairs = []
    for a, b in zip(src, tgt):
        if is_header(a) or is_header(b):
            continue
        ta, tb = osis_to_text(a), osis_to_text(b)
        if ta and tb:
            pairs.append((ta, tb))
    return pairs


def kjv_rv_pairs(root: Optional[PathLike] = None, direction: str = "en-es") -> List[Tuple[str, str]]:
    """~31k (English KJV, Spanish Reina-Valera 1909) verse pairs; ``direction="es-en"`` swaps."""
    pairs = bible_pairs(KJV, RV1909, root)
    if direction == "es-en":
        return [(b, a) for a, b in pairs]
    if direction != "en-es":
        raise ValueError(f"direction must be 'en-es' or 'es-en', got {direction!r}")
    return pairs


# --- other pair sources --------------------------------------------------------------------

def read_tsv_pairs(path: PathLike) -> List[Tuple[str, str]]:
    """A user's sentence pairs: one ``source<TAB>target`` per line (further columns ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TSV file '{path}' not found")
    pairs = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                cols = line.split("\t")
                if len(cols) < 2:
                    raise ValueError(f"{path}, line {lineno}: no tab-separated target (expected 'source<TAB>target')")
                a, b = cols[0].strip(), cols[1].strip()
                if not a or not b:
                    raise ValueError(f"{path}, line {lineno}: empty source or target")
                pairs.append((a, b))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e})") from None
    if not pairs:
        raise ValueError(f"{path}: no sentence pairs")
    return pairs


_ANNOT = re.compile(r"\{[^}]*\}|\[[^\]]*\]|\([^)]*\)")


def trans_de_en_pairs(path: Optional[PathLike] = None, min_words: int = 0) -> List[Tuple[str, str]]:
    """(German, English) pairs from Debian ``trans-de-en`` (``German :: English``; sub-entries
    split on `` | ``, first synonym of each ``;`` list, ``{}``/``[]``/``()`` annotations dropped);
    keep pairs with at least ``min_words`` English words. GPL-2+: never commit the output."""
    p = sources.trans_de_en_file(path)
    pairs = []
    with open(p, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("#") or " :: " not in line:
                continue
            de, en = line.rstrip("\n").split(" :: ", 1)
            des, ens = de.split(" | "), en.split(" | ")
            if len(des) != len(ens):
                continue
            for a, b in zip(des, ens):
                a = " ".join(_ANNOT.sub(" ", a.split(";")[0]).split())
                b = " ".join(_ANNOT.sub(" ", b.split(";")[0]).split())
                if a and b and len(b.split()) >= min_words:
                    pairs.append((a, b))
    return pairs

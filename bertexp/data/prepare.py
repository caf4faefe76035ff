"""Corpus -> token arrays on disk, streamed and parallel: the only pass over the raw text.

Each chunk of the source (a few MB, cut at document boundaries; bertexp/data/sources.py) is parsed,
segmented into words, split into sentences and tokenised in a worker process, and comes back as flat arrays
that the main process appends to the files of bertexp/data/tokenized.py. At most `2 * num_proc` chunks are
in flight, so memory stays bounded whatever the corpus size; the token files are memory-mapped afterwards.

The sentence split and the tokens are exactly those of tokenising each sentence on its own: sentences end
after punctuation, which is always a pre-tokenizer boundary, so a paragraph is tokenised in one call and its
tokens are assigned to sentences by their character offsets.

Workers use no torch and run one tokenizer thread each: `num_proc` processes use `num_proc` cores.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections import deque
from itertools import chain
from pathlib import Path

import numpy as np

from bertexp.data.sources import Chunk, join_documents, parse_chunk, segmenter
from bertexp.data.tokenized import CLOSERS, ENDS

log = logging.getLogger(__name__)

# split_sentences's rule on paragraphs joined by newlines: a newline (a paragraph end) also ends a sentence.
SENTENCE = re.compile(rf"[^{ENDS}\n]*[{ENDS}]+[{CLOSERS}]*|[^{ENDS}\n]+")
_ENCODE_CHARS = 1 << 18  # paragraphs per encode_batch call add up to about this many characters

_tokenizer = None
_segment = None


def default_num_proc() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _init_worker(tokenizer_json: str, segmenter_name: str | None, in_pool: bool = False) -> None:
    global _tokenizer, _segment
    if in_pool:
        import signal

        os.environ["RAYON_NUM_THREADS"] = "1"  # one tokenizer thread per process: num_proc processes, num_proc cores
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
        _die_with_parent()
    _tokenizer = FastEncoder(tokenizer_json)
    _segment = segmenter(segmenter_name)


class FastEncoder:
    """A BERT WordPiece tokenizer's encoding of a text as (ids, character start of each token), with Chinese
    characters looked up directly.

    BERT's normaliser puts spaces around every CJK character, so each one is a word of its own, and its
    token is the vocabulary entry of the character or [UNK]; only the text between them needs the real
    tokenizer. That is the same tokens (tests/test_corpora.py checks it against the tokenizer itself) at a
    fraction of the time, for CJK Unified Ideographs and Extension A (no case, no decomposition). Any other
    tokenizer, or one with an added token that holds such a character, is used as it is."""

    _RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF))

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        spec = json.loads(tokenizer_json)
        vocab = self.tokenizer.get_vocab()
        added = [t.get("content", "") for t in spec.get("added_tokens") or []]
        self.direct = (
            (spec.get("normalizer") or {}).get("type") == "BertNormalizer"
            and (spec["normalizer"].get("handle_chinese_chars", True))
            and (spec.get("pre_tokenizer") or {}).get("type") == "BertPreTokenizer"
            and (spec.get("model") or {}).get("type") == "WordPiece"
            and not any(self._is_cjk(ord(c)) for t in added for c in t)
        )
        if self.direct:
            unk = vocab.get(spec["model"].get("unk_token", "[UNK]"))
            self.direct = unk is not None
            self.table = np.full(0xA000, -1 if unk is None else unk, dtype=np.int32)
            for token, i in vocab.items():
                if len(token) == 1 and self._is_cjk(ord(token)):
                    self.table[ord(token)] = i

    @classmethod
    def _is_cjk(cls, cp: int) -> bool:
        return any(a <= cp <= b for a, b in cls._RANGES)

    def _encode_texts(self, texts: list[str], bases: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The tokenizer itself on `texts`, whose first characters sit at `bases` of the whole text: ids,
        character starts, and the text each token came from."""
        ids_parts, start_parts, owner_parts = [], [], []
        a = 0
        while a < len(texts):  # in pieces, so the tokenizer's per-token objects stay small
            b, chars = a, 0
            while b < len(texts) and chars < _ENCODE_CHARS:
                chars += len(texts[b])
                b += 1
            encs = self.tokenizer.encode_batch(texts[a:b], add_special_tokens=False)
            counts = np.fromiter((len(e.ids) for e in encs), np.int64, len(encs))
            total = int(counts.sum())
            ids_parts.append(np.fromiter(chain.from_iterable(e.ids for e in encs), np.int32, total))
            local = np.fromiter((s for e in encs for s, _ in e.offsets), np.int64, total)
            start_parts.append(local + np.repeat(bases[a:b], counts))
            owner_parts.append(np.repeat(np.arange(a, b), counts))
            a = b
        if not ids_parts:
            return np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(ids_parts), np.concatenate(start_parts), np.concatenate(owner_parts)

    def encode(self, text: str, paragraphs: list[str], bases: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`text` is `paragraphs` joined by newlines, each starting at its entry of `bases`."""
        if not self.direct:
            return self._encode_texts(paragraphs, bases)[:2]
        cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        cjk = np.zeros(len(cp), dtype=bool)
        for lo, hi in self._RANGES:
            cjk |= (cp >= lo) & (cp <= hi)
        edge = np.diff(np.concatenate([[0], (~cjk).view(np.int8), [0]]))
        run_start, run_end = np.flatnonzero(edge == 1), np.flatnonzero(edge == -1)
        runs = [text[a:b] for a, b in zip(run_start.tolist(), run_end.tolist())]
        # The runs between Chinese characters repeat ("，", "。\n", digits): each distinct one is tokenised once
        # (its tokens do not depend on what is around it), then gathered for every occurrence.
        distinct = list(dict.fromkeys(runs))
        which = np.fromiter(map({r: i for i, r in enumerate(distinct)}.__getitem__, runs), np.int64, len(runs))
        d_ids, d_starts, d_owner = self._encode_texts(distinct, np.zeros(len(distinct), np.int64))
        d_counts = np.bincount(d_owner, minlength=len(distinct))
        d_first = np.cumsum(d_counts) - d_counts
        counts = d_counts[which]
        owner = np.repeat(np.arange(len(runs)), counts)
        src = d_first[which][owner] + np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        run_ids, run_starts = d_ids[src], run_start[owner] + d_starts[src]
        at = np.flatnonzero(cjk)
        ids = np.concatenate([self.table[cp[at]], run_ids])
        starts = np.concatenate([at, run_starts])
        order = np.argsort(starts, kind="stable")
        return ids[order], starts[order]


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when its parent dies, however it dies (a SIGTERM from `timeout`, docker or
    a scheduler runs no Python cleanup in the parent)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl
            os._exit(1)
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown is all there is
        pass


def tokenize_chunk(chunk: Chunk) -> dict[str, np.ndarray]:
    """One chunk -> ids, word_start (per token), sentence lengths (per sentence with tokens) and sentences per
    document (per document, none too: which document a chunk that `continues` goes on with is only known once
    the chunks are put in order), plus the chunk's input size and whether it continues the previous one."""
    docs = parse_chunk(chunk)
    paras = [p for doc in docs for p in doc]
    texts = [p.text for p in paras]
    para_doc = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
    # The chunk as one text, paragraphs joined by "\n": every later step is vectorised over it.
    para_len = np.fromiter(map(len, texts), np.int64, len(texts)) + 1
    para_base = np.cumsum(para_len) - para_len
    joined = "\n".join(texts)
    sent_end = np.fromiter((m.end() for m in SENTENCE.finditer(joined)), np.int64)
    sent_para = np.searchsorted(para_base, sent_end - 1, side="right") - 1

    # word starts: gold, or the segmenter's; a paragraph's words tile it, and its "\n" is one more
    word_lens: list[int] = []
    for p in paras:
        if p.word_starts is not None:
            ws = p.word_starts
            word_lens.extend(b - a for a, b in zip(ws, [*ws[1:], len(p.text)]))
        else:
            word_lens.extend(_segment(p.text) or [1] * len(p.text))  # no segmenter, no gold: characters
        word_lens.append(1)
    lens = np.asarray(word_lens, dtype=np.int64)
    is_start = np.zeros(len(joined) + 2, dtype=bool)
    is_start[np.cumsum(lens) - lens] = True

    ids, tok_start = _tokenizer.encode(joined, texts, para_base)

    tok_sent = np.searchsorted(sent_end, tok_start, side="right")
    sent_len = np.bincount(tok_sent, minlength=len(sent_end))[: len(sent_end)]
    word_start = is_start[tok_start]
    first = np.ones(len(ids), dtype=bool)
    first[1:] = tok_sent[1:] != tok_sent[:-1]
    word_start |= first  # a sentence always starts a word, whatever the segmenter said
    keep = sent_len > 0  # sentences that tokenise to nothing (stray symbols) are dropped
    doc_sents = np.bincount(para_doc[sent_para[keep]], minlength=len(docs)) if len(docs) else np.zeros(0, np.int64)
    return {"ids": ids, "word_start": word_start, "sent_len": sent_len[keep].astype(np.int64),
            "doc_sents": doc_sents.astype(np.int64), "size": np.int64(chunk.size), "continues": chunk.continues}


def _chunk_results(source, tokenizer_json: str, num_proc: int, used: list):
    """tokenize_chunk over the source's chunks, in order; in worker processes when there is more than one
    chunk and more than one process, with a bounded number in flight."""
    chunks = source.chunks()
    first = next(chunks, None)
    second = next(chunks, None)
    seg = getattr(source, "segmenter", None)
    if second is None or num_proc <= 1:
        used[0] = 1
        _init_worker(tokenizer_json, seg)
        for c in ([first] if first else []) + ([second] if second else []):
            yield tokenize_chunk(c)
        for c in chunks:
            yield tokenize_chunk(c)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # Forked: a spawned worker would re-run the user's script (one without a __main__ guard, a notebook);
    # the workers use no torch and no threads of the parent, so forking is safe here.
    with ProcessPoolExecutor(num_proc, mp_context=mp.get_context("fork"), initializer=_init_worker,
                             initargs=(tokenizer_json, seg, True)) as pool:
        pending: deque = deque()
        for c in chain([first, second], chunks):
            pending.append(pool.submit(tokenize_chunk, c))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def write_tokens(source, tokenizer, out: Path, num_proc: int | None = None) -> dict:
    """Tokenise `source` into `out` (ids.bin, word_start.bin, sent_offsets.npy, doc_offsets.npy, meta.json)."""
    from tqdm.auto import tqdm

    num_proc = int(num_proc or default_num_proc())
    t0 = time.perf_counter()
    total = source.total_bytes()
    sent_lens, doc_sents = [], []
    n_tokens = 0
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="tokenising", dynamic_ncols=True,
               mininterval=1.0)
    with open(out / "ids.bin", "wb") as f_ids, open(out / "word_start.bin", "wb") as f_ws:
        used = [num_proc]  # one chunk or one process: tokenised in this process
        for r in _chunk_results(source, tokenizer.backend_tokenizer.to_str(), num_proc, used):
            r["ids"].tofile(f_ids)
            r["word_start"].tofile(f_ws)
            n_tokens += len(r["ids"])
            sent_lens.append(r["sent_len"])
            join_documents(doc_sents, r["doc_sents"], r["continues"])
            bar.update(int(r["size"]))
            bar.set_postfix(tokens=f"{n_tokens / 1e6:.1f}M")
    bar.close()
    sl = np.concatenate(sent_lens) if sent_lens else np.zeros(0, np.int64)
    ds = np.concatenate(doc_sents) if doc_sents else np.zeros(0, np.int64)
    ds = ds[ds > 0]  # documents whose sentences all tokenise to nothing (stray symbols)
    np.save(out / "sent_offsets.npy", np.concatenate([[0], np.cumsum(sl)]).astype(np.int64))
    np.save(out / "doc_offsets.npy", np.concatenate([[0], np.cumsum(ds)]).astype(np.int64))
    seconds = time.perf_counter() - t0
    num_proc = used[0]
    meta = {"tokens": n_tokens, "sentences": len(sl), "documents": len(ds), "input_bytes": total,
            "seconds": round(seconds, 2), "num_proc": num_proc,
            "build": uuid.uuid4().hex}  # names these arrays: what is derived from them (pairs) is keyed by it
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    log.info("Tokenised %.1f MB into %d tokens, %d sentences, %d documents in %.1f s (%.1f MB/s, %d process%s)",
             total / 1e6, n_tokens, len(sl), len(ds), seconds, total / 1e6 / max(seconds, 1e-9), num_proc,
             "es" if num_proc > 1 else "")
    return meta


def paragraph_texts(source, max_bytes: int):
    """The paragraphs of the corpus's first `max_bytes` of input (a vocabulary's training sample)."""
    from tqdm.auto import tqdm

    seen = 0
    total = min(max_bytes, source.total_bytes())
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="vocabulary sample",
              dynamic_ncols=True, mininterval=1.0) as bar:
        for chunk in source.chunks():
            for doc in parse_chunk(chunk):
                for p in doc:
                    yield p.text
            seen += chunk.size
            bar.update(min(chunk.size, total - bar.n))
            if seen >= max_bytes:
                return

"""The corpus tokenised once, in batch, into flat arrays that every later stage slices.

Layout: `ids[sent_offsets[s]:sent_offsets[s+1]]` are the tokens of sentence s, sentences
`doc_offsets[d]:doc_offsets[d+1]` belong to document d, and `word_start[t]` says that token t begins a word
(gold segmentation or the segmenter's), which whole-word, span and n-gram masking need.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bertexp.data.sources import Corpus

# A sentence ends at Chinese or Western terminal punctuation, with any closing quotes or brackets after it.
_SENTENCE = re.compile(r"[^。！？!?；;…]*[。！？!?；;…]+[”’」』）)\"'】]*|[^。！？!?；;…]+$")
_ARRAYS = ("ids", "word_start", "sent_offsets", "doc_offsets")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of one paragraph (a paragraph end is always a sentence end)."""
    return [m.span() for m in _SENTENCE.finditer(text) if m.group().strip()]


@dataclass
class TokenizedCorpus:
    ids: np.ndarray
    word_start: np.ndarray
    sent_offsets: np.ndarray
    doc_offsets: np.ndarray

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def num_sentences(self) -> int:
        return len(self.sent_offsets) - 1

    def save(self, folder: Path) -> None:
        for name in _ARRAYS:
            np.save(folder / f"{name}.npy", getattr(self, name))

    @classmethod
    def load(cls, folder: Path) -> "TokenizedCorpus":
        # Memory-mapped: a warm start reads only the pages a batch touches.
        return cls(**{n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in _ARRAYS})


def tokenize_corpus(corpus: Corpus, tokenizer) -> TokenizedCorpus:
    sentences: list[str] = []
    sentence_words: list[list[int] | None] = []
    doc_sizes: list[int] = []
    for doc in corpus.documents:
        n = 0
        for para in doc:
            ws = para.word_starts
            for a, b in split_sentences(para.text):
                sentences.append(para.text[a:b])
                sentence_words.append(None if ws is None else [s - a for s in ws if a <= s < b])
                n += 1
        doc_sizes.append(n)

    backend = tokenizer.backend_tokenizer
    encodings = backend.encode_batch(sentences, add_special_tokens=False)
    ids_parts, ws_parts, lengths = [], [], []
    for enc, words, text in zip(encodings, sentence_words, sentences):
        ids = enc.ids
        lengths.append(len(ids))
        if not ids:
            continue
        ids_parts.append(np.asarray(ids, dtype=np.int32))
        starts = np.fromiter((o[0] for o in enc.offsets), dtype=np.int64, count=len(ids))
        if words is None:
            flags = np.ones(len(ids), dtype=bool)
        else:
            mark = np.zeros(len(text) + 1, dtype=bool)
            mark[words] = True
            flags = mark[np.minimum(starts, len(text))]
            flags[0] = True  # a sentence always starts a word, whatever the segmenter said
        ws_parts.append(flags)

    lengths_arr = np.asarray(lengths, dtype=np.int64)
    keep = lengths_arr > 0  # sentences that tokenise to nothing (stray symbols) are dropped
    doc_ids = np.repeat(np.arange(len(doc_sizes)), doc_sizes)[keep]
    doc_sent_counts = np.bincount(doc_ids, minlength=len(doc_sizes))
    doc_sent_counts = doc_sent_counts[doc_sent_counts > 0]
    return TokenizedCorpus(
        ids=np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32),
        word_start=np.concatenate(ws_parts) if ws_parts else np.zeros(0, bool),
        sent_offsets=np.concatenate([[0], np.cumsum(lengths_arr[keep])]).astype(np.int64),
        doc_offsets=np.concatenate([[0], np.cumsum(doc_sent_counts)]).astype(np.int64),
    )

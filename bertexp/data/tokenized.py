"""The corpus tokenised once (bertexp/data/prepare.py) into flat arrays that every later stage slices.

Layout: `ids[sent_offsets[s]:sent_offsets[s+1]]` are the tokens of sentence s, sentences
`doc_offsets[d]:doc_offsets[d+1]` belong to document d, and `word_start[t]` says that token t begins a word
(gold segmentation or the segmenter's), which whole-word, span and n-gram masking need.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# A sentence ends at Chinese or Western terminal punctuation, with any closing quotes or brackets after it.
ENDS, CLOSERS = "。！？!?；;…", "”’」』）)\"'】"
_SENTENCE = re.compile(rf"[^{ENDS}]*[{ENDS}]+[{CLOSERS}]*|[^{ENDS}]+$")


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

    @classmethod
    def load(cls, folder: Path) -> "TokenizedCorpus":
        """The arrays bertexp/data/prepare.py wrote, memory-mapped: a warm start reads only the pages a batch
        touches, and the token arrays never count twice in memory, whatever the corpus size."""
        def mapped(name: str, dtype) -> np.ndarray:
            path = folder / name
            if path.stat().st_size == 0:
                return np.zeros(0, dtype)
            return np.memmap(path, dtype=dtype, mode="r")

        return cls(ids=mapped("ids.bin", np.int32), word_start=mapped("word_start.bin", np.bool_),
                   # 8 bytes a sentence, read whole: every start slices them
                   sent_offsets=np.load(folder / "sent_offsets.npy"), doc_offsets=np.load(folder / "doc_offsets.npy"))

"""NSP pairs, the original BERT recipe (create_instances_from_document), on token ranges.

Segments A and B are runs of whole sentences filling up to `max_length - 3` tokens; half the time B is the
true continuation (label 0, as `BertForPreTraining` expects), half the time a run of sentences from another
document (label 1). A chunk of one sentence always gets a random B, as in Google's code, so somewhat more
than half of the pairs are random-next (about 55% on People's Daily). Since the sentences of a document are contiguous in the flat token array, A and B are
each one `[start, end)` range, so an epoch's examples are a small int array, not lists of tokens.

No step samples "until different": the random document is drawn from the others directly, so a corpus of
three sentences terminates as surely as a large one.
"""
from __future__ import annotations

import numpy as np

from bertexp.errors import DataError

# Columns of an example row.
A0, A1, B0, B1, LABEL = range(5)


def sentence_pieces(sent_offsets: np.ndarray, max_piece: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split every sentence longer than `max_piece` tokens into near-equal pieces, so one enormous line
    without punctuation becomes many usable segments instead of being truncated to nothing.

    Returns (piece start, piece end, sentence index of each piece)."""
    starts, ends = np.asarray(sent_offsets[:-1]), np.asarray(sent_offsets[1:])
    lengths = ends - starts
    n_pieces = np.maximum(1, -(-lengths // max_piece))
    sent_of_piece = np.repeat(np.arange(len(lengths)), n_pieces)
    k = np.arange(len(sent_of_piece)) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
    n = n_pieces[sent_of_piece]
    piece_start = starts[sent_of_piece] + (lengths[sent_of_piece] * k) // n
    piece_end = starts[sent_of_piece] + (lengths[sent_of_piece] * (k + 1)) // n
    return piece_start, piece_end, sent_of_piece


def build_pairs(
    seg_start: np.ndarray,
    seg_end: np.ndarray,
    doc_seg_offsets: np.ndarray,
    max_length: int,
    rng: np.random.Generator,
    short_seq_prob: float = 0.1,
) -> np.ndarray:
    """Return an (N, 5) int64 array of examples: A range, B range, NSP label."""
    max_tokens = max_length - 3
    n_docs = len(doc_seg_offsets) - 1
    total_segs = int(doc_seg_offsets[-1])
    seg_len = seg_end - seg_start
    out: list[tuple[int, int, int, int, int]] = []

    def random_b(doc: int, a_first: int, a_end: int, target: int) -> tuple[int, int] | None:
        """B from another document; in a one-document corpus, from any segment outside A and its true
        continuation (segments a_first..a_end). None when there is none."""
        if n_docs > 1:
            other = int(rng.integers(n_docs - 1))
            other += other >= doc
            lo, hi = int(doc_seg_offsets[other]), int(doc_seg_offsets[other + 1])
            j = lo + int(rng.integers(hi - lo))
        else:
            excluded = min(a_end, total_segs - 1) - a_first + 1
            if total_segs - excluded < 1:
                return None
            j = int(rng.integers(total_segs - excluded))
            j += excluded if j >= a_first else 0
            hi = a_first if j < a_first else total_segs  # B stops before it would run into A
        k, length = j, 0
        while k < hi and length < target:
            length += seg_len[k]
            k += 1
        return int(seg_start[j]), int(seg_end[k - 1])

    for d in range(n_docs):
        lo, hi = int(doc_seg_offsets[d]), int(doc_seg_offsets[d + 1])
        target = max_tokens if rng.random() >= short_seq_prob else int(rng.integers(2, max_tokens + 1))
        chunk_start, cur = lo, 0
        i = lo
        while i < hi:
            cur += seg_len[i]
            if i == hi - 1 or cur >= target:
                n_in_chunk = i - chunk_start + 1
                # A one-segment chunk (often a document's last sentence) becomes A of a random-next pair, as
                # in Google's create_instances_from_document, rather than being lost; that needs a segment
                # elsewhere to draw B from.
                if n_in_chunk >= 2 or total_segs >= 2:
                    a_end = chunk_start + (int(rng.integers(1, n_in_chunk)) if n_in_chunk >= 2 else 1)
                    a0, a1 = int(seg_start[chunk_start]), int(seg_end[a_end - 1])
                    b = None
                    if n_in_chunk == 1 or rng.random() < 0.5:
                        b = random_b(d, chunk_start, a_end, max(1, target - (a1 - a0)))
                    if b is not None:
                        (b0, b1), label = b, 1
                        i = a_end - 1  # the unused sentences go back for the next chunk, as in BERT
                    elif n_in_chunk >= 2:  # no segment to draw a random B from (a tiny one-document corpus)
                        b0, b1, label = a1, int(seg_end[i]), 0
                    if b is not None or n_in_chunk >= 2:
                        out.append((a0, a1, b0, b1, label))
                chunk_start, cur = i + 1, 0
                target = max_tokens if rng.random() >= short_seq_prob else int(rng.integers(2, max_tokens + 1))
            i += 1
    if not out:
        raise DataError(
            "corpus too small for NSP: need at least one document with two sentences "
            f"(found {total_segs} segment(s) in {n_docs} document(s))"
        )
    ex = np.asarray(out, dtype=np.int64)
    return truncate_pairs(ex, max_tokens, rng)


def truncate_pairs(ex: np.ndarray, max_tokens: int, rng: np.random.Generator) -> np.ndarray:
    """BERT's truncate_seq_pair, vectorised: trim the longer side first, each cut split at random
    between its front and back."""
    la, lb = ex[:, A1] - ex[:, A0], ex[:, B1] - ex[:, B0]
    excess = np.maximum(0, la + lb - max_tokens)
    # Cut the longer down towards the shorter, then share what is left (longer side takes the odd token).
    diff = np.abs(la - lb)
    first = np.minimum(excess, diff)
    rest = excess - first
    cut_long = first + (rest + 1) // 2
    cut_short = rest // 2
    a_longer = la >= lb
    cut_a = np.where(a_longer, cut_long, cut_short)
    cut_b = np.where(a_longer, cut_short, cut_long)
    front_a = rng.binomial(cut_a, 0.5)
    front_b = rng.binomial(cut_b, 0.5)
    ex = ex.copy()
    ex[:, A0] += front_a
    ex[:, A1] -= cut_a - front_a
    ex[:, B0] += front_b
    ex[:, B1] -= cut_b - front_b
    return ex

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

import hashlib
from pathlib import Path

import numpy as np

from bertexp.errors import DataError

try:  # compiled when numba is there (it is a dependency); the same code runs as plain Python otherwise
    import numba
    from numba import njit as _njit

    _jit = _njit(cache=True, nogil=True)
    _COMPILER = f"numba {numba.__version__}"
except ImportError:  # pragma: no cover
    def _jit(f):
        f.py_func = f
        return f

    _COMPILER = "python"

# Columns of an example row.
A0, A1, B0, B1, LABEL = range(5)
# What makes the pairs, for the key of cached ones: this file (any edit invalidates them), and the versions of
# NumPy and numba, whose generator streams are not promised to stay the same across versions.
_MADE_BY = f"numpy {np.__version__}, {_COMPILER}".encode()
PAIRS_SOURCE = hashlib.sha1(Path(__file__).read_bytes() + _MADE_BY).hexdigest()[:16]


def sentence_pieces(starts: np.ndarray, ends: np.ndarray, max_piece: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split every sentence (token range [start, end)) longer than `max_piece` tokens into near-equal pieces,
    so one enormous line without punctuation becomes many usable segments instead of being truncated to
    nothing.

    Returns (piece start, piece end, index of each piece's sentence), in sentence order."""
    starts, ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    lengths = ends - starts
    n_pieces = np.maximum(1, -(-lengths // max_piece))
    sent_of_piece = np.repeat(np.arange(len(lengths)), n_pieces)
    piece_start, piece_end = starts[sent_of_piece], ends[sent_of_piece]
    # only the pieces of long sentences need cutting (most sentences are one piece)
    at = np.flatnonzero(n_pieces[sent_of_piece] > 1)
    if len(at):
        s = sent_of_piece[at]
        k = at - (np.cumsum(n_pieces) - n_pieces)[s]
        n, length = n_pieces[s], lengths[s]
        piece_start[at] = starts[s] + (length * k) // n
        piece_end[at] = starts[s] + (length * (k + 1)) // n
    return piece_start, piece_end, sent_of_piece


def document_segments(sent_offsets: np.ndarray, sent_ranges, max_length: int):
    """Segments (sentences, long ones cut into pieces that fit half a pair of `max_length`) of the documents
    given as [first, end) sentence ranges, concatenated, with each document's first segment (offsets). Only
    the sentences asked for are cut: the exam's documents cost in proportion to their own size."""
    so = np.asarray(sent_offsets)
    starts, ends, doc_sents = _gather(so[:-1], so[1:], sent_ranges)
    piece_start, piece_end, sent_of_piece = sentence_pieces(starts, ends, max(1, (max_length - 3) // 2))
    return piece_start, piece_end, np.searchsorted(sent_of_piece, doc_sents, side="left")


def _gather(starts: np.ndarray, ends: np.ndarray, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ranges of the chosen groups (rows of [first, end) indices), concatenated, with the groups' new
    offsets."""
    groups = np.asarray(groups, dtype=np.int64).reshape(-1, 2)
    sizes = groups[:, 1] - groups[:, 0]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    idx = np.arange(offsets[-1]) - np.repeat(offsets[:-1] - groups[:, 0], sizes)
    return starts[idx], ends[idx], offsets


def epoch_pairs(segments, max_length: int, seed: int, epoch: int, short_seq_prob: float) -> np.ndarray:
    """One epoch's training examples in training order: pairs and order drawn from (seed, epoch) alone."""
    rng = np.random.default_rng([seed, epoch, 3])
    ex = build_pairs(*segments, max_length, rng, short_seq_prob)
    return ex[rng.permutation(len(ex))]


def build_pairs(
    seg_start: np.ndarray,
    seg_end: np.ndarray,
    doc_seg_offsets: np.ndarray,
    max_length: int,
    rng: np.random.Generator,
    short_seq_prob: float = 0.1,
) -> np.ndarray:
    """Return an (N, 5) int64 array of examples: A range, B range, NSP label."""
    seg_start = np.ascontiguousarray(seg_start, dtype=np.int64)
    seg_end = np.ascontiguousarray(seg_end, dtype=np.int64)
    # documents without segments are left out (the compiled loop assumes none; the pipeline makes none)
    doc_seg_offsets = np.ascontiguousarray(doc_seg_offsets, dtype=np.int64)
    doc_seg_offsets = doc_seg_offsets[np.concatenate([[True], np.diff(doc_seg_offsets) > 0])]
    if len(doc_seg_offsets) < 2 or doc_seg_offsets[0] != 0:
        raise DataError("corpus too small for NSP: it has no sentences")
    ex = _pairs_kernel(seg_start, seg_end, doc_seg_offsets, int(max_length) - 3, rng, float(short_seq_prob))
    if len(ex) == 0:
        raise DataError(
            "corpus too small for NSP: need at least one document with two sentences "
            f"(found {int(doc_seg_offsets[-1])} segment(s) in {len(doc_seg_offsets) - 1} document(s))"
        )
    return truncate_pairs(ex, int(max_length) - 3, rng)


@_jit
def _random_b(seg_start, seg_end, doc_seg_offsets, rng, doc, a_first, a_end, target):
    """B from another document; in a one-document corpus, from any segment outside A and its true
    continuation (segments a_first..a_end). (-1, -1) when there is none."""
    n_docs = len(doc_seg_offsets) - 1
    total_segs = doc_seg_offsets[-1]
    if n_docs > 1:
        other = rng.integers(0, n_docs - 1)
        if other >= doc:
            other += 1
        lo, hi = doc_seg_offsets[other], doc_seg_offsets[other + 1]
        j = lo + rng.integers(0, hi - lo)
    else:
        excluded = min(a_end, total_segs - 1) - a_first + 1
        if total_segs - excluded < 1:
            return -1, -1
        j = rng.integers(0, total_segs - excluded)
        if j >= a_first:
            j += excluded
        hi = a_first if j < a_first else total_segs  # B stops before it would run into A
    k, length = j, 0
    while k < hi and length < target:
        length += seg_end[k] - seg_start[k]
        k += 1
    return seg_start[j], seg_end[k - 1]


@_jit
def _pairs_kernel(seg_start, seg_end, doc_seg_offsets, max_tokens, rng, short_seq_prob):
    """Google's create_instances_from_document over every document, compiled (numba): a Python loop per
    segment costs tens of seconds on a corpus of gigabytes. The draws are the same NumPy Generator calls in
    the same order as the plain-Python version (`_pairs_kernel.py_func`, which the tests compare)."""
    n_docs = len(doc_seg_offsets) - 1
    total_segs = doc_seg_offsets[-1]
    out = np.empty((total_segs + n_docs, 5), dtype=np.int64)  # every example uses up at least one segment
    n = 0
    for d in range(n_docs):
        lo, hi = doc_seg_offsets[d], doc_seg_offsets[d + 1]
        target = max_tokens if rng.random() >= short_seq_prob else rng.integers(2, max_tokens + 1)
        chunk_start, cur = lo, 0
        i = lo
        while i < hi:
            cur += seg_end[i] - seg_start[i]
            if i == hi - 1 or cur >= target:
                n_in_chunk = i - chunk_start + 1
                # A one-segment chunk (often a document's last sentence) becomes A of a random-next pair, as
                # in Google's create_instances_from_document, rather than being lost; that needs a segment
                # elsewhere to draw B from.
                if n_in_chunk >= 2 or total_segs >= 2:
                    a_end = chunk_start + (rng.integers(1, n_in_chunk) if n_in_chunk >= 2 else 1)
                    a0, a1 = seg_start[chunk_start], seg_end[a_end - 1]
                    b0, b1, label = -1, -1, 0
                    if n_in_chunk == 1 or rng.random() < 0.5:
                        b0, b1 = _random_b(seg_start, seg_end, doc_seg_offsets, rng, d, chunk_start, a_end,
                                           max(1, target - (a1 - a0)))
                    if b0 >= 0:
                        label = 1
                        i = a_end - 1  # the unused sentences go back for the next chunk, as in BERT
                    elif n_in_chunk >= 2:  # no segment to draw a random B from (a tiny one-document corpus)
                        b0, b1 = a1, seg_end[i]
                    if b0 >= 0:
                        out[n, 0], out[n, 1], out[n, 2], out[n, 3], out[n, 4] = a0, a1, b0, b1, label
                        n += 1
                chunk_start, cur = i + 1, 0
                target = max_tokens if rng.random() >= short_seq_prob else rng.integers(2, max_tokens + 1)
            i += 1
    return out[:n]


def truncate_pairs(ex: np.ndarray, max_tokens: int, rng: np.random.Generator) -> np.ndarray:
    """BERT's truncate_seq_pair, vectorised: trim the longer side first, each cut split at random
    between its front and back."""
    ex = ex.copy()
    rows = np.flatnonzero((ex[:, A1] - ex[:, A0]) + (ex[:, B1] - ex[:, B0]) > max_tokens)  # only these are cut
    sub = ex[rows]
    la, lb = sub[:, A1] - sub[:, A0], sub[:, B1] - sub[:, B0]
    excess = la + lb - max_tokens
    # Cut the longer down towards the shorter, then share what is left (longer side takes the odd token).
    diff = np.abs(la - lb)
    first = np.minimum(excess, diff)
    rest = excess - first
    cut_long = first + (rest + 1) // 2
    cut_short = rest // 2
    a_longer = la >= lb
    cut_a = np.where(a_longer, cut_long, cut_short)
    cut_b = np.where(a_longer, cut_short, cut_long)
    front_a, front_b = np.zeros_like(cut_a), np.zeros_like(cut_b)
    # Binomial(0, p) draws no random number, so drawing only where there is a cut gives the same values
    # (and leaves the generator where drawing everywhere would) at a fraction of the time.
    front_a[cut_a > 0] = rng.binomial(cut_a[cut_a > 0], 0.5)
    front_b[cut_b > 0] = rng.binomial(cut_b[cut_b > 0], 0.5)
    sub[:, A0] += front_a
    sub[:, A1] -= cut_a - front_a
    sub[:, B0] += front_b
    sub[:, B1] -= cut_b - front_b
    ex[rows] = sub
    return ex

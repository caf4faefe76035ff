"""PMI collocations of the training documents, for PMI-Masking (Levine et al. 2021).

An n-gram of words (n = 2..max_n) is scored by the PMI measure of the paper,

    PMI_n(w1..wn) = log p(w1..wn) - max over segmentations s of w1..wn into >= 2 contiguous parts of
                    sum over parts of log p(part),

so an n-gram ranks high only if it is more frequent than *every* way of gluing it from smaller pieces (a
plain PMI against the unigrams would rank "a frequent bigram plus any word" high). Probabilities are counts
over the n-gram positions of that length that lie inside one sentence of the training documents (the
held-out documents are never read). Words are the corpus's word boundaries (gold ones for People's Daily).

Kept: n-grams with PMI_n >= min_pmi and, when there are more than `max_ngrams`, the best of each length up
to its share of the cap (`length_shares`). Built once per (tokens build, split, settings) and cached beside the
tokens: `collocations.tsv` (readable: rank,
PMI, count, n, the words), `unit_start.npy` (the corpus cut into masking units: a collocation occurrence is
one unit, every other word its own) and `meta.json`. Occurrences are taken greedily in PMI order, so two
overlapping collocations never share a unit.

Counting is vectorised (words and n-grams are 64-bit hashes; `np.unique` counts them) and reads at most
`limit` training tokens, so it is bounded on a corpus of gigabytes.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

from bertexp.data.cache import cached_dir, key_of

log = logging.getLogger(__name__)
VERSION = "2"  # 2: the cap is shared between lengths
_B = np.uint64(0x100000001B3)        # multiplier of the hash of a word's token ids (FNV prime)
_C = np.uint64(0x9E3779B97F4A7C15)   # multiplier of the hash of an n-gram's word hashes (golden ratio)


@dataclass
class Collocations:
    folder: Path
    unit_start: np.ndarray  # aligned with the corpus tokens: True where a masking unit begins
    meta: dict

    @property
    def size(self) -> int:
        return int(self.meta["size"])

    def table(self) -> list[dict]:
        """The collocation vocabulary, best first: dicts of rank, pmi, count, n, text."""
        rows = []
        with open(self.folder / "collocations.tsv", encoding="utf-8") as f:
            next(f)
            for line in f:
                rank, pmi, count, n, text = line.rstrip("\n").split("\t")
                rows.append({"rank": int(rank), "pmi": float(pmi), "count": int(count), "n": int(n), "text": text})
        return rows


class Words:
    """The corpus as words: where each starts, its length in tokens, its sentence and its hash."""

    def __init__(self, ids: np.ndarray, word_start: np.ndarray, sent_offsets: np.ndarray):
        self.start = np.flatnonzero(word_start).astype(np.int64)
        self.end = np.append(self.start[1:], len(ids))
        self.sent = np.searchsorted(np.asarray(sent_offsets), self.start, side="right") - 1
        length = self.end - self.start
        h = np.zeros(len(self.start), dtype=np.uint64)
        live = np.arange(len(self.start))
        k = 0
        while len(live):  # one pass per token position inside words: words are short, so few passes
            h[live] = h[live] * _B + (np.asarray(ids[self.start[live] + k]).astype(np.uint64) + np.uint64(1))
            k += 1
            live = live[length[live] > k]
        self.hash = h

    def __len__(self) -> int:
        return len(self.start)

    def ngrams(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Hashes of the n-grams starting at each word (the last n-1 words have none) and whether each lies
        inside one sentence."""
        g = self.hash[: len(self) - n + 1].copy()
        for j in range(1, n):
            g = g * _C + self.hash[j : len(self) - n + 1 + j]
        same = self.sent[: len(self) - n + 1] == self.sent[n - 1 :]
        return g, same


def _compositions(n: int) -> list[list[tuple[int, int]]]:
    """Every way to cut n words into >= 2 contiguous parts, as (offset, length) lists."""
    out = []
    for k in range(1, n):
        for cuts in combinations(range(1, n), k):
            bounds = (0, *cuts, n)
            out.append([(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])])
    return out


def score_ngrams(words: Words, counted: np.ndarray, max_n: int, min_count: int):
    """PMI_n of every n-gram (n = 2..max_n) seen at least `min_count` times among the counted words.
    Returns arrays (pmi, count, n, first position)."""
    tables = {}  # n -> (sorted unique hashes, log-probabilities)
    grams = {}
    for n in range(1, max_n + 1):
        g, same = words.ngrams(n)
        ok = same & counted[: len(g)] & counted[n - 1 :]
        keys = g[ok]
        uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
        tables[n] = (uniq, np.log(counts / max(len(keys), 1)))
        grams[n] = (g, np.flatnonzero(ok)[first], counts)

    def logp(k: int, at: np.ndarray) -> np.ndarray:
        uniq, lp = tables[k]
        return lp[np.searchsorted(uniq, grams[k][0][at])]  # every part of a counted n-gram was counted too

    out = []
    for n in range(2, max_n + 1):
        _, pos, counts = grams[n]
        keep = counts >= min_count
        pos, counts = pos[keep], counts[keep]
        if not len(pos):
            continue
        best = np.full(len(pos), -np.inf)
        for parts in _compositions(n):
            best = np.maximum(best, sum(logp(k, pos + o) for o, k in parts))
        out.append((logp(n, pos) - best, counts, np.full(len(pos), n), pos))
    if not out:
        return (np.zeros(0),) + (np.zeros(0, np.int64),) * 3
    return tuple(np.concatenate(x) for x in zip(*out))


def cut_units(words: Words, word_start: np.ndarray, vocab: dict[int, np.ndarray], rank_of: dict[int, dict]) -> np.ndarray:
    """The corpus cut into units: every occurrence of a collocation (greedily, best-ranked first, never
    overlapping another taken one) becomes one unit; other words stay units of their own."""
    cand_pos, cand_n, cand_rank = [], [], []
    for n, keys in vocab.items():
        g, same = words.ngrams(n)
        hit = np.flatnonzero(same & np.isin(g, keys))
        cand_pos.append(hit)
        cand_n.append(np.full(len(hit), n))
        cand_rank.append(rank_of[n][np.searchsorted(keys, g[hit])])
    pos, ns, ranks = (np.concatenate(x) if x else np.zeros(0, np.int64) for x in (cand_pos, cand_n, cand_rank))
    order = np.lexsort((pos, ranks))  # best rank first, then left to right
    covered = bytearray(len(words) + 1)
    taken_pos, taken_n = [], []
    for i, n in zip(pos[order].tolist(), ns[order].tolist()):
        if any(covered[i : i + n]):
            continue
        covered[i : i + n] = b"\x01" * n
        taken_pos.append(i)
        taken_n.append(n)
    unit_start = np.array(word_start, dtype=bool, copy=True)
    if taken_pos:
        tp, tn = np.asarray(taken_pos), np.asarray(taken_n)
        inner = np.repeat(tp, tn - 1) + (np.arange(int((tn - 1).sum())) - np.repeat(np.cumsum(tn - 1) - (tn - 1), tn - 1)) + 1
        unit_start[words.start[inner]] = False
    return unit_start


def length_shares(max_n: int) -> dict[int, float]:
    """How a capped vocabulary is split between n-gram lengths: half bigrams, a quarter trigrams, and so on,
    the last length taking the rest (PMI-Masking's released vocabulary mixes 2..5-grams 50/25/12.5/12.5%).
    PMI_n grows with n, so one ranking across lengths would fill the cap with long n-grams."""
    shares = {k: 0.5 ** (k - 1) for k in range(2, max_n)}
    shares[max_n] = 1.0 - sum(shares.values())
    return shares


def _select(pmi, count, n, min_pmi: float, max_ngrams: int | None, max_n: int) -> np.ndarray:
    """Indices of the kept n-grams, best PMI first: at least `min_pmi`, and under a cap, the best of each
    length up to its share of `max_ngrams`."""
    keep = np.flatnonzero(pmi >= min_pmi)
    if max_ngrams is not None:
        parts = []
        for k, share in length_shares(max_n).items():
            at = keep[n[keep] == k]
            parts.append(at[np.lexsort((-count[at], -pmi[at]))][: int(round(share * max_ngrams))])
        keep = np.concatenate(parts) if parts else keep[:0]
    return keep[np.lexsort((-count[keep], -pmi[keep]))]


def build_collocations(data, tokenizer, max_n: int = 5, min_count: int = 10, min_pmi: float = 0.0,
                       max_ngrams: int | None = 100_000, limit: int | None = None) -> Collocations:
    """The collocations of `data`'s training documents and the corpus cut into units (cached)."""
    from bertexp.data.dataset import STATS_MAX_TOKENS

    limit = STATS_MAX_TOKENS if limit is None else limit
    t = data.tokens
    key = key_of(tokens=data.tokens_build_id, split_seed=data.split_seed, val_fraction=data.val_fraction, max_n=max_n,
                 min_count=min_count, min_pmi=min_pmi, max_ngrams=max_ngrams, limit=limit, v=VERSION)

    def build(tmp: Path) -> None:
        log.info("Counting word n-grams (n = 2..%d) of the training documents for PMI masking (once; cached)", max_n)
        words = Words(t.ids, t.word_start, t.sent_offsets)
        counted = np.zeros(len(words), dtype=bool)
        budget = limit
        for a, b in data._train_sents:  # training documents only, the first `limit` tokens of them
            if budget <= 0:
                break
            lo, hi = np.searchsorted(words.start, [t.sent_offsets[a], t.sent_offsets[b]])
            hi = min(hi, np.searchsorted(words.start, t.sent_offsets[a] + budget))
            counted[lo:hi] = True
            budget -= int(t.sent_offsets[b] - t.sent_offsets[a])
        pmi, count, n, pos = score_ngrams(words, counted, max_n, min_count)
        sel = _select(pmi, count, n, min_pmi, max_ngrams, max_n)
        pmi, count, n, pos = pmi[sel], count[sel], n[sel], pos[sel]
        vocab, rank_of = {}, {}
        for k in np.unique(n):
            at = np.flatnonzero(n == k)
            hashes = words.ngrams(int(k))[0][pos[at]]
            o = np.argsort(hashes)
            vocab[int(k)], rank_of[int(k)] = hashes[o], at[o]
        unit_start = cut_units(words, t.word_start, vocab, rank_of)
        vocab_tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        with open(tmp / "collocations.tsv", "w", encoding="utf-8") as f:
            f.write("rank\tpmi\tcount\tn\tngram\n")
            for r, (p, c, k, i) in enumerate(zip(pmi.tolist(), count.tolist(), n.tolist(), pos.tolist()), 1):
                text = " ".join(
                    "".join(vocab_tokens[x].removeprefix("##") for x in t.ids[words.start[w] : words.end[w]])
                    for w in range(i, i + k)
                )
                f.write(f"{r}\t{p:.4f}\t{c}\t{k}\t{text}\n")
        np.save(tmp / "unit_start.npy", unit_start)
        inside = ~unit_start[np.asarray(t.word_start, dtype=bool)]
        meta = {
            "size": int(len(sel)), "max_n": max_n, "min_count": min_count, "min_pmi": min_pmi,
            "max_ngrams": max_ngrams, "threshold": float(pmi.min()) if len(pmi) else None,
            "per_n": {int(k): int((n == k).sum()) for k in np.unique(n)},
            "counted_words": int(counted.sum()),
            "words_joined_share": float(inside.mean()) if len(inside) else 0.0,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    path, hit = cached_dir(data.cache, f"pmi-{key}", build)
    col = Collocations(path, np.load(path / "unit_start.npy", mmap_mode="r"), json.loads((path / "meta.json").read_text()))
    m = col.meta
    top = ", ".join(f"{r['text']} ({r['pmi']:.1f})" for r in col.table()[:5]) if col.size else "none"
    log.info("%s %d PMI collocations (n=2..%d, count >= %d, PMI >= %s; %s) from %d training words; %.1f%% of "
             "word boundaries fall inside one. Top: %s. Table: %s",
             "Using cached" if hit else "Built", col.size, max_n, min_count,
             f"{m['threshold']:.2f}" if m["threshold"] is not None else "-",
             ", ".join(f"{v} of n={k}" for k, v in m["per_n"].items()), m["counted_words"],
             100 * m["words_joined_share"], top, path / "collocations.tsv")
    return col

"""MLM masking strategies: one interface, one class per way of choosing positions.

Every strategy answers only *which* positions are selected (`select`, at a given ratio); the shared
`__call__` then applies the replacement split to the selected positions in a few whole-batch tensor
operations, as transformers' `DataCollatorForLanguageModeling` does: `mask_token_prob` of them become [MASK],
`random_token_prob` a random non-special token, the rest stay as they are. Padding and special tokens are
never selected. All randomness comes from the generator passed in, so the same (batch, generator state,
progress) always gives the same mask.

Three knobs that research on masking separates (README, "Masking strategies"):
- the ratio can follow a schedule over the run (Ankner et al. 2023): `schedule`, `ratio` -> `final_ratio`,
  as a function of the fraction of the run done, so a resumed run masks exactly as it would have;
- what is corrupted and what is predicted are two shares (Wettig et al. 2023): `prediction_ratio` scores
  only a subset of the selected positions, or the selected ones and some unchanged ones besides;
- spans (SpanBERT), n-grams (MacBERT) and PMI collocations (Levine et al. 2021) are "units" of words that
  are selected whole, in random order, until the row's token budget is spent: one vectorised engine
  (`select_units`), no Python loop per row or per span.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from bertexp.errors import ConfigError

IGNORE_INDEX = -100
SCHEDULES = ("constant", "linear", "cosine", "step")


@dataclass
class Vocab:
    """What masking needs to know of a tokenizer."""

    size: int
    mask_id: int
    special_ids: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "Vocab":
        return cls(len(tokenizer), tokenizer.mask_token_id, tuple(sorted(set(tokenizer.all_special_ids))))

    def replacement_ids(self) -> torch.Tensor:
        """Ids a "random token" replacement may take: the whole vocabulary less its special tokens."""
        keep = torch.ones(self.size, dtype=torch.bool)
        keep[list(self.special_ids)] = False
        return keep.nonzero().squeeze(1)


class Masked(NamedTuple):
    input_ids: torch.Tensor  # the model's input: selected positions replaced by the split
    labels: torch.Tensor     # original ids where the prediction is scored, IGNORE_INDEX elsewhere
    selected: torch.Tensor   # positions chosen by the strategy (the ratio's share)
    corrupted: torch.Tensor  # selected positions replaced by [MASK] or a random token


@dataclass(frozen=True)
class RatioSchedule:
    """The selection ratio as a function of the fraction of the run done (0 at the start, 1 at the end).

    constant: `start` throughout; linear: straight from `start` to `end`; cosine: half a cosine from `start`
    to `end` (slow at both ends); step: `start` until `step_at`, `end` after (MosaicML's StepScheduler)."""

    kind: str = "constant"
    start: float = 0.15
    end: float = 0.15
    step_at: float = 0.5

    def __call__(self, progress: float) -> float:
        f = min(max(float(progress), 0.0), 1.0)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * f
        if self.kind == "cosine":
            return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * f))
        if self.kind == "step":
            return self.start if f < self.step_at else self.end
        return self.start


def _check_share(field: str, v, low_open: bool = True) -> float:
    v = float(v)
    if not (0.0 < v < 1.0 if low_open else 0.0 < v <= 1.0):
        raise ConfigError(f"masking.{field}={v:g} must be in (0, 1{')' if low_open else ']'}"
                          f"{' (exclusive)' if low_open else ''}")
    return v


class Masker:
    """Base class. Subclasses implement `select`; this class validates and applies the schedule, the
    replacement split and the prediction share."""

    name = "base"
    # Decide [MASK] / random / keep once per span instead of per token (SpanBERT); adjacent spans count as one.
    replace_per_span = False

    def __init__(self, ratio: float = 0.15, mask_token_prob: float = 0.8, random_token_prob: float = 0.1,
                 schedule: str = "constant", final_ratio: float | None = None, step_at: float = 0.5,
                 prediction_ratio: float | None = None):
        ratio = _check_share("ratio", ratio)
        for field, v in (("mask_token_prob", mask_token_prob), ("random_token_prob", random_token_prob)):
            if not 0.0 <= float(v) <= 1.0:
                raise ConfigError(f"masking.{field}={v} must be in [0, 1]")
        if mask_token_prob + random_token_prob > 1.0 + 1e-9:
            raise ConfigError(
                f"masking.mask_token_prob + masking.random_token_prob = {mask_token_prob + random_token_prob:g} "
                "must be <= 1 (the rest of the selected tokens are left unchanged)"
            )
        if schedule not in SCHEDULES:
            raise ConfigError(f"masking.schedule={schedule!r} must be one of {', '.join(SCHEDULES)}")
        if schedule == "constant":
            if final_ratio is not None and float(final_ratio) != ratio:
                raise ConfigError(f"masking.final_ratio={final_ratio} is set but masking.schedule=constant; "
                                  "choose masking.schedule=linear, cosine or step (or drop final_ratio)")
            final_ratio = ratio
        elif final_ratio is None:
            raise ConfigError(f"masking.schedule={schedule} needs masking.final_ratio (the ratio at the end of the run)")
        final_ratio = _check_share("final_ratio", final_ratio)
        if not 0.0 <= float(step_at) <= 1.0:
            raise ConfigError(f"masking.step_at={step_at} must be in [0, 1] (a fraction of the run)")
        if schedule != "step" and float(step_at) != 0.5:
            raise ConfigError(f"masking.step_at={step_at} only applies to masking.schedule=step (this is {schedule})")
        p = prediction_ratio
        if p is not None and min(ratio, final_ratio) < float(p) < max(ratio, final_ratio):
            raise ConfigError(
                f"masking.prediction_ratio={p} lies between the schedule's ratios ({ratio} -> {final_ratio}): it would "
                "switch mid-run from scoring a subset of the selected to scoring unchanged tokens too; choose a "
                "prediction_ratio outside that range (or null: score exactly the selected)")
        self.schedule = RatioSchedule(schedule, ratio, final_ratio, float(step_at))
        self.ratio = ratio
        self.prediction_ratio = None if prediction_ratio is None else _check_share("prediction_ratio", prediction_ratio, False)
        self.mask_token_prob = float(mask_token_prob)
        self.random_token_prob = float(random_token_prob)
        self.vocab: Vocab | None = None

    def bind(self, vocab: Vocab) -> "Masker":
        self.vocab = vocab
        self._replacements = vocab.replacement_ids()
        return self

    def prepare(self, data, tokenizer) -> None:
        """Build what the strategy needs from the training data (PMI: its collocations); most need nothing."""

    def select(self, batch: dict[str, torch.Tensor], generator: torch.Generator, ratio: float) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, batch: dict[str, torch.Tensor], generator: torch.Generator, progress: float = 0.0) -> Masked:
        """Mask a batch at the fraction `progress` of the run (which sets the scheduled ratio)."""
        assert self.vocab is not None, "Masker.bind(vocab) must be called first"
        ratio = self.schedule(progress)
        ids, special = batch["input_ids"], batch["special_tokens_mask"]
        chosen = self.select(batch, generator, ratio)
        # unit strategies also say where each chosen unit starts, so SpanBERT's per-span draw is per span even
        # where two chosen spans touch
        selected, unit_first = chosen if isinstance(chosen, tuple) else (chosen, None)
        selected = selected & ~special
        u = torch.rand(ids.shape, generator=generator)
        if self.replace_per_span:  # one draw per span: its first position's
            if unit_first is None:  # runs of selected positions
                unit_first = selected.clone()
                unit_first[:, 1:] &= ~selected[:, :-1]
            u = u.gather(1, _first_of_run(unit_first & selected))
        to_mask = selected & (u < self.mask_token_prob)
        to_random = selected & (u >= self.mask_token_prob) & (u < self.mask_token_prob + self.random_token_prob)
        masked = ids.masked_fill(to_mask, self.vocab.mask_id)
        at = to_random.nonzero(as_tuple=True)  # draw replacements only where they are used
        masked[at] = self._replacements[torch.randint(len(self._replacements), (len(at[0]),), generator=generator)]
        corrupted = to_mask | to_random
        predicted = selected
        p = self.prediction_ratio
        if p is not None:  # Wettig et al.: score a subset of the selected, or the selected and more
            v = torch.rand(ids.shape, generator=generator)
            if p <= ratio:
                predicted = selected & (v < p / ratio)
            else:
                predicted = selected | (~selected & ~special & (v < (p - ratio) / (1.0 - ratio)))
        return Masked(masked, ids.masked_fill(~predicted, IGNORE_INDEX), selected, corrupted)


class TokenMasking(Masker):
    """BERT: each non-special token is selected independently with probability `ratio`."""

    name = "token"

    def select(self, batch, generator, ratio):
        return torch.rand(batch["input_ids"].shape, generator=generator) < ratio


def _after_special(special: torch.Tensor) -> torch.Tensor:
    """True where the previous position is a special token (or at a row's start): where a segment begins."""
    out = torch.ones_like(special)
    out[:, 1:] = special[:, :-1]
    return out


def _first_of_run(start: torch.Tensor) -> torch.Tensor:
    """For every position, the position of the last `start` at or before it (0 if none)."""
    pos = torch.arange(start.shape[1]).expand_as(start)
    return torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), dim=1).values


class WholeWordMasking(Masker):
    """Chinese-BERT-wwm: each word is selected with probability `ratio` and then all of its characters are.
    The expected share of selected tokens is `ratio`, as for token masking."""

    name = "whole_word"

    def select(self, batch, generator, ratio):
        ws = batch["word_start"]
        pick = (torch.rand(ws.shape, generator=generator) < ratio) & ws
        return pick.gather(1, _first_of_run(ws))


def select_units(unit_start: torch.Tensor, special: torch.Tensor, ratio: float, generator: torch.Generator,
                 cut_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Select whole units (runs of tokens from one `unit_start` to the next) in random order until each
    row's budget — `ratio` of its non-special tokens, rounded stochastically so its expectation is exact —
    is spent. A special token ends every unit. The unit that crosses the budget is cut to fit
    (`cut_last`, SpanBERT's rule) or kept whole with probability (budget left) / (its length), so the
    expected share is still exactly `ratio` and no unit is ever split.

    A few whole-batch tensor operations on (rows, units) tables: a sort of each row's units by a random
    key, a cumulative sum of their lengths, and gathers back to the tokens. Returns (selected, unit starts)."""
    rows, width = special.shape
    maskable = ~special
    after_special = _after_special(special)
    start = (unit_start | after_special) & maskable
    n_units = int(start.sum(1).max()) if rows else 0
    # Units are numbered from 1 in each row; a special token keeps the number of the unit before it (0 for
    # [CLS]) and adds nothing to its length, so no separate "not a unit" entry is needed.
    uid = start.cumsum(1)
    lengths = torch.zeros(rows, n_units + 1, dtype=torch.long).scatter_add_(1, uid, maskable.long())
    budget = torch.floor(ratio * maskable.sum(1) + torch.rand(rows, generator=generator)).long()
    key = torch.rand(rows, n_units + 1, generator=generator).masked_fill_(lengths == 0, 2.0)
    order = torch.from_numpy(key.numpy().argsort(1))  # numpy's row sort is about twice as fast as torch's
    size = lengths.gather(1, order)
    room = (budget[:, None] - (size.cumsum(1) - size)).clamp_(min=0)
    if cut_last:
        take = torch.minimum(size, room)
    else:
        coin = torch.rand(rows, n_units + 1, generator=generator) * size < room
        take = size * ((room >= size) | coin)
    taken = torch.zeros_like(take).scatter_(1, order, take).gather(1, uid)
    if not cut_last:  # whole units: a unit is taken entirely or not at all
        return maskable & (taken > 0), start
    pos = torch.arange(width).expand(rows, width)
    first = torch.full((rows, n_units + 1), width).scatter_reduce_(1, uid, pos, "amin")
    return maskable & (pos - first.gather(1, uid) < taken), start  # the unit's first `taken` tokens


def _tile_starts(word_start: torch.Tensor, special: torch.Tensor, sample_lengths, mean_length: float,
                 generator: torch.Generator) -> torch.Tensor:
    """Cut each segment's words (A and B of every row separately) into consecutive tiles of lengths (in
    words) drawn by `sample_lengths`, the first tile starting at the segment's first word; True at the first
    token of each tile. A tile that runs past its segment's end is cut there, as a span that reaches a
    sentence end is."""
    words = word_start & ~special
    after_special = _after_special(special)
    flat_words = words.reshape(-1)
    word_pos = flat_words.nonzero().squeeze(1)  # flat position of each word's first token
    seg_first = (after_special & words).reshape(-1)[word_pos].nonzero().squeeze(1)  # word index of segment starts
    n_words, n_segs = len(word_pos), len(seg_first)
    out = torch.zeros(word_start.numel() + 1, dtype=torch.bool)  # the last entry takes tiles past a segment
    if n_segs:
        seg_len = torch.diff(seg_first, append=torch.tensor([n_words]))
        longest = int(seg_len.max())
        tiles = sample_lengths(generator, (n_segs, int(1.3 * longest / mean_length) + 4))  # slack; more if short
        ends = tiles.cumsum(1)
        while bool((ends[:, -1] < seg_len).any()):  # rare: a segment not covered yet; draw more tiles for all
            more = sample_lengths(generator, (n_segs, tiles.shape[1]))
            tiles = torch.cat([tiles, more], 1)
            ends = tiles.cumsum(1)
        first = ends - tiles  # each tile's first word, relative to its segment
        word = torch.where(first < seg_len[:, None], seg_first[:, None] + first, torch.full_like(first, n_words))
        out[torch.cat([word_pos, torch.tensor([word_start.numel()])])[word.reshape(-1)]] = True
    return out[:-1].reshape(word_start.shape)


class _UnitMasking(Masker):
    """Span-style strategies: units of `sample_lengths` words tile each row, and `select_units` picks them."""

    cut_last = True

    def sample_lengths(self, generator: torch.Generator, shape) -> torch.Tensor:
        raise NotImplementedError

    def expected_length(self) -> float:
        raise NotImplementedError

    def select(self, batch, generator, ratio):
        ws, special = batch["word_start"], batch["special_tokens_mask"]
        starts = _tile_starts(ws, special, self.sample_lengths, self.expected_length(), generator)
        return select_units(starts, special, ratio, generator, self.cut_last)


class SpanMasking(_UnitMasking):
    """SpanBERT: span lengths (in words) ~ Geometric(p) truncated to 1..`max_span` (mean 3.8 words); spans
    start at word starts.

    As in SpanBERT, the [MASK] / random / keep choice is made once per span (a random replacement still
    draws a token per position), and the last span is cut where the row's budget runs out, mid-word if need
    be (SpanBERT stops adding tokens the moment its budget is met). Spans tile each segment's words and are
    chosen in random order, so they never overlap; a segment's end ends a span."""

    name = "span"
    replace_per_span = True

    def __init__(self, ratio=0.15, mask_token_prob=0.8, random_token_prob=0.1, p: float = 0.2, max_span: int = 10, **kw):
        super().__init__(ratio, mask_token_prob, random_token_prob, **kw)
        if not 0.0 < p <= 1.0:
            raise ConfigError(f"masking.p={p} must be in (0, 1]")
        if max_span < 1:
            raise ConfigError(f"masking.max_span={max_span} must be >= 1")
        self.p, self.max_span = float(p), int(max_span)

    def sample_lengths(self, generator, shape):
        """SpanBERT's distribution: Geometric(p) restricted to 1..max_span and renormalised (not clipped, which
        would pile the tail onto max_span), by the inverse of its CDF 1 - q^l / (1 - q^max)."""
        if self.p >= 1.0:
            return torch.ones(shape, dtype=torch.long)
        q = 1.0 - self.p
        u = torch.rand(shape, generator=generator, dtype=torch.float64) * (1.0 - q**self.max_span)
        return (torch.floor(torch.log1p(-u) / math.log(q)).long() + 1).clamp_(1, self.max_span)

    def expected_length(self) -> float:
        """Mean of the truncated geometric: sum over l <= max of l p q^(l-1), over 1 - q^max (3.8 words for
        SpanBERT's p = 0.2, max 10)."""
        q = 1.0 - self.p
        return sum(l * self.p * q ** (l - 1) for l in range(1, self.max_span + 1)) / (1.0 - q**self.max_span)


class NgramMasking(_UnitMasking):
    """MacBERT/ERNIE: n-grams of n = 1..len(ngram_probs) words, n drawn with `ngram_probs`."""

    name = "ngram"
    cut_last = False  # MacBERT masks whole words: the n-gram that crosses the budget is kept whole or dropped

    def __init__(self, ratio=0.15, mask_token_prob=0.8, random_token_prob=0.1, ngram_probs=(0.4, 0.3, 0.2, 0.1), **kw):
        super().__init__(ratio, mask_token_prob, random_token_prob, **kw)
        probs = torch.tensor([float(x) for x in ngram_probs], dtype=torch.float64)
        if probs.ndim != 1 or len(probs) == 0 or bool((probs < 0).any()) or abs(float(probs.sum()) - 1.0) > 1e-6:
            raise ConfigError(f"masking.ngram_probs={list(ngram_probs)} must be non-negative and sum to 1")
        self.ngram_probs = probs
        self._cdf = [float(c) for c in probs.cumsum(0)[:-1]]

    def expected_length(self) -> float:
        return float((self.ngram_probs * torch.arange(1, len(self.ngram_probs) + 1)).sum())

    def sample_lengths(self, generator, shape):
        u = torch.rand(shape, generator=generator)
        n = torch.ones(shape, dtype=torch.long)
        for c in self._cdf:  # n = 1 + the number of cumulative probabilities the draw reaches
            n += u >= c
        return n


class PmiMasking(Masker):
    """PMI-Masking (Levine et al. 2021): word n-grams (n = 2..max_n) whose PMI measure ranks them as
    collocations of the training documents are masked as units, every other word as a whole word, to the
    same token budget. No unit is ever split: the unit that crosses the budget is kept whole or dropped.

    The collocation vocabulary and the corpus cut into units are built once, cached with the tokens
    (bertexp/data/collocations.py), and carried into batches as `unit_start`."""

    name = "pmi"

    def __init__(self, ratio=0.15, mask_token_prob=0.8, random_token_prob=0.1, max_n: int = 5, min_count: int = 10,
                 min_pmi: float = 1.0, max_ngrams: int | None = 100_000, **kw):
        super().__init__(ratio, mask_token_prob, random_token_prob, **kw)
        if not 2 <= int(max_n) <= 8:
            raise ConfigError(f"masking.max_n={max_n} must be between 2 and 8")
        if int(min_count) < 2:
            raise ConfigError(f"masking.min_count={min_count} must be >= 2 (a PMI from one occurrence is noise)")
        if max_ngrams is not None and int(max_ngrams) < 1:
            raise ConfigError(f"masking.max_ngrams={max_ngrams} must be >= 1 (or null for no cap)")
        self.max_n, self.min_count, self.min_pmi = int(max_n), int(min_count), float(min_pmi)
        self.max_ngrams = None if max_ngrams is None else int(max_ngrams)
        self.collocations = None

    def prepare(self, data, tokenizer) -> None:
        from bertexp.data.collocations import build_collocations

        self.collocations = build_collocations(data, tokenizer, max_n=self.max_n, min_count=self.min_count,
                                               min_pmi=self.min_pmi, max_ngrams=self.max_ngrams)
        data.token_flags["unit_start"] = self.collocations.unit_start

    def select(self, batch, generator, ratio):
        if "unit_start" not in batch:
            raise ConfigError("masking=pmi: batches carry no collocation units; call masker.prepare(data, tokenizer) "
                              "after data.prepare")
        return select_units(batch["unit_start"], batch["special_tokens_mask"], ratio, generator, cut_last=False)

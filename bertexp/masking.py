"""MLM masking strategies: one interface, one class per way of choosing positions.

Every strategy answers only *which* positions are selected (`select`); the shared `__call__` then applies
the replacement split to the selected positions in a few whole-batch tensor operations, as transformers'
`DataCollatorForLanguageModeling` does: `mask_token_prob` of them become [MASK], `random_token_prob` a random
non-special token, the rest stay as they are. The names say what they are (no bare "0.5" of the remaining
20%). Padding and special tokens are never selected. All randomness comes from the generator passed in, so
the same (batch, generator state) always gives the same mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bertexp.errors import ConfigError

IGNORE_INDEX = -100


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


class Masker:
    """Base class. Subclasses implement `select`; this class validates and applies the replacement split."""

    name = "base"
    # Decide [MASK] / random / keep once per span instead of per token (SpanBERT); adjacent spans count as one.
    replace_per_span = False

    def __init__(self, ratio: float = 0.15, mask_token_prob: float = 0.8, random_token_prob: float = 0.1):
        if not 0.0 < float(ratio) < 1.0:
            raise ConfigError(f"masking.ratio={ratio} must be in (0, 1) (exclusive)")
        for field, v in (("mask_token_prob", mask_token_prob), ("random_token_prob", random_token_prob)):
            if not 0.0 <= float(v) <= 1.0:
                raise ConfigError(f"masking.{field}={v} must be in [0, 1]")
        if mask_token_prob + random_token_prob > 1.0 + 1e-9:
            raise ConfigError(
                f"masking.mask_token_prob + masking.random_token_prob = {mask_token_prob + random_token_prob:g} "
                "must be <= 1 (the rest of the selected tokens are left unchanged)"
            )
        self.ratio = float(ratio)
        self.mask_token_prob = float(mask_token_prob)
        self.random_token_prob = float(random_token_prob)
        self.vocab: Vocab | None = None

    def bind(self, vocab: Vocab) -> "Masker":
        self.vocab = vocab
        self._replacements = vocab.replacement_ids()
        return self

    def select(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, batch: dict[str, torch.Tensor], generator: torch.Generator):
        """Return (masked input ids, labels with -100 where not selected, selection mask)."""
        assert self.vocab is not None, "Masker.bind(vocab) must be called first"
        ids = batch["input_ids"]
        selected = self.select(batch, generator) & ~batch["special_tokens_mask"]
        labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
        u = torch.rand(ids.shape, generator=generator)
        if self.replace_per_span:  # one draw per run of selected positions: its first position's
            first = selected.clone()
            first[:, 1:] &= ~selected[:, :-1]
            u = u.gather(1, _word_index(first))
        to_mask = selected & (u < self.mask_token_prob)
        to_random = selected & (u >= self.mask_token_prob) & (u < self.mask_token_prob + self.random_token_prob)
        pick = torch.randint(len(self._replacements), ids.shape, generator=generator)
        masked = torch.where(to_mask, torch.full_like(ids, self.vocab.mask_id), ids)
        masked = torch.where(to_random, self._replacements[pick], masked)
        return masked, labels, selected


class TokenMasking(Masker):
    """BERT: each non-special token is selected independently with probability `ratio`."""

    name = "token"

    def select(self, batch, generator):
        return torch.rand(batch["input_ids"].shape, generator=generator) < self.ratio


def _word_index(word_start: torch.Tensor) -> torch.Tensor:
    """For every position, the position of the first token of its word."""
    pos = torch.arange(word_start.shape[1]).expand_as(word_start)
    return torch.cummax(torch.where(word_start, pos, torch.zeros_like(pos)), dim=1).values


class WholeWordMasking(Masker):
    """Chinese-BERT-wwm: each word is selected with probability `ratio` and then all of its characters are.
    The expected share of selected tokens is `ratio`, as for token masking."""

    name = "whole_word"

    def select(self, batch, generator):
        ws = batch["word_start"]
        pick = (torch.rand(ws.shape, generator=generator) < self.ratio) & ws
        return pick.gather(1, _word_index(ws))


class _SpanMasking(Masker):
    """Shared engine of span-style strategies: repeatedly draw a length in words, start it at a random
    word start not yet selected, until the row's token budget (`ratio` of its non-special tokens, rounded
    stochastically so its expectation is exact) is used up; the last span is cut to fit the budget.

    A row is a short Python loop over its few spans (about ratio * length / mean span length of them).
    """

    def sample_lengths(self, rng: np.random.Generator, n: int) -> np.ndarray:
        raise NotImplementedError

    def select(self, batch, generator):
        ws_t, special_t = batch["word_start"], batch["special_tokens_mask"]
        rows, width = ws_t.shape
        rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
        ws, special = ws_t.numpy(), special_t.numpy()
        selected = np.zeros((rows, width), dtype=bool)
        n_tokens = (~special).sum(1)
        budgets = np.floor(self.ratio * n_tokens + rng.random(rows)).astype(np.int64)
        for r in range(rows):
            budget = budgets[r]
            if budget <= 0:
                continue
            starts = np.flatnonzero(ws[r] & ~special[r])
            # Word r's tokens run from starts[i] to the next word start (or the next special token).
            bounds = np.append(starts, width)
            ends = np.minimum(bounds[1:], _next_special(special[r], starts))
            order = rng.permutation(len(starts))
            lengths = self.sample_lengths(rng, len(order))
            row = selected[r]
            for k, w in enumerate(order):
                if budget <= 0:
                    break
                if row[starts[w]]:
                    continue
                last = w
                end = ends[w]
                for j in range(w + 1, min(w + int(lengths[k]), len(starts))):
                    if starts[j] != end:  # a special token ([SEP]) ends the span
                        break
                    last = j
                    end = ends[j]
                span = np.arange(starts[w], ends[last])
                span = span[~row[span]][:budget]
                row[span] = True
                budget -= len(span)
        return torch.from_numpy(selected)


def _next_special(special_row: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """For each start, the position of the first special token after it."""
    sp = np.flatnonzero(special_row)
    idx = np.searchsorted(sp, starts, side="right")
    return np.where(idx < len(sp), sp[np.minimum(idx, len(sp) - 1)], len(special_row))


class SpanMasking(_SpanMasking):
    """SpanBERT: span lengths (in words) ~ Geometric(p), clipped at `max_span`; spans start at word starts.

    As in SpanBERT, the [MASK] / random / keep choice is made once per span (a random replacement still
    draws a token per position), and the last span is cut where the row's budget runs out, mid-word if need
    be (SpanBERT stops adding tokens the moment its budget is met)."""

    name = "span"
    replace_per_span = True

    def __init__(self, ratio=0.15, mask_token_prob=0.8, random_token_prob=0.1, p: float = 0.2, max_span: int = 10):
        super().__init__(ratio, mask_token_prob, random_token_prob)
        if not 0.0 < p <= 1.0:
            raise ConfigError(f"masking.p={p} must be in (0, 1]")
        if max_span < 1:
            raise ConfigError(f"masking.max_span={max_span} must be >= 1")
        self.p, self.max_span = float(p), int(max_span)

    def sample_lengths(self, rng, n):
        return np.minimum(rng.geometric(self.p, n), self.max_span)

    def expected_length(self) -> float:
        """Mean of the clipped geometric distribution: sum over l < max of l*p(1-p)^(l-1) + max*(1-p)^(max-1)."""
        q = 1.0 - self.p
        return (1.0 - q**self.max_span) / self.p


class NgramMasking(_SpanMasking):
    """MacBERT/ERNIE: n-grams of n = 1..len(ngram_probs) words, n drawn with `ngram_probs`."""

    name = "ngram"

    def __init__(self, ratio=0.15, mask_token_prob=0.8, random_token_prob=0.1, ngram_probs=(0.4, 0.3, 0.2, 0.1)):
        super().__init__(ratio, mask_token_prob, random_token_prob)
        probs = np.asarray(list(ngram_probs), dtype=float)
        if probs.ndim != 1 or len(probs) == 0 or (probs < 0).any() or abs(probs.sum() - 1.0) > 1e-6:
            raise ConfigError(f"masking.ngram_probs={list(ngram_probs)} must be non-negative and sum to 1")
        self.ngram_probs = probs

    def sample_lengths(self, rng, n):
        return rng.choice(np.arange(1, len(self.ngram_probs) + 1), size=n, p=self.ngram_probs)

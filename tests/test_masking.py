"""Statistical tests of every masking strategy on real People's Daily batches (>= 100k maskable tokens)."""
import numpy as np
import pytest
import torch

from bertexp.data.dataset import Position
from bertexp.errors import ConfigError
from bertexp.masking import NgramMasking, SpanMasking, TokenMasking, Vocab, WholeWordMasking

STRATEGIES = [TokenMasking, WholeWordMasking, SpanMasking, NgramMasking]


@pytest.fixture(scope="module")
def batches(pd_data):
    data, tok = pd_data
    out, n = [], 0
    for batch, _ in data.train_batches(Position()):
        out.append(batch)
        n += int((~batch["special_tokens_mask"]).sum())
        if n >= 110_000:
            return out, Vocab.from_tokenizer(tok)


def _run(masker, batches, seed=0):
    g = torch.Generator().manual_seed(seed)
    stats = {"selected": 0, "maskable": 0, "mask": 0, "random": 0, "same": 0, "special_hit": 0, "random_special": 0,
             "unit_sq": 0}
    for b in batches:
        ids, labels, sel, _ = masker(b, g)
        # the replacement is drawn per unit: a token, or a run of selected positions for per-span strategies
        if masker.replace_per_span:
            edges = np.diff(np.pad(sel.numpy().astype(np.int8), ((0, 0), (1, 1))), axis=1)
            runs = np.flatnonzero(edges.ravel() == -1) - np.flatnonzero(edges.ravel() == 1)
            stats["unit_sq"] += int((runs**2).sum())
        else:
            stats["unit_sq"] += int(sel.sum())
        special = b["special_tokens_mask"]
        stats["selected"] += int(sel.sum())
        stats["maskable"] += int((~special).sum())
        stats["special_hit"] += int((sel & special).sum() + (labels[special] != -100).sum())
        orig = b["input_ids"]
        is_mask = sel & (ids == masker.vocab.mask_id)
        is_same = sel & (ids == orig)
        stats["mask"] += int(is_mask.sum())
        stats["same"] += int(is_same.sum())
        rnd = sel & ~is_mask & ~is_same
        stats["random"] += int(rnd.sum())
        stats["random_special"] += int(torch.isin(ids[rnd], torch.tensor(masker.vocab.special_ids)).sum())
        assert torch.equal(ids[~sel], orig[~sel])  # nothing outside the selection changes
        assert torch.equal(labels[sel], orig[sel])
    return stats


@pytest.mark.parametrize("cls", STRATEGIES, ids=lambda c: c.name)
@pytest.mark.parametrize("ratio", [0.15, 0.4])
def test_ratio_split_and_specials(cls, ratio, batches):
    data, vocab = batches
    s = _run(cls(ratio=ratio).bind(vocab), data)
    assert s["maskable"] >= 100_000
    realized = s["selected"] / s["maskable"]
    assert abs(realized - ratio) < 0.01, f"{cls.name}: realised ratio {realized:.4f} vs {ratio}"
    n = s["selected"]
    # 80/10/10 among the selected; bounds of 5 standard errors of a share drawn per unit (token, or span:
    # variance p(1-p) * sum(len^2) / n^2). A random draw can equal the original token (p ~ 1/vocab), which
    # moves a tiny share from "random" to "same".
    for key, p in (("mask", 0.8), ("random", 0.1), ("same", 0.1)):
        se = np.sqrt(p * (1 - p) * s["unit_sq"]) / n
        assert abs(s[key] / n - p) < 5 * se + 0.002, f"{key}: {s[key] / n:.4f} vs {p}"
    assert s["special_hit"] == 0, "a special or padding token was selected"
    assert s["random_special"] == 0, "a random replacement drew a special token"


def test_configured_split_is_followed(batches):
    data, vocab = batches
    s = _run(TokenMasking(0.3, mask_token_prob=0.5, random_token_prob=0.5).bind(vocab), data)
    assert abs(s["mask"] / s["selected"] - 0.5) < 0.01 and s["same"] / s["selected"] < 0.005


@pytest.mark.parametrize("cls", [WholeWordMasking, NgramMasking], ids=lambda c: c.name)
def test_whole_word_never_splits_a_gold_word(batches, cls):
    """Chinese-BERT-wwm and MacBERT mask whole words (MacBERT's n-gram that crosses the budget is kept whole
    or dropped, never cut)."""
    data, vocab = batches
    m = cls(0.3).bind(vocab)
    g = torch.Generator().manual_seed(3)
    words_checked = 0
    for b in data[:10]:
        sel = m(b, g).selected
        ws = b["word_start"]
        for r in range(len(sel)):
            starts = ws[r].nonzero().squeeze(1).tolist() + [ws.shape[1]]
            for a, z in zip(starts[:-1], starts[1:]):
                vals = sel[r, a:z]
                assert bool(vals.all()) or not bool(vals.any()), f"word at {a}:{z} partly selected"
                words_checked += 1
    assert words_checked > 5000


def test_gold_words_are_multi_character(batches):
    data, _ = batches
    ws = torch.cat([b["word_start"][~b["special_tokens_mask"]] for b in data[:5]])
    assert 0.5 < ws.float().mean() < 0.8  # People's Daily averages ~1.6 characters per word


def test_span_lengths_follow_spanbert_truncated_geometric():
    """SpanBERT's Geometric(0.2) restricted to 1..10 and renormalised: mean 3.8, P(10) = 0.030 (clipping
    would give mean 4.46 and P(10) = 0.134)."""
    m = SpanMasking(0.15, p=0.2, max_span=10)
    lengths = m.sample_lengths(torch.Generator().manual_seed(0), (200_000,)).numpy()
    assert lengths.min() == 1 and lengths.max() == 10
    z = 1 - 0.8**10
    probs = np.array([0.2 * 0.8 ** (l - 1) / z for l in range(1, 11)])
    shares = np.bincount(lengths, minlength=11)[1:] / len(lengths)
    assert np.allclose(shares, probs, atol=0.004)
    assert m.expected_length() == pytest.approx((probs * np.arange(1, 11)).sum()) == pytest.approx(3.797, abs=1e-3)
    assert abs(lengths.mean() - m.expected_length()) < 0.02


def test_span_tiles_restart_at_every_segment(pd_data):
    """Spans tile each segment separately, so short rows do not chop them: the chosen spans' lengths in words
    (those not cut by a segment's end or the budget) follow the sampler."""
    from bertexp.masking import _tile_starts

    data, tok = pd_data
    m = SpanMasking(0.15, p=0.2, max_span=10)
    g = torch.Generator().manual_seed(2)
    lengths = []
    for (batch, _), _ in zip(data.train_batches(Position(), batch_size=256), range(4)):
        ws, special = batch["word_start"], batch["special_tokens_mask"]
        starts = _tile_starts(ws, special, m.sample_lengths, m.expected_length(), g)
        for r in range(len(ws)):
            words = (ws[r] & ~special[r]).nonzero().squeeze(1).tolist()
            tile_words = [i for i, p in enumerate(words) if starts[r, p]]
            seg_starts = {i for i, p in enumerate(words) if p == 0 or special[r, p - 1]}
            assert seg_starts <= set(tile_words)  # every segment starts a tile
            bounds = sorted(set(tile_words) | {len(words)} | seg_starts)
            for a, b in zip(bounds, bounds[1:]):
                if b not in seg_starts and b != len(words):  # a whole tile, not cut by its segment's end
                    lengths.append(b - a)
    lengths = np.asarray(lengths)
    assert len(lengths) > 5000
    # tiles cut by a segment end are left out, which under-represents long ones a little; no pile-up at 10
    assert 3.0 < lengths.mean() < m.expected_length() + 0.1 and (lengths == 10).mean() < 0.04


def test_span_spans_start_at_word_starts(batches):
    data, vocab = batches
    m = SpanMasking(0.3).bind(vocab)
    g = torch.Generator().manual_seed(5)
    for b in data[:5]:
        sel = m(b, g).selected
        starts = sel & ~torch.cat([torch.zeros_like(sel[:, :1]), sel[:, :-1]], 1)
        assert bool(b["word_start"][starts].all())


def test_span_replacement_is_decided_once_per_span(batches):
    """SpanBERT: a span is all [MASK], all random, or all kept. Two chosen spans can touch, so inside a run of
    selected tokens the [MASK] status may change only where a span starts (at a word start); token masking
    changes it anywhere."""
    data, vocab = batches
    for cls, per_span in ((SpanMasking, True), (TokenMasking, False)):
        m = cls(0.4, mask_token_prob=0.5, random_token_prob=0.25).bind(vocab)
        g = torch.Generator().manual_seed(11)
        changes = mid_word = 0
        for b in data[:5]:
            ids, _, sel, _ = m(b, g)
            is_mask = (ids == vocab.mask_id)
            ws = b["word_start"]
            change = sel[:, 1:] & sel[:, :-1] & (is_mask[:, 1:] != is_mask[:, :-1])
            changes += int(change.sum())
            mid_word += int((change & ~ws[:, 1:]).sum())
        assert changes > 100
        assert (mid_word == 0) if per_span else (mid_word > 0.3 * changes), (cls.name, mid_word, changes)


def test_ngram_lengths_follow_probs():
    m = NgramMasking(0.15)
    lengths = m.sample_lengths(torch.Generator().manual_seed(0), (100_000,)).numpy()
    shares = np.bincount(lengths, minlength=5)[1:] / len(lengths)
    assert np.allclose(shares, [0.4, 0.3, 0.2, 0.1], atol=0.01)


def test_same_generator_state_same_mask(batches):
    data, vocab = batches
    for cls in STRATEGIES:
        m = cls(0.2).bind(vocab)
        a = m(data[0], torch.Generator().manual_seed(9))
        b = m(data[0], torch.Generator().manual_seed(9))
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kwargs", [{"ratio": 0.0}, {"ratio": 1.0}, {"ratio": 1.5}, {"mask_token_prob": 0.8, "random_token_prob": 0.3}])
def test_invalid_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError, match="masking"):
        TokenMasking(**kwargs)

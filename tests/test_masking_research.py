"""Masking as a research instrument: ratio schedules, corruption vs prediction, PMI collocations.

Statistics are taken over >= 100k non-special tokens of real People's Daily batches at each point checked."""
import math
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
import torch

from bertexp.data.dataset import Position
from bertexp.errors import ConfigError
from bertexp.masking import (SCHEDULES, NgramMasking, PmiMasking, RatioSchedule, SpanMasking, TokenMasking, Vocab,
                             WholeWordMasking)
from bertexp.tracking import read_metrics
from conftest import run_in_process

ALL = [TokenMasking, WholeWordMasking, SpanMasking, NgramMasking, PmiMasking]


@pytest.fixture(scope="module")
def pmi_data(pd_data):
    """People's Daily batches (>= 110k maskable tokens) that carry PMI units, and the PMI masker's table."""
    data, tok = pd_data
    vocab = Vocab.from_tokenizer(tok)
    pmi = PmiMasking(0.15).bind(vocab)
    pmi.prepare(data, tok)
    out, n = [], 0
    try:
        for batch, _ in data.train_batches(Position()):
            out.append(batch)
            n += int((~batch["special_tokens_mask"]).sum())
            if n >= 110_000:
                break
    finally:
        data.token_flags.pop("unit_start", None)  # other tests' batches stay as they were
    return out, vocab, pmi, data, tok


def _shares(masker, batches, progress, seed=0):
    g = torch.Generator().manual_seed(seed)
    tot = Counter()
    for b in batches:
        m = masker(b, g, progress)
        maskable = ~b["special_tokens_mask"]
        predicted = m.labels != -100
        tot["maskable"] += int(maskable.sum())
        tot["selected"] += int(m.selected.sum())
        tot["corrupted"] += int(m.corrupted.sum())
        tot["predicted"] += int(predicted.sum())
        tot["predicted_not_selected"] += int((predicted & ~m.selected).sum())
        tot["selected_not_predicted"] += int((m.selected & ~predicted).sum())
        assert not bool((m.corrupted & ~m.selected).any()), "a position outside the selection was corrupted"
        assert not bool((predicted & ~maskable).any()), "a special or padding token is predicted"
        assert torch.equal(m.labels[predicted], b["input_ids"][predicted])  # labels are the original tokens
        assert torch.equal(m.input_ids[~m.corrupted], b["input_ids"][~m.corrupted])
    return {k: v / tot["maskable"] for k, v in tot.items() if k != "maskable"} | {"maskable": tot["maskable"]}


def test_schedules_are_functions_of_progress():
    lin = RatioSchedule("linear", 0.3, 0.15)
    cos = RatioSchedule("cosine", 0.3, 0.15)
    step = RatioSchedule("step", 0.3, 0.15, step_at=0.25)
    assert [lin(f) for f in (0, 0.5, 1)] == pytest.approx([0.3, 0.225, 0.15])
    assert [cos(f) for f in (0, 0.5, 1)] == pytest.approx([0.3, 0.225, 0.15])
    assert cos(0.1) > lin(0.1) and cos(0.9) < lin(0.9)  # slow at both ends
    assert [step(f) for f in (0, 0.249, 0.25, 1)] == [0.3, 0.3, 0.15, 0.15]
    assert RatioSchedule("constant", 0.2, 0.2)(0.7) == 0.2
    assert lin(-1) == 0.3 and lin(2) == 0.15  # clipped to the run


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
def test_realised_ratio_follows_every_schedule(cls, pmi_data):
    """Every strategy, every schedule, five points of the run: the share selected is within 0.01 of the
    scheduled ratio over >= 100k tokens."""
    batches, vocab, pmi, *_ = pmi_data
    for kind in SCHEDULES[1:]:
        m = cls(0.3, schedule=kind, final_ratio=0.15, step_at=0.5).bind(vocab)
        for f in (0.0, 0.3, 0.5, 0.8, 1.0):
            s = _shares(m, batches, f, seed=int(f * 10))
            assert s["maskable"] >= 100_000
            assert abs(s["selected"] - m.schedule(f)) < 0.01, (cls.name, kind, f, s["selected"], m.schedule(f))


@pytest.mark.parametrize("cls", [TokenMasking, SpanMasking, PmiMasking], ids=lambda c: c.name)
@pytest.mark.parametrize("ratio,prediction", [(0.4, 0.2), (0.3, 0.5), (0.15, None)])
def test_corrupted_and_predicted_shares_match_settings(cls, ratio, prediction, pmi_data):
    batches, vocab, *_ = pmi_data
    m = cls(ratio, prediction_ratio=prediction).bind(vocab)
    s = _shares(m, batches, 0.0)
    assert abs(s["selected"] - ratio) < 0.01
    # corrupted: the [MASK] and random shares of the selected (80% + 10%); drawn per span for span masking
    assert abs(s["corrupted"] - 0.9 * ratio) < 0.01
    if prediction is None:  # BERT: exactly the selected positions are predicted
        assert s["predicted_not_selected"] == 0 and s["selected_not_predicted"] == 0
    elif prediction < ratio:  # a subset of the selected
        assert abs(s["predicted"] - prediction) < 0.01 and s["predicted_not_selected"] == 0
        assert s["selected_not_predicted"] > 0.1
    else:  # the selected and unchanged tokens besides
        assert abs(s["predicted"] - prediction) < 0.01 and s["selected_not_predicted"] == 0
        assert abs(s["predicted_not_selected"] - (prediction - ratio)) < 0.01


def test_schedule_settings_are_checked():
    with pytest.raises(ConfigError, match="masking.final_ratio"):
        TokenMasking(0.3, schedule="linear")
    with pytest.raises(ConfigError, match="masking.schedule"):
        TokenMasking(0.3, schedule="exponential", final_ratio=0.1)
    with pytest.raises(ConfigError, match="masking.final_ratio=0.2 is set but masking.schedule=constant"):
        TokenMasking(0.3, final_ratio=0.2)
    with pytest.raises(ConfigError, match="masking.final_ratio"):
        TokenMasking(0.3, schedule="linear", final_ratio=1.2)
    with pytest.raises(ConfigError, match="masking.prediction_ratio"):
        TokenMasking(0.3, prediction_ratio=0.0)
    with pytest.raises(ConfigError, match="lies between the schedule's ratios"):
        TokenMasking(0.4, schedule="linear", final_ratio=0.15, prediction_ratio=0.3)
    with pytest.raises(ConfigError, match="masking.step_at=0.3 only applies to masking.schedule=step"):
        TokenMasking(0.4, schedule="linear", final_ratio=0.15, step_at=0.3)
    TokenMasking(0.4, schedule="linear", final_ratio=0.15, prediction_ratio=0.1)  # a subset throughout: fine


def _units(row_start, row_special):
    """(first, end) token ranges of the units of one row (a special token ends a unit)."""
    out, a = [], None
    for i, (st, sp) in enumerate(zip(row_start.tolist(), row_special.tolist())):
        if sp or st:
            if a is not None:
                out.append((a, i))
            a = None if sp else i
    if a is not None:
        out.append((a, len(row_start)))
    return out


def test_pmi_never_splits_a_unit_and_units_are_listed_collocations(pmi_data):
    batches, vocab, pmi, data, tok = pmi_data
    table = pmi.collocations.table()
    meta = pmi.collocations.meta
    assert table and meta["size"] == len(table)
    assert all(r["pmi"] >= pmi.min_pmi and r["count"] >= pmi.min_count for r in table)
    assert [r["pmi"] for r in table] == sorted((r["pmi"] for r in table), reverse=True)
    listed = {r["text"].replace(" ", "") for r in table}
    m = PmiMasking(0.4).bind(vocab)
    g = torch.Generator().manual_seed(1)
    multiword = selected_multiword = 0
    for b in batches[:12]:
        sel = m(b, g).selected
        for r in range(len(sel)):
            ws = b["word_start"][r]
            for a, z in _units(b["unit_start"][r], b["special_tokens_mask"][r]):
                vals = sel[r, a:z]
                assert bool(vals.all()) or not bool(vals.any()), f"unit {a}:{z} partly selected"
                if int(ws[a:z].sum()) > 1:  # more than one word: it must be a listed collocation
                    multiword += 1
                    selected_multiword += bool(vals.all())
                    text = "".join(t.removeprefix("##") for t in tok.convert_ids_to_tokens(b["input_ids"][r, a:z].tolist()))
                    # a collocation cut by a segment's truncation is a prefix or suffix of a listed one
                    assert text in listed or any(text in x for x in listed), text
    assert multiword > 500 and selected_multiword > 100


def test_pmi_scores_match_a_recount_by_hand(pmi_data):
    """PMI_n recomputed from plain Python counts of word tuples in the training documents (n <= 3) for the
    top entries and a random sample: the listed values are the paper's measure, not an approximation."""
    _, _, pmi, data, tok = pmi_data
    t = data.tokens
    ids, ws, so = np.asarray(t.ids), np.asarray(t.word_start), np.asarray(t.sent_offsets)
    vocab_tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    counts = {n: Counter() for n in (1, 2, 3)}
    totals = Counter()
    for a, b in data._train_sents:
        for s in range(a, b):
            lo, hi = so[s], so[s + 1]
            starts = np.flatnonzero(ws[lo:hi]) + lo
            ends = np.append(starts[1:], hi)
            words = ["".join(vocab_tokens[x].removeprefix("##") for x in ids[p:q]) for p, q in zip(starts, ends)]
            for n in (1, 2, 3):
                grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
                counts[n].update(grams)
                totals[n] += len(grams)

    def logp(g):
        return math.log(counts[len(g)][g] / totals[len(g)])

    def pmi_n(g):
        n = len(g)
        splits = [[g[a:b] for a, b in zip((0, *c), (*c, n))] for k in range(1, n) for c in combinations(range(1, n), k)]
        return logp(g) - max(sum(logp(p) for p in parts) for parts in splits)

    table = [r for r in pmi.collocations.table() if r["n"] <= 3]
    rng = np.random.default_rng(0)
    sample = table[:20] + [table[i] for i in rng.choice(len(table), 40, replace=False)]
    for r in sample:
        g = tuple(r["text"].split(" "))
        assert counts[len(g)][g] == r["count"], r
        assert pmi_n(g) == pytest.approx(r["pmi"], abs=1e-3), r


def test_pmi_threshold_and_cap_are_followed(pd_data):
    data, tok = pd_data
    try:
        m = PmiMasking(0.15, min_pmi=4.0, min_count=20, max_ngrams=500).bind(Vocab.from_tokenizer(tok))
        m.prepare(data, tok)
    finally:
        data.token_flags.pop("unit_start", None)
    table = m.collocations.table()
    assert 0 < len(table) <= 500
    per_n = Counter(r["n"] for r in table)  # the cap is shared: half bigrams, a quarter trigrams, ...
    assert per_n[2] <= 250 and per_n[3] <= 125 and per_n[4] <= 63 and per_n[5] <= 63 and per_n[2] > per_n[5]
    assert all(r["pmi"] >= 4.0 and r["count"] >= 20 for r in table)
    text = (m.collocations.folder / "collocations.tsv").read_text(encoding="utf-8")
    assert text.startswith("rank\tpmi\tcount\tn\tngram\n")  # readable by people and by pandas


# the masking statistics need tokens, not a model that learns: the smallest encoder makes the steps cheap
TINY_MODEL = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=1",
              "model.num_hidden_layers=1"]


def test_scheduled_run_logs_scheduled_and_realised_ratio(tmp_path):
    """A real run with a linear schedule: every logged window (>= 100k tokens) shows the schedule's value
    and the share really selected, within 0.01 of each other, falling from 0.3 towards 0.15."""
    final = run_in_process(tmp_path, ["masking=span", "masking.schedule=linear", "masking.ratio=0.3",
                                      "masking.final_ratio=0.15", "trainer.max_steps=60", "trainer.log_every=30",
                                      "trainer.eval_every=60", "trainer.save_every=60", "logger=none",
                                      "trainer.exam_pairs=64", *TINY_MODEL])
    assert final["final/step"] == 60
    recs = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "masking/ratio" in r]
    assert [r["step"] for r in recs] == [30, 60]
    expected = [np.mean([0.3 - 0.15 * s / 60 for s in range(a, a + 30)]) for a in (0, 30)]
    for r, e in zip(recs, expected):
        assert r["masking/ratio"] == pytest.approx(e, abs=0.002)  # token-weighted window mean of the schedule
        assert abs(r["masking/realized_ratio"] - r["masking/ratio"]) < 0.01
        assert r["masking/predicted_ratio"] == pytest.approx(r["masking/realized_ratio"])
    assert recs[0]["masking/ratio"] > recs[1]["masking/ratio"] + 0.05

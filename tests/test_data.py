"""Corpus sources, sentence splitting, tokenisation cache and the NSP pair builder on real data."""
import time

import numpy as np
import pytest

from bertexp.data.dataset import PretrainingData
from bertexp.data.pairs import A0, A1, B0, B1, LABEL, build_pairs
from bertexp.data.sources import PeoplesDaily
from bertexp.data.tokenized import split_sentences
from bertexp.errors import DataError
from conftest import ESSAY


def test_peoples_daily_parses_gold_words():
    corpus = PeoplesDaily().load()
    assert 1_700_000 < corpus.num_chars < 2_000_000
    assert len(corpus.documents) > 1000
    para = corpus.documents[0][0]
    assert para.text.startswith("迈向充满希望的新世纪")
    # gold words: 迈向 / 充满 / 希望 / 的
    assert para.word_starts[:5] == [0, 2, 4, 6, 7]


def test_sentence_split_keeps_closing_quotes():
    text = "他说：“好。”我们走吧！真的？没有标点的结尾"
    spans = [text[a:b] for a, b in split_sentences(text)]
    assert spans == ["他说：“好。”", "我们走吧！", "真的？", "没有标点的结尾"]


def test_essay_documents_and_tokens_cached(tmp_path):
    tok_data = PretrainingData.from_text_file(str(ESSAY), cache_dir=str(tmp_path))
    corpus = tok_data.corpus()
    assert len(corpus.documents) == 6  # blank-line separated paragraphs
    from bertexp.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_data.vocab_dir(500))
    tok_data.prepare(tok, seed=0)
    first = sorted(p.name for p in tmp_path.iterdir())
    # a second data object reuses both cache entries
    again = PretrainingData.from_text_file(str(ESSAY), cache_dir=str(tmp_path))
    again.prepare(load_tokenizer(again.vocab_dir(500)), seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == first
    assert np.array_equal(np.asarray(again.tokens.ids), np.asarray(tok_data.tokens.ids))


def _segments(lengths_per_doc):
    starts, ends, offs, pos = [], [], [0], 0
    for doc in lengths_per_doc:
        for n in doc:
            starts.append(pos)
            ends.append(pos + n)
            pos += n
        offs.append(len(starts))
    return np.array(starts), np.array(ends), np.array(offs)


def test_nsp_pairs_balanced_and_labels_correct(pd_data):
    data, _ = pd_data
    ex = data.epoch_examples(0)
    n = len(ex)
    assert n > 10_000
    share = ex[:, LABEL].mean()
    # Half of the chunks of two or more segments get a random B, and every one-segment chunk does (Google's
    # recipe); about one chunk in ten has one segment, so the share lies above 0.5 (by up to 5 standard
    # errors below) and well under 0.6.
    assert 0.5 - 5 * np.sqrt(0.25 / n) < share < 0.6
    starts, ends, offs = data.train_segs
    doc_of_token = np.zeros(int(ends.max()) + 1, dtype=np.int64)
    for d in range(len(offs) - 1):
        doc_of_token[starts[offs[d]] : ends[offs[d + 1] - 1]] = d
    lengths = ex[:, A1] - ex[:, A0] + ex[:, B1] - ex[:, B0] + 3
    assert lengths.max() <= data.max_length and (ex[:, A1] > ex[:, A0]).all() and (ex[:, B1] > ex[:, B0]).all()
    is_next = ex[:, LABEL] == 0
    # label 0: B is the true continuation of A within the same document (truncation only trims the ends)
    assert (doc_of_token[ex[is_next, A0]] == doc_of_token[ex[is_next, B0]]).all()
    assert (ex[is_next, B0] >= ex[is_next, A1]).all()
    # label 1: B comes from another document
    assert (doc_of_token[ex[~is_next, A0]] != doc_of_token[ex[~is_next, B0]]).all()
    # packed: the original recipe fills most pairs close to max_length
    assert lengths.mean() > 0.85 * data.max_length


def test_document_final_sentences_are_not_lost(pd_data):
    """A one-segment chunk (typically a document's last sentence) becomes a random-next pair, as in Google's
    create_instances_from_document; it used to be dropped, losing half of the documents' last sentences."""
    data, _ = pd_data
    ex = data.epoch_examples(0)
    starts, ends, offs = data.train_segs
    covered = np.zeros(int(ends.max()) + 1, dtype=bool)
    for a0, a1, b0, b1, label in ex:
        covered[a0:a1] = True
        if label == 0:  # a random B is another document's text, not this one's
            covered[b0:b1] = True
    last = offs[1:] - 1
    share = np.mean([covered[starts[s] : ends[s]].any() for s in last])
    assert share > 0.99, share


def test_three_sentence_corpus_terminates_deterministically():
    s, e, o = _segments([[5, 6, 7]])
    a = build_pairs(s, e, o, 25, np.random.default_rng(1))
    b = build_pairs(s, e, o, 25, np.random.default_rng(1))
    assert np.array_equal(a, b) and len(a) >= 1
    for row in a:
        if row[LABEL] == 1:  # one document: the random B is never the true continuation
            assert row[B0] != row[A1]


def test_one_sentence_corpus_is_a_clear_error():
    s, e, o = _segments([[9]])
    with pytest.raises(DataError, match="too small for NSP"):
        build_pairs(s, e, o, 25, np.random.default_rng(0))


def test_long_line_without_punctuation_is_chunked(tmp_path):
    f = tmp_path / "long.txt"
    f.write_text("我们" * 3000, encoding="utf-8")
    data = PretrainingData.from_text_file(str(f), max_length=32, segmenter="char", cache_dir=str(tmp_path / "c"))
    from bertexp.data.tokenizer import load_tokenizer

    data.prepare(load_tokenizer(data.vocab_dir(100)), seed=0)
    ex = data.epoch_examples(0)
    assert len(ex) > 100  # many pairs from one line, not one truncated pair
    used = (ex[:, A1] - ex[:, A0] + ex[:, B1] - ex[:, B0]).sum()
    assert used > 0.5 * 6000 * 0.5


def test_dynamic_padding_to_multiple_of_8(pd_data):
    data, tok = pd_data
    batch = data.collate(data.epoch_examples(0)[:4])
    width = batch["input_ids"].shape[1]
    lengths = batch["attention_mask"].sum(1)
    assert width % 8 == 0 and width - int(lengths.max()) < 8
    row = batch["input_ids"][0]
    assert row[0] == tok.cls_token_id and (row == tok.sep_token_id).sum() == 2
    # segment ids: 0 for [CLS] A [SEP], 1 for B [SEP], 0 (a valid type) for padding
    types = batch["token_type_ids"][0]
    first_sep = int((row == tok.sep_token_id).nonzero()[0])
    assert types[: first_sep + 1].sum() == 0 and types[first_sep + 1 : int(lengths[0])].eq(1).all()
    assert set(batch["token_type_ids"].unique().tolist()) <= {0, 1}


def test_gbk_text_reads_with_encoding(tmp_path):
    f = tmp_path / "gbk.txt"
    f.write_bytes(ESSAY.read_text(encoding="utf-8").encode("gb18030"))
    corpus = PretrainingData.from_text_file(str(f), encoding="gb18030", cache_dir=str(tmp_path / "c")).corpus()
    assert corpus.documents[0][0].text.startswith("我的家乡在江南")
    with pytest.raises(DataError, match="data.encoding=gb18030"):
        PretrainingData.from_text_file(str(f), cache_dir=str(tmp_path / "c")).source.fingerprint()


def test_one_document_random_b_never_overlaps_a_or_its_continuation():
    s, e, o = _segments([[10, 10, 10, 10]])
    for seed in range(100):
        ex = build_pairs(s, e, o, 13, np.random.default_rng(seed))
        for a0, a1, b0, b1, label in ex:
            if label == 1:
                assert b1 <= a0 or b0 > a1, (seed, a0, a1, b0, b1)  # not A, and not the segment right after it


def test_segments_tile_the_chosen_sentences_in_near_equal_pieces(pd_data):
    """Long sentences are cut into pieces that fit half a pair; the pieces of the documents asked for cover
    their sentences exactly, in order, and no piece is longer than its share by more than one token."""
    data, _ = pd_data
    so = np.asarray(data.tokens.sent_offsets)
    length = 32  # max piece (32 - 3) // 2 = 14 tokens: many People's Daily sentences are longer
    for ranges in (data._val_sents, data._train_sents[:500]):
        starts, ends, offs = data._segments(ranges, length)
        assert len(offs) == len(ranges) + 1 and (np.diff(offs) >= 0).all()
        assert (ends - starts).max() <= 14 and (ends > starts).all()
        cut = 0
        for d, (a, b) in enumerate(ranges):
            s, e = starts[offs[d] : offs[d + 1]], ends[offs[d] : offs[d + 1]]
            # contiguous pieces from the document's first token to its last, each sentence boundary a piece's
            assert s[0] == so[a] and e[-1] == so[b] and (s[1:] == e[:-1]).all()
            assert set(so[a:b]) <= set(s)
            cut += len(s) - (b - a)
        assert cut > 0  # the length really cut sentences: the check above saw pieces


def test_first_epoch_pairs_come_from_the_cache_and_equal_a_fresh_build(tmp_path, monkeypatch):
    """Epoch 0's pairs are written beside the tokens and memory-mapped by the next run (the warm start of a
    corpus of gigabytes); what is read equals what is built, and an unreadable file is rebuilt."""
    from bertexp.data.tokenizer import load_tokenizer

    def prepared(seed=0, **kw):
        data = PretrainingData.from_text_file(str(ESSAY), cache_dir=str(tmp_path), max_length=32, batch_size=4, **kw)
        data.prepare(load_tokenizer(data.vocab_dir(500)), seed=seed)
        return data

    first = prepared()
    built = np.array(first.epoch_examples(0))
    assert np.array_equal(built, first._pairs_of(0))
    (cached,) = tmp_path.glob("pairs-*.npy")
    again = prepared()
    assert isinstance(again.epoch_examples(0), np.memmap) and np.array_equal(again.epoch_examples(0), built)
    assert again._train_segs is None  # nothing of the training documents was cut to start
    assert np.array_equal(again.epoch_examples(1), first.epoch_examples(1))  # later epochs: built as before

    other = prepared(seed=1)  # another seed: other pairs, in a file of its own
    assert len(list(tmp_path.glob("pairs-*.npy"))) == 2 and not np.array_equal(other.epoch_examples(0), built)

    # another split (other training text): other pairs, never the cached ones of text now held out
    split = prepared(val_fraction=0.5)
    assert len(list(tmp_path.glob("pairs-*.npy"))) == 3 and not np.array_equal(split.epoch_examples(0), built)

    # the split code changed (other documents held out under the very same settings): a miss, not pairs of
    # text that is now held out
    split_code = PretrainingData._split

    def changed_split(self):
        self.split_seed += 1
        split_code(self)

    with monkeypatch.context() as m:
        m.setattr(PretrainingData, "_split", changed_split)
        moved = prepared(val_fraction=0.5)
    assert not np.array_equal(moved._train_sents, split._train_sents)
    assert not isinstance(moved.epoch_examples(0), np.memmap) and len(list(tmp_path.glob("pairs-*.npy"))) == 4
    assert np.array_equal(moved.epoch_examples(0), moved._pairs_of(0))

    # the tokens rebuilt under the same folder name (a new build id in meta.json): their pairs are built anew
    meta = next(tmp_path.glob("tokens-*/meta.json"))
    meta.write_text(meta.read_text().replace('"build": "', '"build": "0'))
    rebuilt = prepared()
    assert not isinstance(rebuilt.epoch_examples(0), np.memmap) and len(list(tmp_path.glob("pairs-*.npy"))) == 5
    assert isinstance(prepared().epoch_examples(0), np.memmap)  # and cached under the new build
    meta.write_text(meta.read_text().replace('"build": "0', '"build": "'))

    whole = cached.read_bytes()
    header_at = whole.index(b"'shape'")
    for damaged in (whole[:100], b"", whole[:header_at] + b"\x00" + whole[header_at + 1 :]):
        cached.write_bytes(damaged)  # cut short, empty (a crash before the data reached the disk), a bad header
        mended = prepared()
        assert not isinstance(mended.epoch_examples(0), np.memmap) and np.array_equal(mended.epoch_examples(0), built)
        assert np.array_equal(np.load(cached), built)  # and written whole again


def test_a_cache_file_is_whole_or_absent(tmp_path):
    """A write that dies midway leaves the previous file and no temporary one; a finished write replaces it."""
    from bertexp.data.cache import write_atomically

    path = tmp_path / "pairs-x.npy"
    write_atomically(path, lambda f: f.write(b"old"))

    def dies(f):
        f.write(b"half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, dies)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["pairs-x.npy"]
    # one left by a writer killed outright (SIGKILL: no cleanup ran) is removed by the next writer
    import subprocess
    import sys

    from bertexp.data.cache import _HOST

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".pairs-x.npy.{_HOST}.{int(gone.stdout)}.tmp"
    orphan.write_bytes(b"half")
    write_atomically(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["pairs-x.npy"]

    # two writers of one process at once (threads): each writes a temporary file of its own, and the file ends
    # up whole, as one of them wrote it
    import threading

    def slow(byte):
        def write(f):
            for _ in range(20):
                f.write(byte * 50_000)
                time.sleep(0.005)
        return write

    writers = [threading.Thread(target=write_atomically, args=(path, slow(b))) for b in (b"a", b"b")]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert path.read_bytes() in (b"a" * 1_000_000, b"b" * 1_000_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs-x.npy"]


def test_the_same_corpus_gives_the_same_vocabulary_in_fresh_caches(tmp_path):
    """Two vocabulary builds from the same corpus and settings, in fresh caches, are identical files
    (tokenizers' trainer alone breaks ties by a per-process hash order: 5,733 entries one time, 5,734 the next)."""
    built = []
    for name in ("a", "b"):
        data = PretrainingData.from_peoples_daily(cache_dir=str(tmp_path / name))
        folder = data.vocab_dir(8000)
        assert folder.parent == tmp_path / name  # built, not found in a shared cache
        built.append({f.name: f.read_bytes() for f in sorted(folder.iterdir())})
    assert set(built[0]) >= {"vocab.txt", "tokenizer.json", "tokenizer_config.json"}
    assert built[0] == built[1]
    vocab = built[0]["vocab.txt"].decode().splitlines()
    assert len(vocab) == len(set(vocab)) > 5000 and vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _essay_data(cache, **kw):
    from bertexp.data.tokenizer import load_tokenizer

    data = PretrainingData.from_text_file(str(ESSAY), cache_dir=str(cache), max_length=32, batch_size=4, **kw)
    tok = load_tokenizer(data.vocab_dir(500))
    data.prepare(tok, seed=0)
    return data, tok


def test_cache_entries_are_readable_as_the_umask_allows(tmp_path, monkeypatch):
    """A cache shared by several users (BERTEXP_CACHE): every entry a run builds (vocabulary, tokens, PMI
    collocations folders; pairs and counting-baseline files) has the permissions open() and mkdir() give under
    the umask, not the private ones of a temporary folder or file."""
    import os
    import stat

    from bertexp.data import cache
    from bertexp.data.collocations import build_collocations
    from bertexp.train import prepare_exam
    from conftest import compose

    umask = 0o027  # not the usual 0o022: permissions that only follow the umask match it
    old = os.umask(umask)
    monkeypatch.setattr(cache, "_UMASK", umask)  # read once, at import
    try:
        data, tok = _essay_data(tmp_path)
        build_collocations(data, tok, min_count=2)
        prepare_exam(compose(["trainer=smoke", "trainer.exam_length=32"]), data, 8)
    finally:
        os.umask(old)
    entries = {p.name.split("-")[0]: p for p in tmp_path.iterdir()}
    assert set(entries) == {"vocab", "tokens", "pmi", "pairs", "baselines"}
    for path in tmp_path.rglob("*"):
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want, (path.relative_to(tmp_path), oct(path.stat().st_mode))


def test_collocations_and_baselines_follow_the_tokens_build(tmp_path):
    """The PMI collocations and the counting baselines' scores are keyed by the build of the token arrays (the
    id in their meta.json), as epoch 0's pairs are: tokens rebuilt under the same folder name get new ones."""
    from bertexp.data.collocations import build_collocations
    from bertexp.train import prepare_exam
    from conftest import compose

    cfg = compose(["trainer=smoke", "trainer.exam_length=32"])

    def derived():
        data, tok = _essay_data(tmp_path)
        build_collocations(data, tok, min_count=2)
        prepare_exam(cfg, data, 8)
        return len(list(tmp_path.glob("pmi-*"))), len(list(tmp_path.glob("baselines-*.json")))

    assert derived() == (1, 1)
    assert derived() == (1, 1)  # the same build: both found in the cache
    meta = next(tmp_path.glob("tokens-*/meta.json"))
    meta.write_text(meta.read_text().replace('"build": "', '"build": "0'))
    assert derived() == (2, 2)

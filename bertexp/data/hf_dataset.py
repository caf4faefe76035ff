"""A corpus from the `datasets` library (data=hf_dataset): a Hub dataset id, a builder over files (`json`,
`parquet`, `text`, `csv` with `data.data_files`), or a directory written by `save_to_disk`. One record is one
document, its `data.text_field` cut into paragraphs at line breaks and into sentences as JSON lines are.

It is a source like `TextFiles`: it hands out chunks of records (the text column only, read from the
memory-mapped Arrow table, or from a stream with `data.streaming=true`), so it feeds the same tokenise-once
cache and the same held-out split. The cache is keyed by the dataset's fingerprint (`Dataset._fingerprint`,
which `datasets` changes with the content and every transform), or for a stream by its builder's config id
(which hashes the data files) and the Hub commit, so a changed dataset is re-tokenised, never read stale.

Offline (`HF_HUB_OFFLINE=1`), a Hub dataset loads from the `datasets` cache by its name; when it is not there,
or the Hub cannot be reached, the run stops in one line, before any waiting on retries."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Iterator

from bertexp.data.sources import SEGMENTERS, Chunk, Corpus, _segmenter_version, corpus_of, user_path
from bertexp.errors import DataError

log = logging.getLogger(__name__)
RECORDS_PER_CHUNK = 2000  # a unit of work for a tokenising process: a few MB of typical documents
BUILDERS = ("json", "parquet", "text", "csv", "arrow")  # datasets' packaged builders over local files
HF_DATASET_VERSION = "1"  # part of the cache key: bumped when how records become documents changes


class HFDataset:
    name = "hf_dataset"

    def __init__(self, name=None, config_name: str | None = None, split: str = "train", text_field: str = "text",
                 data_files=None, revision: str | None = None, streaming: bool = False, segmenter: str = "rjieba"):
        if name is None or not str(name).strip() or str(name) == "???":
            raise DataError("data.name is not set: data=hf_dataset needs data.name=ID (a Hub dataset), a builder "
                            "(json, parquet, text with data.data_files=FILE) or a save_to_disk directory")
        if segmenter not in SEGMENTERS:
            raise DataError(f"data.segmenter: unknown segmenter {segmenter!r}, expected one of: {', '.join(SEGMENTERS)}")
        if not str(text_field).strip():
            raise DataError("data.text_field is empty: name the column that holds the text")
        self.dataset_name = str(name)
        self.config_name = config_name
        self.split = str(split)
        self.text_field = str(text_field)
        self.revision = revision
        self.streaming = bool(streaming)
        self.segmenter = segmenter
        files = data_files
        if files is not None and (isinstance(files, (list, tuple)) or type(files).__name__ == "ListConfig"):
            files = [str(user_path(f)) for f in files]
        elif files is not None and not hasattr(files, "keys"):
            files = str(user_path(files))
        elif files is not None:  # {split: file(s)}
            files = {str(k): [str(user_path(f)) for f in (v if not isinstance(v, str) else [v])] for k, v in files.items()}
        self.data_files = files
        local = user_path(self.dataset_name)
        self.disk_dir = local if local.is_dir() else None
        if self.dataset_name in BUILDERS and not data_files:
            raise DataError(f"data.data_files is not set: data.name={self.dataset_name} reads files, name them with "
                            "data.data_files=FILE (or a list, or a glob)")
        self._ds = None
        self._fingerprint: str | None = None

    @property
    def label(self) -> str:
        return f"{self.dataset_name}" + (f" ({self.config_name})" if self.config_name else "") + f" split {self.split}"

    # ---- loading ---------------------------------------------------------------------------------

    def dataset(self):
        if self._ds is None:
            self._ds = self._load()
            self._check_column()
        return self._ds

    def _load(self):
        import datasets

        datasets.disable_progress_bars()  # one bar (the tokeniser's), not one per shard
        if self.disk_dir is not None:
            return self._load_from_disk()
        self._check_reachable()
        kw = dict(split=self.split, revision=self.revision, streaming=self.streaming)
        if self.data_files is not None:
            kw["data_files"] = self.data_files
        try:
            return datasets.load_dataset(self.dataset_name, self.config_name, **kw)
        except (ValueError, KeyError) as e:  # an unknown split or config names the ones there are
            raise DataError(f"data: cannot load {self.label}: {_first_line(e)}") from None
        except FileNotFoundError as e:
            raise DataError(f"data.data_files: {_first_line(e)}" if self.data_files else self._not_found(e)) from None
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds (connection, gated, builder errors)
            if _offline() or type(e).__name__ in ("DatasetNotFoundError", "ConnectionError", "OfflineModeIsEnabled",
                                                  "LocalEntryNotFoundError"):
                raise DataError(self._not_found(e)) from None
            raise DataError(f"data: cannot load {self.label}: {type(e).__name__}: {_first_line(e)}") from None

    def _load_from_disk(self):
        import datasets

        try:
            ds = datasets.load_from_disk(str(self.disk_dir))
        except FileNotFoundError:
            raise DataError(f"data.name: {self.disk_dir} is a directory but not one written by save_to_disk (no "
                            "state.json / dataset_dict.json); for files of text use data=text_file data.path=DIR") from None
        if isinstance(ds, datasets.DatasetDict):
            if self.split not in ds:
                raise DataError(f"data.split={self.split}: {self.disk_dir} has splits {', '.join(ds)}")
            ds = ds[self.split]
        elif self.split != "train":  # one Dataset has no splits: training on all of it is not what was asked
            raise DataError(f"data.split={self.split}: {self.disk_dir} holds one dataset without splits (saved from a "
                            "Dataset, not a DatasetDict); drop data.split")
        if self.streaming:  # bounded memory from a local Arrow table too (it is memory-mapped either way)
            ds = ds.to_iterable_dataset()
        return ds

    def _check_reachable(self) -> None:
        """A Hub id online: a Hub that does not answer is told at once, not after datasets' retries."""
        if _offline() or self.dataset_name in BUILDERS:
            return
        from bertexp.hub import _unreachable

        why = _unreachable()
        if why:
            import datasets
            from huggingface_hub import constants

            # Not reachable: look in the datasets cache as offline mode does, and say so if it is not there.
            constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
            log.warning("The Hugging Face Hub cannot be reached (%s): data.name=%s comes from the datasets cache",
                        why, self.dataset_name)

    def _not_found(self, e) -> str:
        import datasets

        return (f"data.name={self.dataset_name}: no such directory, and not in the datasets cache at "
                f"HF_DATASETS_CACHE={datasets.config.HF_DATASETS_CACHE}{' (offline)' if _offline() else ''}; "
                f"connect, or run once online, or give a save_to_disk directory ({type(e).__name__})")

    def _check_column(self) -> None:
        names = self._ds.column_names
        if names is None:  # a stream whose features are not declared: its first record says
            names = list(next(iter(self._ds), {}).keys())
        if self.text_field not in names:
            raise DataError(f"data.text_field: {self.label} has no column {self.text_field!r} (columns: "
                            f"{', '.join(names)})")

    # ---- identity --------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            ds = self.dataset()
            h = hashlib.sha1()
            if not self.streaming:
                h.update(ds._fingerprint.encode())
                if self.disk_dir is not None:  # a folder rewritten by hand keeps its state.json's fingerprint
                    for f in sorted(self.disk_dir.rglob("*.arrow")):
                        st = f.stat()
                        h.update(f"{f.relative_to(self.disk_dir)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
            else:
                h.update(self._stream_key().encode())
            h.update(f"\0{self.split}\0{self.text_field}".encode())
            self._digest_local_files(h)
            self._fingerprint = (f"hf-{HF_DATASET_VERSION}-{self.segmenter}{_segmenter_version(self.segmenter)}-"
                                 f"{h.hexdigest()[:16]}")
        return self._fingerprint

    def _digest_local_files(self, h) -> None:
        """The bytes of local data_files, as text_file keys its files: datasets keys them by modification time
        alone, so a file rewritten with its time kept (cp -p, rsync -a) would read from a stale cache."""
        from bertexp.data.sources import _HASH_WHOLE_BELOW, digest_file

        files = self.data_files if isinstance(self.data_files, (list, dict)) else [self.data_files] if self.data_files else []
        if isinstance(files, dict):
            files = [f for fs in files.values() for f in fs]
        local = sorted(Path(f) for f in files if Path(f).is_file())
        whole = sum(f.stat().st_size for f in local) <= _HASH_WHOLE_BELOW
        for f in local:
            digest_file(h, f, whole)

    def _stream_key(self) -> str:
        """A stream has no content fingerprint: its builder's config id hashes the data files (path, size, mtime
        of local ones) and its hash the Hub commit."""
        if self.disk_dir is not None:
            return self._disk_key()
        import datasets

        kw = {"data_files": self.data_files} if self.data_files is not None else {}
        builder = datasets.load_dataset_builder(self.dataset_name, self.config_name, revision=self.revision, **kw)
        return f"{builder.config_id}\0{builder.hash}"

    def _disk_key(self) -> str:
        import json

        h = hashlib.sha1()
        for f in sorted(self.disk_dir.rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(self.disk_dir)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
                if f.name == "state.json":
                    h.update(json.loads(f.read_text()).get("_fingerprint", "").encode())
        return h.hexdigest()

    def total_bytes(self) -> int:
        """Bytes of input (a progress bar's total; whether a vocabulary sample is the whole corpus). A stream of
        unknown size counts as 0."""
        ds = self.dataset()
        if not self.streaming:
            return int(ds.data.column(self.text_field).nbytes)
        info = getattr(ds, "info", None)
        split = (info.splits or {}).get(self.split) if info is not None and info.splits else None
        return int(getattr(split, "num_bytes", 0) or (info.dataset_size if info is not None else 0) or 0)

    # ---- reading ---------------------------------------------------------------------------------

    def chunks(self) -> Iterator[Chunk]:
        ds = self.dataset()
        if not self.streaming:
            ds = ds.select_columns([self.text_field])
        for batch in ds.iter(batch_size=RECORDS_PER_CHUNK):
            texts = [t for t in batch[self.text_field] if isinstance(t, str)]
            yield Chunk("texts", texts, self.label, size=sum(len(t.encode("utf-8")) for t in texts))

    def load(self) -> Corpus:
        """The whole corpus as Python objects, segmented: for small corpora and tests (training streams)."""
        return corpus_of(self.chunks(), self.segmenter)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]

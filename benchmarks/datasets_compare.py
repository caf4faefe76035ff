"""bertexp's corpus preparation against Hugging Face `datasets` doing the same work, on the same files.

    pip install datasets && python benchmarks/datasets_compare.py --corpus DIR_OR_FILE [--num-proc 2]

Both read plain-text files (documents between blank lines), segment every paragraph with rjieba, and tokenise
it with the same BERT tokenizer (ids and character offsets, from which word starts are marked):
  bertexp:  bertexp.data.prepare.write_tokens (chunks of 4 MB in worker processes, direct lookup of Chinese
            characters, appended to flat token files);
  datasets: load_dataset("text", sample_by="paragraph") into its Arrow cache, then .map(batched=True,
            num_proc=N) running the same per-text work (bertexp's tokenize_chunk on each batch of
            documents), written to Arrow. Only the engines differ.
Each runs in a fresh cache, one after the other; wall time and MB/s are printed. Issue 14 asks to use
`datasets` unless a hand-written path measures faster; this is that measurement.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def files_of(path: Path) -> list[str]:
    return sorted(str(f) for f in path.glob("*.txt")) if path.is_dir() else [str(path)]


def with_datasets(files: list[str], tokenizer_dir: str, num_proc: int, cache: Path) -> float:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import numpy as np
    from datasets import load_dataset

    from bertexp.data.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    ds = load_dataset("text", data_files=files, sample_by="paragraph", split="train", cache_dir=str(cache))

    tokenizer_json = load_tokenizer(tokenizer_dir).backend_tokenizer.to_str()

    def encode(batch):
        # the same per-text work as bertexp's workers (segment, split sentences, tokenise), so that only the
        # engines differ: datasets' Arrow cache and map against bertexp's chunk stream
        from bertexp.data import prepare
        from bertexp.data.sources import Chunk

        if prepare._tokenizer is None:
            prepare._init_worker(tokenizer_json, "rjieba")
        r = prepare.tokenize_chunk(Chunk("texts", batch["text"]))
        doc_sents = r["doc_sents"][r["doc_sents"] > 0]
        per_doc = np.add.reduceat(r["sent_len"], np.concatenate([[0], np.cumsum(doc_sents)[:-1]])) \
            if len(doc_sents) else np.zeros(0, np.int64)
        cuts = np.cumsum(per_doc)[:-1]
        keep = [bool(t.strip()) for t in batch["text"]]
        ids = iter(np.split(r["ids"], cuts))
        ws = iter(np.split(r["word_start"], cuts))
        return {"ids": [next(ids) if k else [] for k in keep], "word_start": [next(ws) if k else [] for k in keep]}

    ds.map(encode, batched=True, batch_size=256, num_proc=num_proc, remove_columns=["text"],
           cache_file_name=str(cache / "tokens.arrow"))
    return time.perf_counter() - t0


def with_bertexp(files: list[str], tokenizer_dir: str, num_proc: int, cache: Path) -> float:
    from bertexp.data.prepare import write_tokens
    from bertexp.data.sources import TextFiles
    from bertexp.data.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    out = cache / "tokens"
    out.mkdir(parents=True)
    write_tokens(TextFiles(files), load_tokenizer(tokenizer_dir), out, num_proc)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--tokenizer", help="a vocabulary dir (default: the one bertexp trains for the corpus)")
    ap.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()
    files = files_of(Path(args.corpus))
    mb = sum(os.path.getsize(f) for f in files) / 2**20
    tokenizer_dir = args.tokenizer
    if tokenizer_dir is None:
        from bertexp.data.dataset import PretrainingData

        tokenizer_dir = str(PretrainingData.from_text_file(files).vocab_dir(8000))
    for name, fn in (("bertexp", with_bertexp), ("datasets", with_datasets)):
        cache = Path(tempfile.mkdtemp(prefix=f"cmp-{name}-"))
        try:
            seconds = fn(files, tokenizer_dir, args.num_proc, cache)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        print(f"{name:9s} {mb:.0f} MB in {seconds:.1f} s = {mb / seconds:.2f} MB/s ({args.num_proc} processes)", flush=True)


if __name__ == "__main__":
    main()

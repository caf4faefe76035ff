"""Peak memory of preparing a 100 MB corpus given as a `datasets` dataset, streamed and not, against the same
records read as JSON lines by data=text_file.

    python benchmarks/hf_dataset_memory.py                  # 100 MB, one tokenising process
    python benchmarks/hf_dataset_memory.py --size 1024      # 1 GB

The corpus is benchmarks/data_scale.py's (People's Daily paragraphs repeated), written as one JSON lines file
of a record per document. Each configuration runs `python run.py ... trainer.max_steps=1` in a fresh process
on an empty bertexp cache (and an empty datasets cache), timed to the first training step; peak RSS is summed
over the process tree every 0.1 s (benchmarks/data_scale.py's `run_measured`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_scale import first_step_s, make_corpus, run_measured  # noqa: E402


def as_jsonl(corpus: Path, out: Path) -> None:
    if out.is_file():
        return
    with open(out, "w", encoding="utf-8") as f:
        for part in sorted(corpus.glob("part-*.txt")):
            for doc in part.read_text(encoding="utf-8").split("\n\n"):
                if doc.strip():
                    f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=100, help="corpus size in MB")
    ap.add_argument("--dir", default=os.environ.get("BERTEXP_BENCH_DIR", "/tmp/bertexp-data-scale"))
    ap.add_argument("--num-proc", type=int, default=1, help="data.num_proc")
    args = ap.parse_args()
    base = Path(args.dir)
    corpus = base / f"corpus-{args.size}mb"
    make_corpus(corpus, args.size)
    jsonl = base / f"corpus-{args.size}mb.jsonl"
    as_jsonl(corpus, jsonl)
    print(f"{jsonl}: {jsonl.stat().st_size / 2**20:.0f} MB", flush=True)
    configs = {
        "text_file (JSON lines)": ["data=text_file", f"data.path={jsonl}"],
        "hf_dataset json": ["data=hf_dataset", "data.name=json", f"data.data_files={jsonl}"],
        "hf_dataset json, streaming": ["data=hf_dataset", "data.name=json", f"data.data_files={jsonl}",
                                       "data.streaming=true"],
    }
    rows = []
    for name, data in configs.items():
        cache, hf = base / "hfmem-cache", base / "hfmem-datasets"
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(hf, ignore_errors=True)
        env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "HF_DATASETS_CACHE": str(hf)}
        cmd = [sys.executable, "run.py", *data, f"data.cache_dir={cache}", f"data.num_proc={args.num_proc}",
               "trainer.max_steps=1", "logger=none", "trainer.measure_mfu=false", "trainer.resume=never",
               f"hydra.run.dir={base / 'runs' / 'hfmem'}"]
        wall, rss, out = run_measured(cmd, env)
        step = first_step_s(out)
        print(f"{name}: first step after {step:.0f} s (process {wall:.0f} s), peak RSS {rss:.2f} GB", flush=True)
        rows.append((name, step, rss))
    print(f"\n| {args.size} MB, data.num_proc={args.num_proc} | first run to step 1 | peak RSS |\n|---|---|---|")
    for name, step, rss in rows:
        print(f"| {name} | {step:.0f} s | {rss:.2f} GB |")


if __name__ == "__main__":
    main()

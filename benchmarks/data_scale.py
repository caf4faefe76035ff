"""Corpora of 100 MB and 1 GB: preparation time, throughput and peak memory; then a warm start.

    python benchmarks/data_scale.py                 # 100 MB and 1 GB (needs ~6 GB of disk, ~15 min on 2 cores)
    python benchmarks/data_scale.py --sizes 100     # only 100 MB

For each size it writes a corpus made from People's Daily (its paragraphs repeated to the size, documents
between blank lines, in 64 MB files, as corpora are usually kept), then, each in a fresh process:
  1. prepare: `python run.py data=text_file data.path=DIR trainer.max_steps=1` on an empty cache — vocabulary,
     segmentation (rjieba) and tokenisation on every core — timed to the first training step;
  2. warm start: the same command again (cache hit), timed to the first training step.
Peak RSS is the largest sum, sampled every 0.1 s, over the process and all its children (the tokenising
processes included). Targets (issue 14): 1 GB prepared in <= 15 min on 2 cores with peak RSS <= 4 GB; the
warm start's first step in <= 15 s.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILE_MB = 64


def make_corpus(folder: Path, size_mb: int) -> None:
    """People's Daily paragraphs, repeated, in FILE_MB files; skipped when it is there already."""
    done = folder / ".complete"
    if done.is_file():
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sys.path.insert(0, str(ROOT))
    from bertexp.data.sources import PeoplesDaily

    docs = PeoplesDaily().load().documents
    block = ("\n\n".join("\n".join(p.text for p in d) for d in docs) + "\n\n").encode("utf-8")
    target, written, part = size_mb * 2**20, 0, 0
    while written < target:
        with open(folder / f"part-{part:04d}.txt", "wb") as f:
            n = 0
            while n < FILE_MB * 2**20 and written < target:
                piece = block[: min(len(block), target - written)]
                end = piece.rfind(b"\n\n")
                if end < 0:  # less than a document left to the size
                    written = target
                    break
                piece = piece[: end + 2]  # whole documents
                f.write(piece)
                n += len(piece)
                written += len(piece)
        part += 1
    done.touch()


def run_measured(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, peak RSS of the process tree in GB, output)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    peak = [0]
    root = psutil.Process(proc.pid)

    def sample() -> None:
        while proc.poll() is None:
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                peak[0] = max(peak[0], rss)
            except psutil.Error:
                pass
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return time.perf_counter() - t0, peak[0] / 2**30, out


def first_step_s(out: str) -> float:
    m = re.search(r"First step done ([\d.]+) s after the process started", out)
    return float(m.group(1)) if m else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1024], help="corpus sizes in MB")
    ap.add_argument("--dir", default=os.environ.get("BERTEXP_BENCH_DIR", "/tmp/bertexp-data-scale"),
                    help="where corpora and caches go")
    ap.add_argument("--num-proc", type=int, default=None, help="data.num_proc (default: every core)")
    args = ap.parse_args()
    base = Path(args.dir)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    rows = []
    for mb in args.sizes:
        corpus, cache = base / f"corpus-{mb}mb", base / f"cache-{mb}mb"
        t = time.perf_counter()
        make_corpus(corpus, mb)
        print(f"{mb} MB corpus ready in {corpus} ({time.perf_counter() - t:.0f} s)", flush=True)
        shutil.rmtree(cache, ignore_errors=True)
        cmd = [sys.executable, "run.py", "data=text_file", f"data.path={corpus}", f"data.cache_dir={cache}",
               "trainer.max_steps=1", "logger=none", "trainer.measure_mfu=false",
               f"hydra.run.dir={base / 'runs' / f'{mb}mb-cold'}", "trainer.resume=never",
               *([f"data.num_proc={args.num_proc}"] if args.num_proc else [])]
        wall, rss, out = run_measured(cmd, env)
        cold = first_step_s(out)
        meta = next(cache.glob("tokens-*/meta.json")).read_text()
        print(f"  prepared: first step after {cold:.0f} s (process {wall:.0f} s), peak RSS {rss:.2f} GB; {meta.strip()}",
              flush=True)
        cmd[cmd.index(f"hydra.run.dir={base / 'runs' / f'{mb}mb-cold'}")] = f"hydra.run.dir={base / 'runs' / f'{mb}mb-warm'}"
        wall2, rss2, out2 = run_measured(cmd, env)
        warm = first_step_s(out2)
        print(f"  warm start: first step after {warm:.1f} s (process {wall2:.0f} s), peak RSS {rss2:.2f} GB", flush=True)
        rows.append((mb, cold, mb / cold, rss, warm, rss2))
    print("\n| corpus | first run to step 1 | MB/s | peak RSS | second run to step 1 | its peak RSS |")
    print("|---|---|---|---|---|---|")
    for mb, cold, rate, rss, warm, rss2 in rows:
        print(f"| {mb} MB | {cold:.0f} s | {rate:.2f} | {rss:.2f} GB | {warm:.1f} s | {rss2:.2f} GB |")


if __name__ == "__main__":
    main()

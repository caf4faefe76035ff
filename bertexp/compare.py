"""Compare runs locally, with no network and no W&B: `python -m bertexp.compare PATH... [--out DIR]`.

PATH is a run directory, a multirun sweep directory, or any folder holding them. Each run's composed
config (`.hydra/config.yaml`), `metrics.jsonl` and `status.json` are read; the table shows the config values
that differ between the runs, final and best evaluation metrics, the exam they were scored on and the
neighbours-counting baseline on it, throughput, steps and status, and is written as Markdown and CSV next to
a plot of the eval curves (one labelled line per run).

Runs are ranked by final exam accuracy only among runs that took the same exam (`eval/exam_id`); when the
runs took different exams, the table says so instead of ranking them together.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path

from omegaconf import OmegaConf

from bertexp.tracking import read_metrics

IGNORED_KEYS = ("data.cache_dir", "trainer.resume")


def find_runs(paths: list[Path]) -> list[Path]:
    runs: list[Path] = []
    for p in map(Path, paths):
        if (p / ".hydra" / "config.yaml").is_file():
            runs.append(p)
        elif p.is_dir():
            runs.extend(sorted({c.parent.parent for c in p.rglob(".hydra/config.yaml")}, key=_run_sort_key))
    seen, out = set(), []
    for r in runs:
        if r.resolve() not in seen:
            seen.add(r.resolve())
            out.append(r)
    return out


def _run_sort_key(p: Path):
    return (str(p.parent), int(p.name) if p.name.isdigit() else 0, p.name)


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_run(path: Path) -> dict:
    cfg = OmegaConf.load(path / ".hydra" / "config.yaml")
    try:
        flat = _flatten(OmegaConf.to_container(cfg, resolve=False))
    except Exception:
        flat = {}
    metrics = read_metrics(path / "metrics.jsonl")
    status_file = path / "status.json"
    status = json.loads(status_file.read_text()) if status_file.is_file() else {"status": "unknown"}
    evals = [m for m in metrics if "eval/mlm_acc" in m]
    exams = {m.get("eval/exam_id") for m in evals}
    tps = [m["throughput/tokens_per_s"] for m in metrics if m.get("throughput/tokens_per_s")]
    last = evals[-1] if evals else {}

    def best(key, fn):
        vals = [m[key] for m in evals if key in m and m[key] is not None]
        return fn(vals) if vals else None

    return {
        "path": path,
        "config": {k: v for k, v in flat.items() if k not in IGNORED_KEYS},
        "evals": evals,
        "final/eval/mlm_acc": last.get("eval/mlm_acc"),
        "best/eval/mlm_acc": best("eval/mlm_acc", max),
        "final/eval/mlm_loss": last.get("eval/mlm_loss"),
        "best/eval/mlm_loss": best("eval/mlm_loss", min),
        "final/eval/nsp_acc": last.get("eval/nsp_acc"),
        "final/eval/mlm_top5_acc": last.get("eval/mlm_top5_acc"),
        "baseline": last.get("eval/baseline/neighbours_acc"),
        # one exam per run; a run whose records name several (or none) cannot be ranked against others
        "exam_id": exams.pop() if len(exams) == 1 else None,
        "tokens_per_s": sum(tps) / len(tps) if tps else None,
        "steps": max((m.get("step", 0) for m in metrics), default=0),
        "status": status.get("status", "unknown"),
        "error": status.get("error", ""),
    }


def differing_keys(runs: list[dict]) -> list[str]:
    keys = sorted({k for r in runs for k in r["config"]})
    return [k for k in keys if len({json.dumps(r["config"].get(k), sort_keys=True, default=str) for r in runs}) > 1]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _fmt_value(v) -> str:
    return _fmt(v) if isinstance(v, float) else _short(v)


def label_of(run: dict, keys: list[str]) -> str:
    return ",".join(f"{k.split('._target_')[0]}={_fmt_value(run['config'].get(k))}" for k in keys) or run["path"].name


def _short(v) -> str:
    s = str(v)
    return s.rsplit(".", 1)[-1] if s.startswith("bertexp.") or s.startswith("torch.") else s


COLUMNS = [
    ("rank", "rank"),
    ("final eval mlm_acc", "final/eval/mlm_acc"),
    ("best eval mlm_acc", "best/eval/mlm_acc"),
    ("final eval mlm_top5_acc", "final/eval/mlm_top5_acc"),
    ("neighbours table", "baseline"),
    ("final eval mlm_loss", "final/eval/mlm_loss"),
    ("final eval nsp_acc", "final/eval/nsp_acc"),
    ("exam", "exam_id"),
    ("tokens/s", "tokens_per_s"),
    ("steps", "steps"),
    ("status", "status"),
]


def rank_within_exams(runs: list[dict]) -> str:
    """Set each run's "rank" by final exam accuracy among the runs that took the same exam; return a note
    when the runs took more than one exam (empty otherwise)."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        r["rank"] = None
        if r["exam_id"] and r["final/eval/mlm_acc"] is not None:
            groups.setdefault(r["exam_id"], []).append(r)
    for group in groups.values():
        for i, r in enumerate(sorted(group, key=lambda r: -r["final/eval/mlm_acc"])):
            r["rank"] = i + 1
    notes = []
    if len(groups) > 1:
        notes.append(f"Note: these runs took {len(groups)} different exams ({', '.join(sorted(groups))}): eval/mlm_acc "
                     "is ranked within each exam only; accuracies on different exams are not comparable.")
    unscored = [r["path"].name for r in runs if r["evals"] and not r["exam_id"]]
    if unscored:
        notes.append(f"Note: {len(unscored)} run(s) ({', '.join(unscored)}) have no single exam id (an older bertexp, or "
                     "scored on more than one exam): they are not ranked.")
    return "\n".join(notes)


def table_rows(runs: list[dict], keys: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["run", *keys, *[c for c, _ in COLUMNS], "error"]
    rows = []
    for r in runs:
        rows.append([str(r["path"]), *[_fmt_value(r["config"].get(k)) for k in keys], *[_fmt(r[f]) for _, f in COLUMNS], r["error"]])
    return header, rows


def to_markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def figure(runs: list[dict], keys: list[str]):
    """Eval MLM loss and accuracy against step, one line per run labelled by its differing values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        steps = [m["step"] for m in r["evals"]]
        label = label_of(r, keys) + ("" if r["status"] == "completed" else f" ({r['status']})")
        axes[0].plot(steps, [m["eval/mlm_loss"] for m in r["evals"]], marker="o", label=label)
        axes[1].plot(steps, [m["eval/mlm_acc"] for m in r["evals"]], marker="o", label=label)
    axes[0].set(xlabel="step", ylabel="eval/mlm_loss", title="Exam MLM loss")
    axes[1].set(xlabel="step", ylabel="eval/mlm_acc", title="Exam accuracy (blanks, all [MASK])")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(runs: list[dict], keys: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(runs, keys)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(paths: list[Path], out: Path | None = None, stem: str = "comparison", with_plot: bool = True) -> tuple[str, list[dict]]:
    """Write {stem}.md, .csv and .png for the runs under `paths`; return (Markdown table, runs)."""
    run_dirs = find_runs(paths)
    if not run_dirs:
        raise SystemExit(f"error: no runs found under {', '.join(map(str, paths))} (a run dir has .hydra/config.yaml)")
    runs = [load_run(p) for p in run_dirs]
    keys = differing_keys(runs)
    note = rank_within_exams(runs)
    header, rows = table_rows(runs, keys)
    md = to_markdown(header, rows) + (f"\n\n{note}" if note else "")
    out = Path(out) if out else (Path(paths[0]) if len(paths) == 1 and Path(paths[0]).is_dir() else Path("."))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(md + "\n", encoding="utf-8")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    (out / f"{stem}.csv").write_text(buf.getvalue(), encoding="utf-8")
    if with_plot:
        plot(runs, keys, out / f"{stem}.png")
    return md, runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bertexp-compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", type=Path, help="run dirs, sweep dirs, or folders holding them")
    ap.add_argument("--out", type=Path, default=None, help="where comparison.{md,csv,png} go (default: the single PATH, else .)")
    args = ap.parse_args(argv)
    md, _ = compare(args.paths, args.out)
    print(md)
    out = args.out or (args.paths[0] if len(args.paths) == 1 else Path("."))
    print(f"\nWritten: {out}/comparison.md, comparison.csv, comparison.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

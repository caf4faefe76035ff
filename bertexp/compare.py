"""Compare runs locally, with no network and no W&B: `python -m bertexp.compare PATH... [--out DIR]`.

PATH is a run directory, a multirun sweep directory, or any folder holding them. Each run's composed
config (`.hydra/config.yaml`), `metrics.jsonl` and `status.json` are read; the table shows the config values
that differ between the runs, final and best evaluation metrics, the exam they were scored on and the
neighbours-counting baseline on it, throughput, steps and status, and is written as Markdown and CSV next to
a plot of the eval curves (one labelled line per run).

Runs are ranked by final exam accuracy (or `--metric`) only among runs that took the same exam
(`eval/exam_id`); when the runs took different exams, the table says so instead of ranking them together.

Runs whose configs differ only in `seed` form a group: a second table gives, per group, the metric's mean,
standard deviation, 95% confidence interval (Student's t) and N, marks the best group, and says whether its
lead over the runner-up is larger than seed noise (Welch's t-test, p < 0.05). The plot then draws each group's
mean with its interval as a band, against `--x` step, tokens, flops or time.
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

from bertexp.rundir import STATUS_FILE, flatten
from bertexp.tracking import read_metrics

IGNORED_KEYS = ("data.cache_dir", "trainer.resume")
X_AXES = {"step": "step", "tokens": "tokens", "flops": "flops", "time": "elapsed_s"}
LOWER_IS_BETTER = ("loss", "perplexity")


def find_runs(paths: list[Path]) -> list[Path]:
    runs: list[Path] = []
    for p in map(Path, paths):
        if (p / ".hydra" / "config.yaml").is_file():
            runs.append(p)
        elif p.is_dir():
            found = {c.parent.parent for c in p.rglob(".hydra/config.yaml")}
            # not the copies a run keeps elsewhere: W&B's files of the run, a branch moved to abandoned/
            found = {r for r in found if not {"wandb", "abandoned"} & set(r.relative_to(p).parts)}
            runs.extend(sorted(found, key=_run_sort_key))
    seen, out = set(), []
    for r in runs:
        if r.resolve() not in seen:
            seen.add(r.resolve())
            out.append(r)
    return out


def _run_sort_key(p: Path):
    return (str(p.parent), int(p.name) if p.name.isdigit() else 0, p.name)


def load_run(path: Path) -> dict:
    cfg = OmegaConf.load(path / ".hydra" / "config.yaml")
    try:
        flat = flatten(OmegaConf.to_container(cfg, resolve=False))
    except Exception:
        flat = {}
    metrics = read_metrics(path / "metrics.jsonl")
    status_file = path / STATUS_FILE
    status = json.loads(status_file.read_text()) if status_file.is_file() else {"status": "unknown"}
    evals = [m for m in metrics if "eval/mlm_acc" in m]
    exams = {m.get("eval/exam_id") for m in evals}
    # (records written before the mean was logged: their tokens over their training seconds)
    trained = ([m for m in metrics if m.get("throughput/mean_tokens_per_s")]
               or [m for m in metrics if m.get("elapsed_s") and m.get("tokens")])
    last = evals[-1] if evals else {}

    def best(key, fn):
        vals = [m[key] for m in evals if key in m and m[key] is not None]
        return fn(vals) if vals else None

    downstream = {}
    for summary in sorted(path.glob("downstream/*/summary.json")):  # trainer.downstream=[...]
        try:
            downstream[summary.parent.name] = json.loads(summary.read_text())
        except ValueError:
            pass
    return {
        "path": path,
        "downstream": downstream,
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
        # the run's mean, as its final line and W&B summary give it: all its tokens over all its training seconds
        "mean_tokens_per_s": (trained[-1].get("throughput/mean_tokens_per_s")
                              or trained[-1]["tokens"] / trained[-1]["elapsed_s"]) if trained else None,
        "steps": max((m.get("step", 0) for m in metrics), default=0),
        "status": status.get("status", "unknown"),
        "error": status.get("error", ""),
        "downstream_error": status.get("downstream_error"),  # pretraining completed, its downstream did not
    }


def metric_value(run: dict, metric: str):
    """A run's value of `metric`: `best/KEY` is the best of its evals, `final/KEY` or plain `KEY` the last."""
    kind, key = ("best", metric[5:]) if metric.startswith("best/") else ("final", metric.removeprefix("final/"))
    vals = [m[key] for m in run["evals"] if m.get(key) is not None]
    if not vals:
        return run.get(f"final/{key}") if kind == "final" else None
    if kind == "final":
        return vals[-1]
    return (min if lower_is_better(key) else max)(vals)


def lower_is_better(metric: str) -> bool:
    return any(w in metric for w in LOWER_IS_BETTER)


def seed_stats(values: list[float]) -> dict:
    """Mean, sample standard deviation, 95% confidence interval of the mean (Student's t) and N."""
    import numpy as np
    from scipy import stats

    n = len(values)
    mean = float(np.mean(values)) if n else None
    if n < 2:
        return {"mean": mean, "sd": None, "ci_low": None, "ci_high": None, "n": n}
    sd = float(np.std(values, ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def seed_groups(runs: list[dict], keys: list[str], metric: str) -> tuple[list[dict], str]:
    """Groups of runs that differ only in `seed` (none unless some runs share all other values), with the
    metric's statistics, the best group marked, and a verdict on its lead over the runner-up."""
    if "seed" not in keys:
        return [], ""
    other = [k for k in keys if k != "seed"]
    by_key: dict[str, list[dict]] = {}
    for r in runs:
        by_key.setdefault(json.dumps([r["config"].get(k) for k in other], default=str), []).append(r)
    if all(len(g) == 1 for g in by_key.values()):
        return [], ""
    groups = []
    for members in by_key.values():
        # a seed that was cut off or failed has no final value to average: listed, not counted
        scored = [r for r in members if r["status"] == "completed" and metric_value(r, metric) is not None]
        exams = {r["exam_id"] for r in scored}
        groups.append({
            "label": label_of(members[0], other) if other else "all runs",
            "runs": scored,
            "left_out": len(members) - len(scored),
            "values": [metric_value(r, metric) for r in scored],
            "seeds": [r["config"].get("seed") for r in members],
            "exam_id": exams.pop() if len(exams) == 1 else None,
            **seed_stats([metric_value(r, metric) for r in scored]),
            "downstream": downstream_over_seeds(scored),
            "best": "",
        })
    ranked = [g for g in groups if g["mean"] is not None and g["exam_id"]]
    if len({g["exam_id"] for g in ranked}) > 1:
        return groups, "Note: the groups took different exams; they are not ranked against each other."
    sign = 1 if lower_is_better(metric) else -1
    ranked.sort(key=lambda g: sign * g["mean"])
    if not ranked:
        return groups, ""
    best = ranked[0]
    best["best"] = "best"
    if len(ranked) == 1:
        return groups, ""
    second = ranked[1]
    p, verdict = welch_lead(best, second, "seed noise", "seeds")
    if p is not None:
        best["p_vs_next"] = p
        best["best"] = "best" + (" (significant)" if p < 0.05 else " (within noise)")
    note = (f"Best group by {metric}: {best['label']} ({_fmt(best['mean'])}, n={best['n']}); its lead over "
            f"{second['label']} ({_fmt(second['mean'])}, n={second['n']}) {verdict}.")
    return groups, note


def welch_lead(a: dict, b: dict, noise: str, seeds: str) -> tuple[float | None, str]:
    """Whether group a's lead over group b (each with n, sd, mean, values) is larger than `noise`: Welch's
    t-test p (None with fewer than 2 values on a side) and the verdict in words."""
    if a["n"] < 2 or b["n"] < 2:
        return None, f"cannot be told from seed noise (fewer than 2 {seeds})"
    from scipy import stats

    if a["sd"] == 0 and b["sd"] == 0:
        p = 0.0 if a["mean"] != b["mean"] else 1.0
    else:
        p = float(stats.ttest_ind(a["values"], b["values"], equal_var=False).pvalue)
    return p, (f"is larger than {noise} (Welch's t-test p = {p:.3g} < 0.05)" if p < 0.05 else
               f"is within {noise} (Welch's t-test p = {p:.3g} >= 0.05)")


INITS = (("pretrained", "pretrained"), ("random", "random init"))


def downstream_over_seeds(runs: list[dict]) -> dict:
    """Per downstream task and init: the statistics over pretraining seeds (runs) of each run's test mean over
    its fine-tuning seeds. A run without that task's summary is not counted."""
    tasks = sorted({t for r in runs for t in r.get("downstream", {})})
    return {t: {init: {**seed_stats(vals := [r["downstream"][t][init]["test"]["mean"] for r in runs
                                              if t in r.get("downstream", {})]), "values": vals}
                for init, _ in INITS}
            for t in tasks}


def downstream_notes(groups: list[dict]) -> list[str]:
    """Per task, the group whose pretrained encoder fine-tunes best, and whether its lead over the runner-up
    is larger than the noise of pretraining seeds (Welch's t-test over the runs' test means)."""
    notes = []
    for t in sorted({t for g in groups for t in g.get("downstream", {})}):
        ranked = sorted((g for g in groups if g["downstream"].get(t, {}).get("pretrained", {}).get("mean") is not None),
                        key=lambda g: -g["downstream"][t]["pretrained"]["mean"])
        if len(ranked) < 2:
            continue
        a, b = ranked[0]["downstream"][t]["pretrained"], ranked[1]["downstream"][t]["pretrained"]
        _, verdict = welch_lead(a, b, "pretraining-seed noise", "pretraining seeds")
        notes.append(f"Best group by {t} test (pretrained encoder): {ranked[0]['label']} ({_fmt(a['mean'])}, n={a['n']}); "
                     f"its lead over {ranked[1]['label']} ({_fmt(b['mean'])}, n={b['n']}) {verdict}.")
    return notes


def group_table(groups: list[dict], metric: str) -> tuple[list[str], list[list[str]]]:
    """The groups' table. Columns whose name ends in "(csv)" hold full-precision numbers for the CSV only."""
    tasks = sorted({t for g in groups for t in g.get("downstream", {})})
    header = ["group", "runs not counted", f"{metric} mean ± sd", f"{metric} mean", f"{metric} sd", f"{metric} ci_low", f"{metric} ci_high", f"{metric} n",
              "seeds", "exam", "best"]
    for t in tasks:
        for _, name in INITS:
            header += [f"{t} test ({name}) mean ± sd over seeds", f"{t} test ({name}) n",
                       f"{t} test ({name}) mean (csv)", f"{t} test ({name}) sd (csv)"]
    rows = []
    for g in groups:
        row = [g["label"], str(g["left_out"]), f"{_fmt(g['mean'])} ± {_fmt(g['sd'])}", _num(g["mean"]), _num(g["sd"]),
               _num(g["ci_low"]), _num(g["ci_high"]), str(g["n"]),
               " ".join(map(str, g["seeds"])), _fmt(g["exam_id"]), g["best"]]
        for t in tasks:
            for init, _ in INITS:
                d = g.get("downstream", {}).get(t, {}).get(init) or {"mean": None, "sd": None, "n": 0}
                row += [f"{_fmt(d['mean'])} ± {_fmt(d['sd'])}" if d["n"] else "-", str(d["n"]), _num(d["mean"]), _num(d["sd"])]
        rows.append(row)
    return header, rows


def differing_keys(runs: list[dict]) -> list[str]:
    keys = sorted({k for r in runs for k in r["config"]})
    return [k for k in keys if len({json.dumps(r["config"].get(k), sort_keys=True, default=str) for r in runs}) > 1]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.0f}" if abs(v) >= 1e4 else f"{v:.4g}"  # throughput as a whole number, as the final line shows it
    return str(v)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _num(v) -> str:
    """Full precision for the CSV's numbers (the Markdown shows 4 digits)."""
    return "-" if v is None else repr(float(v))


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
    ("mean tokens/s", "mean_tokens_per_s"),
    ("steps", "steps"),
    ("status", "status"),
]


def rank_within_exams(runs: list[dict], metric: str = "final/eval/mlm_acc") -> str:
    """Set each run's "rank" by `metric` among the runs that took the same exam; return a note when the
    runs took more than one exam (empty otherwise)."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        r["rank"] = None
        # a failed or stopped run's last score is from an earlier step than the others': not ranked with them
        if r["exam_id"] and r["status"] == "completed" and metric_value(r, metric) is not None:
            groups.setdefault(r["exam_id"], []).append(r)
    sign = 1 if lower_is_better(metric) else -1
    for group in groups.values():
        scores = [sign * metric_value(r, metric) for r in group]
        for r, mine in zip(group, scores):  # equal scores share a rank (1, 2, 2, 4)
            r["rank"] = 1 + sum(other < mine for other in scores)
    notes = []
    if len(groups) > 1:
        notes.append(f"Note: these runs took {len(groups)} different exams ({', '.join(sorted(groups))}): eval/mlm_acc "
                     "is ranked within each exam only; accuracies on different exams are not comparable.")
    unfinished = [r["path"].name for r in runs if r["evals"] and r["status"] != "completed"]
    if unfinished:
        notes.append(f"Note: {len(unfinished)} run(s) ({', '.join(unfinished)}) did not complete: listed with their "
                     "last scores, not ranked.")
    unscored = [r["path"].name for r in runs if r["evals"] and not r["exam_id"]]
    if unscored:
        notes.append(f"Note: {len(unscored)} run(s) ({', '.join(unscored)}) have no single exam id (an older bertexp, or "
                     "scored on more than one exam): they are not ranked.")
    return "\n".join(notes)


def _downstream_cell(s: dict) -> str:
    if not s:
        return "-"
    return f"{_fmt(s['mean'])} ± {_fmt(s['sd'])}" if s.get("sd") is not None else _fmt(s["mean"])


def _csv_value(v) -> str:
    """A CSV cell for machines: numbers at full precision (the Markdown rounds them)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "-" if v is None else str(v)
    return str(v) if isinstance(v, int) else repr(float(v))


def table_rows(runs: list[dict], keys: list[str], fmt=None) -> tuple[list[str], list[list[str]]]:
    """The runs' table; `fmt` writes each value (default: rounded, for Markdown; `_csv_value` for the CSV)."""
    fmt = fmt or _fmt
    tasks = sorted({t for r in runs for t in r.get("downstream", {})})
    inits = (("pretrained", "pretrained"), ("random init", "random"))
    if fmt is _fmt:  # Markdown: one cell "mean ± sd" per task and init
        extra = [f"{t} test ({name})" for t in tasks for name, _ in inits]
    else:  # CSV: the mean and the sd in columns of their own, each a number
        extra = [f"{t} test ({name}) {stat}" for t in tasks for name, _ in inits for stat in ("mean", "sd")]
    header = ["run", *keys, *[c for c, _ in COLUMNS], *extra, "error"]
    rows = []
    for r in runs:
        cells = []
        for t in tasks:
            for _, init in inits:
                test = (r.get("downstream", {}).get(t) or {}).get(init, {}).get("test", {})
                cells += ([_downstream_cell(test)] if fmt is _fmt else [fmt(test.get("mean")), fmt(test.get("sd"))])
        config = [(_fmt_value if fmt is _fmt else _csv_value)(r["config"].get(k)) for k in keys]
        rows.append([str(r["path"]), *config, *[fmt(r[f]) for _, f in COLUMNS],
                     *cells, r["error"]])
    return header, rows


def to_markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _curve(run: dict, x: str, y: str):
    pts = [(m[x], m[y]) for m in run["evals"] if m.get(x) is not None and m.get(y) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def figure(runs: list[dict], keys: list[str], x: str = "step", groups: list[dict] | None = None):
    """Exam MLM loss and accuracy against `x`: one labelled line per run, or, for runs grouped over seeds,
    each group's mean with its 95% confidence interval as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy import stats

    xkey = X_AXES[x]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, y in zip(axes, ("eval/mlm_loss", "eval/mlm_acc")):
        if groups:
            for g in groups:
                curves = [_curve(r, xkey, y) for r in g["runs"]]
                steps = [_curve(r, "step", y)[0] for r in g["runs"]]
                keep = [i for i, c in enumerate(curves) if c[0]]
                if not keep:
                    continue
                curves = [curves[i] for i in keep]
                if all(steps[i] == steps[keep[0]] for i in keep):  # evaluated at the same steps: pair them up
                    grid = np.mean([c[0] for c in curves], axis=0)
                    ys = np.asarray([c[1] for c in curves])
                else:  # e.g. time budgets: interpolate onto the range every seed covers
                    end = min(c[0][-1] for c in curves)
                    grid = np.unique(np.concatenate([c[0] for c in curves]))
                    grid = grid[grid <= end]
                    ys = np.asarray([np.interp(grid, cx, cy) for cx, cy in curves])
                mean = ys.mean(0)
                (line,) = ax.plot(grid, mean, marker="o", label=f"{g['label']} (n={len(curves)})")
                if len(curves) > 1:
                    half = stats.t.ppf(0.975, len(curves) - 1) * ys.std(0, ddof=1) / np.sqrt(len(curves))
                    ax.fill_between(grid, mean - half, mean + half, color=line.get_color(), alpha=0.2)
        else:
            for r in runs:
                label = label_of(r, keys) + ("" if r["status"] == "completed" else f" ({r['status']})")
                ax.plot(*_curve(r, xkey, y), marker="o", label=label)
        if y == "eval/mlm_acc":
            _counting_tables(ax, runs)
        ax.set(xlabel={"time": "elapsed_s (training loop wall clock)"}.get(x, xkey), ylabel=y)
        ax.grid(alpha=0.3)
    axes[0].set_title("Exam MLM loss")
    axes[1].set_title("Exam accuracy (blanks, all [MASK])" + (": mean and 95% CI over seeds" if groups else ""))
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


TABLES = (("most_frequent", "most-frequent token", ":"), ("left_neighbour", "left-neighbour table", "--"),
          ("neighbours", "neighbours table", "-."))  # the exam's counting rules: key, name, line style


def standing(acc: float, baselines: dict) -> str:
    """Where an exam score stands against the three counting tables (`baselines`: eval/baseline/* values),
    e.g. 'above the most-frequent token (0.0394) and the left-neighbour table (0.1566), below the neighbours
    table (0.3170)'."""
    scored = [(f"the {name} ({baselines[f'eval/baseline/{key}_acc']:.4f})", baselines[f"eval/baseline/{key}_acc"])
              for key, name, _ in TABLES]
    above = [text for text, value in scored if acc > value]
    below = [text for text, value in scored if acc <= value]
    listed = lambda names: ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
    return ", ".join(f"{side} {listed(names)}" for side, names in (("above", above), ("below", below)) if names)


def _counting_tables(ax, runs: list[dict]) -> None:
    """The counting tables' exam scores as horizontal lines, so every curve is read against what a rule that
    learned nothing scores; drawn only when all runs took the same exam (otherwise no one line is right)."""
    last = [r["evals"][-1] for r in runs if r["evals"]]
    if not last or len({m.get("eval/exam_id") for m in last}) != 1:
        return
    for key, name, style in TABLES:
        value = last[0].get(f"eval/baseline/{key}_acc")
        if value is not None:
            ax.axhline(value, color="gray", linestyle=style, linewidth=1, label=f"{name} {value:.4f}")


def plot(runs: list[dict], keys: list[str], path: Path, x: str = "step", groups: list[dict] | None = None) -> None:
    import matplotlib.pyplot as plt

    fig = figure(runs, keys, x, groups)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(paths: list[Path], out: Path | None = None, stem: str = "comparison", with_plot: bool = True,
            metric: str = "final/eval/mlm_acc", x: str = "step") -> tuple[str, list[dict]]:
    """Write {stem}.md, .csv (and {stem}_groups.csv when runs group over seeds) and .png for the runs under
    `paths`; return (Markdown, runs)."""
    if x not in X_AXES:
        raise SystemExit(f"error: --x {x!r} must be one of {', '.join(X_AXES)}")
    run_dirs = find_runs(paths)
    if not run_dirs:
        raise SystemExit(f"error: no runs found under {', '.join(map(str, paths))} (a run dir has .hydra/config.yaml)")
    runs = [load_run(p) for p in run_dirs]
    if x != "step":
        lacking = [r["path"].name for r in runs if r["evals"] and any(X_AXES[x] not in m for m in r["evals"])]
        if lacking:
            raise SystemExit(f"error: --x {x}: run(s) {', '.join(lacking)} have no {X_AXES[x]!r} in their eval records "
                             "(written by an older bertexp); use --x step")
    known = {k for r in runs for m in r["evals"] for k in m}
    key = metric[5:] if metric.startswith("best/") else metric.removeprefix("final/")
    if runs and any(r["evals"] for r in runs) and key not in known:
        raise SystemExit(f"error: --metric {metric!r}: no eval record has {key!r} (e.g. final/eval/mlm_acc, "
                         f"best/eval/mlm_loss; keys: {', '.join(sorted(k for k in known if k.startswith('eval/'))[:8])})")
    keys = differing_keys(runs)
    note = rank_within_exams(runs, metric)
    header, rows = table_rows(runs, keys)
    md = to_markdown(header, rows) + (f"\n\n{note}" if note else "")
    groups, verdict = seed_groups(runs, keys, metric)
    out = Path(out) if out else (Path(paths[0]) if len(paths) == 1 and Path(paths[0]).is_dir() else Path("."))
    out.mkdir(parents=True, exist_ok=True)
    if groups:
        gheader, grows = group_table(groups, metric)
        shown = [row[:3] + [_fmt(float(c)) if _is_number(c) else c for c in row[3:7]] + row[7:] for row in grows]
        md_cols = [i for i, h in enumerate(gheader) if not h.endswith("(csv)")]
        md += (f"\n\nOver seeds ({metric}; 95% CI of the mean; only completed runs count"
               + ("; downstream: mean ± sd over pretraining seeds of each run's test mean over fine-tuning seeds"
                  if any(g.get("downstream") for g in groups) else "") + "):\n\n"
               + to_markdown([gheader[i] for i in md_cols], [[row[i] for i in md_cols] for row in shown]))
        md += f"\n\n{verdict}" if verdict else ""
        for note in downstream_notes(groups):
            md += f"\n\n{note}"
        _write_csv(out / f"{stem}_groups.csv", [h.removesuffix(" (csv)") for h in gheader], grows)
    (out / f"{stem}.md").write_text(md + "\n", encoding="utf-8")
    _write_csv(out / f"{stem}.csv", *table_rows(runs, keys, fmt=_csv_value))
    if with_plot:
        plot(runs, keys, out / f"{stem}.png", x, groups)
    for r in runs:
        r["groups"] = groups
    return md, runs


def _write_csv(path: Path, header, rows) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bertexp-compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", type=Path, help="run dirs, sweep dirs, or folders holding them")
    ap.add_argument("--out", type=Path, default=None, help="where comparison.{md,csv,png} go (default: the single PATH, else .)")
    ap.add_argument("--metric", default="final/eval/mlm_acc",
                    help="what ranks runs and groups: final/KEY (or KEY) or best/KEY of the eval records "
                         "(default: final/eval/mlm_acc, the exam accuracy at the end)")
    ap.add_argument("--x", default="step", choices=list(X_AXES), help="the plot's x axis (default: step)")
    args = ap.parse_args(argv)
    md, _ = compare(args.paths, args.out, metric=args.metric, x=args.x)
    print(md)
    out = args.out or (args.paths[0] if len(args.paths) == 1 else Path("."))
    print(f"\nWritten: {out}/comparison.md, comparison.csv, comparison.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

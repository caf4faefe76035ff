"""Local comparison of runs: table, Markdown, CSV and a labelled plot, from run dirs alone."""
import csv
import json
import shutil

import pytest

from bertexp import compare as cmp
from conftest import compose, run_in_process


def _sweep_job(d, overrides):
    """One finished job laid out as Hydra's multirun lays it out: run dir, .hydra/config.yaml, status.json."""
    from omegaconf import OmegaConf

    run_in_process(d, overrides)
    (d / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(compose(["trainer=smoke", *overrides]), d / ".hydra" / "config.yaml")
    (d / "status.json").write_text(json.dumps({"status": "completed"}))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A two-run 'sweep' directory."""
    root = tmp_path_factory.mktemp("sweep")
    for i, ratio in enumerate((0.15, 0.4)):
        # the previous recipe's position rows and lr: under today's default both runs still predict the most
        # frequent token at step 4 (a tie), and these tests need two runs that rank apart
        _sweep_job(root / str(i), [f"masking.ratio={ratio}", "trainer.max_steps=4", "logger=none",
                                   "model.position_init=random", "optim.lr=2e-3"])
    return root


def test_compare_cli_prints_table_and_writes_files(sweep, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cmp.main([str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "masking.ratio" in printed and "0.15" in printed and "0.4" in printed
    rows = list(csv.reader((out / "comparison.csv").open()))
    assert rows[0][:2] == ["run", "masking.ratio"] and len(rows) == 3
    assert [r[1] for r in rows[1:]] == ["0.15", "0.4"]
    header = rows[0]
    assert all(float(r[header.index("final eval mlm_acc")]) >= 0 for r in rows[1:])
    assert [r[header.index("status")] for r in rows[1:]] == ["completed", "completed"]
    assert (out / "comparison.md").read_text().startswith("| run | masking.ratio |")
    png = (out / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_figure_has_one_labelled_line_per_run(sweep):
    runs = [cmp.load_run(p) for p in cmp.find_runs([sweep])]
    fig = cmp.figure(runs, cmp.differing_keys(runs))
    loss_ax, acc_ax = fig.axes
    assert [l.get_label() for l in loss_ax.get_lines()] == ["masking.ratio=0.15", "masking.ratio=0.4"]
    assert all(len(l.get_xdata()) == 2 for l in loss_ax.get_lines())  # evals at steps 2 and 4
    # the accuracy panel reads every curve against the counting tables of the exam both runs took
    lines = acc_ax.get_lines()
    assert [l.get_label() for l in lines[:2]] == ["masking.ratio=0.15", "masking.ratio=0.4"]
    last = runs[0]["evals"][-1]
    for line, key, name in zip(lines[2:], ("most_frequent", "left_neighbour", "neighbours"),
                               ("most-frequent token", "left-neighbour table", "neighbours table")):
        value = last[f"eval/baseline/{key}_acc"]
        assert line.get_label() == f"{name} {value:.4f}" and list(line.get_ydata()) == [value, value]
    assert len(lines) == 5


def test_failed_and_running_runs_are_marked(sweep, tmp_path):
    for name, status in (("failed", {"status": "failed", "error": "data.path: file not found: x"}), ("live", {"status": "running"})):
        d = tmp_path / name
        shutil.copytree(sweep / "0", d)
        (d / "status.json").write_text(json.dumps(status))
    md, runs = cmp.compare([sweep, tmp_path / "failed", tmp_path / "live"], out=tmp_path / "o")
    assert [r["status"] for r in runs] == ["completed", "completed", "failed", "running"]
    assert "failed" in md and "file not found" in md and "running" in md
    # their scores are from earlier steps than the completed runs': listed, never ranked with them
    assert sorted(r["rank"] for r in runs[:2]) == [1, 2] and [r["rank"] for r in runs[2:]] == [None, None]
    assert "2 run(s) (failed, live) did not complete" in md


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no runs found"):
        cmp.compare([tmp_path])


def test_runs_on_different_exams_are_not_ranked_together(tmp_path):
    """Two runs scored on different exams (another exam length): the table ranks each within its own exam
    and says so, instead of ranking their accuracies against each other."""
    for i, length in enumerate((128, 64)):
        _sweep_job(tmp_path / str(i), [f"trainer.exam_length={length}", "trainer.max_steps=2", "logger=none"])
    md, runs = cmp.compare([tmp_path], out=tmp_path, with_plot=False)
    exams = {r["exam_id"] for r in runs}
    assert len(exams) == 2 and None not in exams
    assert [r["rank"] for r in runs] == [1, 1]
    assert "took 2 different exams" in md and "not comparable" in md
    acc_ax = cmp.figure(runs, cmp.differing_keys(runs)).axes[1]
    assert len(acc_ax.get_lines()) == 2  # no table line: each exam has its own tables


# ---- seed statistics and Welch's t-test, against scipy ----------------------------------------------------

def _fake_run(d, seed, ratio, acc, status="completed"):
    """A run dir as a sweep leaves it, written by hand: its config, two exam records (the last one is the
    final value) and its status."""
    from omegaconf import OmegaConf

    (d / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"seed": seed, "masking": {"ratio": ratio}}), d / ".hydra" / "config.yaml")
    records = [{"step": 2, "eval/mlm_acc": acc / 2, "eval/exam_id": "exam-1"},
               {"step": 4, "eval/mlm_acc": acc, "eval/exam_id": "exam-1"}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (d / "status.json").write_text(json.dumps({"status": status}))


def _groups_of(root, groups: dict):
    """Lay out `groups` ({ratio: [(acc, status), ...]}, seeds numbered from 1 within each group) under root
    and compare them; return the Markdown and the groups' CSV rows by ratio."""
    i = 0
    for ratio, runs in groups.items():
        for seed, (acc, status) in enumerate(runs, 1):
            _fake_run(root / str(i), seed, ratio, acc, status)
            i += 1
    md, _ = cmp.compare([root], out=root / "out", with_plot=False)
    rows = list(csv.DictReader((root / "out" / "comparison_groups.csv").open()))
    return md, {float(r["group"].removeprefix("masking.ratio=")): r for r in rows}


def _expected(values):
    """Mean, sample sd and the 95% t interval of the mean, computed here with numpy and scipy."""
    import numpy as np
    from scipy import stats

    x = np.asarray(values, dtype=float)
    mean, sd = x.mean(), x.std(ddof=1)
    low, high = stats.t.interval(0.95, df=len(x) - 1, loc=mean, scale=stats.sem(x))
    return mean, sd, low, high


@pytest.mark.parametrize("case", ["significant", "within noise"])
def test_seed_groups_match_scipy_and_call_the_lead_on_each_side_of_p_005(tmp_path, case):
    """Two groups of seeds; the best one also has a failed and an interrupted seed with outlying values.
    Mean, sd (ddof 1), the 95% t interval and N of each group equal numpy/scipy's on the completed seeds only,
    the failed ones are listed as not counted, and the best group's p is scipy's Welch test: labelled
    significant just below 0.05 and within noise just above it (where Student's pooled test would be < 0.05)."""
    from scipy import stats

    best, other = ({"significant": [0.50, 0.52, 0.54, 0.56], "within noise": [0.46, 0.50, 0.54]}[case],
                   {"significant": [0.44, 0.47, 0.50], "within noise": [0.40, 0.41, 0.42, 0.43, 0.44]}[case])
    p = stats.ttest_ind(best, other, equal_var=False).pvalue
    if case == "significant":
        assert 0.01 < p < 0.05
    else:  # the data were chosen where the two tests disagree
        assert 0.05 < p < 0.1 and stats.ttest_ind(best, other, equal_var=True).pvalue < 0.05
    failed = [(0.05, "failed"), (0.99, "interrupted")]
    md, rows = _groups_of(tmp_path, {0.15: [(v, "completed") for v in best] + failed,
                                     0.4: [(v, "completed") for v in other]})
    m = "final/eval/mlm_acc"
    for ratio, values, not_counted in ((0.15, best, 2), (0.4, other, 0)):
        row = rows[ratio]
        mean, sd, low, high = _expected(values)
        assert int(row[f"{m} n"]) == len(values) and int(row["runs not counted"]) == not_counted
        assert float(row[f"{m} mean"]) == pytest.approx(mean, rel=1e-12)
        assert float(row[f"{m} sd"]) == pytest.approx(sd, rel=1e-12)
        assert float(row[f"{m} ci_low"]) == pytest.approx(low, rel=1e-12)
        assert float(row[f"{m} ci_high"]) == pytest.approx(high, rel=1e-12)
        assert row["seeds"].split() == [str(s) for s in range(1, len(values) + not_counted + 1)]  # listed
    assert rows[0.4]["best"] == ""
    assert rows[0.15]["best"] == ("best (significant)" if case == "significant" else "best (within noise)")
    assert f"Welch's t-test p = {p:.3g}" in md
    runs = [cmp.load_run(r) for r in cmp.find_runs([tmp_path])]
    groups, _ = cmp.seed_groups(runs, cmp.differing_keys(runs), m)
    assert next(g for g in groups if g["best"].startswith("best"))["p_vs_next"] == pytest.approx(p, rel=1e-9)


@pytest.mark.parametrize("means_differ", [False, True])
def test_seed_groups_with_no_spread_are_significant_only_when_their_means_differ(tmp_path, means_differ):
    """sd = 0 in both groups (t undefined): equal means are within noise, different means are significant."""
    other = 0.25 if means_differ else 0.5
    md, rows = _groups_of(tmp_path, {0.15: [(0.5, "completed")] * 3, 0.4: [(other, "completed")] * 3})
    m = "final/eval/mlm_acc"
    assert [float(rows[r][f"{m} sd"]) for r in (0.15, 0.4)] == [0.0, 0.0]
    best = [r["best"] for r in rows.values() if r["best"]]
    assert best == (["best (significant)"] if means_differ else ["best (within noise)"])


def test_copies_of_a_runs_config_are_not_runs(sweep, tmp_path):
    """W&B keeps a copy of a run's .hydra/ among its files, and a rollback moves a branch to abandoned/: neither
    is a run of its own (they once showed up as extra rows of 'unknown' status in every sweep summary)."""
    root = tmp_path / "sweep"
    shutil.copytree(sweep, root)
    for copy in ("0/wandb/offline-run-1/files", "1/abandoned/20261130-rolled-back"):
        shutil.copytree(root / "0" / ".hydra", root / copy / ".hydra")
    assert [p.name for p in cmp.find_runs([root])] == ["0", "1"]


def test_standing_names_every_table_on_its_side():
    b = {"eval/baseline/most_frequent_acc": 0.04, "eval/baseline/left_neighbour_acc": 0.16,
         "eval/baseline/neighbours_acc": 0.32}
    assert cmp.standing(0.2, b) == ("above the most-frequent token (0.0400) and the left-neighbour table (0.1600), "
                                    "below the neighbours table (0.3200)")
    assert cmp.standing(0.04, b).startswith("below the most-frequent token (0.0400), the left-neighbour")  # a tie is not above
    assert cmp.standing(0.5, b) == ("above the most-frequent token (0.0400), the left-neighbour table (0.1600) and "
                                    "the neighbours table (0.3200)")


def test_tied_scores_share_a_rank_and_the_csv_keeps_full_precision(sweep, tmp_path):
    """A run copied beside the sweep scores exactly what its original scores: both get the same rank, the next
    run the rank after both (1, 1, 3). summary.csv holds the numbers as the records have them (the Markdown
    rounds them to 4 digits)."""
    root = tmp_path / "runs"
    shutil.copytree(sweep, root)
    shutil.copytree(sweep / "0", root / "2")
    md, runs = cmp.compare([root], out=tmp_path / "o", with_plot=False)
    accs = [r["final/eval/mlm_acc"] for r in runs]
    assert accs[0] == accs[2] != accs[1]
    best_first = sorted(range(3), key=lambda i: -accs[i])
    expected = {0: [1, 3, 1], 1: [2, 1, 2]}[best_first[0]]
    assert [r["rank"] for r in runs] == expected
    rows = list(csv.DictReader((tmp_path / "o" / "comparison.csv").open()))
    for row, run in zip(rows, runs):
        last = [m for m in cmp.read_metrics(run["path"] / "metrics.jsonl") if "eval/mlm_acc" in m][-1]
        assert float(row["final eval mlm_acc"]) == last["eval/mlm_acc"]  # to the last bit, not 4 digits
        assert float(row["final eval mlm_loss"]) == last["eval/mlm_loss"]
        assert float(row["mean tokens/s"]) == run["mean_tokens_per_s"]
        assert int(row["rank"]) == run["rank"]
    assert f"| {accs[0]:.4g} |" in md  # the Markdown, for people, rounds

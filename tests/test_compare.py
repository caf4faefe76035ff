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
        _sweep_job(root / str(i), [f"masking.ratio={ratio}", "trainer.max_steps=4", "logger=none"])
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
    for ax in fig.axes:
        assert [l.get_label() for l in ax.get_lines()] == ["masking.ratio=0.15", "masking.ratio=0.4"]
        assert all(len(l.get_xdata()) == 2 for l in ax.get_lines())  # evals at steps 2 and 4


def test_failed_and_running_runs_are_marked(sweep, tmp_path):
    for name, status in (("failed", {"status": "failed", "error": "data.path: file not found: x"}), ("live", {"status": "running"})):
        d = tmp_path / name
        shutil.copytree(sweep / "0", d)
        (d / "status.json").write_text(json.dumps(status))
    md, runs = cmp.compare([sweep, tmp_path / "failed", tmp_path / "live"], out=tmp_path / "o")
    assert [r["status"] for r in runs] == ["completed", "completed", "failed", "running"]
    assert "failed" in md and "file not found" in md and "running" in md


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

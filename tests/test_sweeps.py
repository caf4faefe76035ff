"""Sweeps as users launch them: the ready definitions in multirun_sweeps/, a sweep with a failing job,
the joblib and submitit_local launchers, and the Optuna search. Each is one `python run.py -m ...`."""
import json

import pytest
import yaml

from bertexp.tracking import read_metrics
from conftest import run_cli

pytestmark = pytest.mark.slow
TINY = ["trainer=smoke", "logger=none"]


def _runs(d):
    return sorted((p for p in d.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def _statuses(d):
    return [json.loads((r / "status.json").read_text())["status"] for r in _runs(d)]


@pytest.mark.parametrize("name,n_runs", [("mask_ratio", 4), ("masking_grid", 10), ("mask_schedule", 4),
                                         ("corruption_vs_prediction", 4)])
def test_ready_sweep_definitions_run_with_one_command(tmp_path, name, n_runs):
    d = tmp_path / name
    r = run_cli(["-cd", "multirun_sweeps", "-cn", name, *TINY, f"hydra.sweep.dir={d}"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _statuses(d) == ["completed"] * n_runs
    summary = (d / "summary.csv").read_text().splitlines()
    assert len(summary) == n_runs + 1 and "masking.ratio" in summary[0]
    cfgs = [yaml.safe_load((run / ".hydra" / "config.yaml").read_text()) for run in _runs(d)]
    assert {c["experiment"] for c in cfgs} == {name}  # the W&B group of every run of the sweep
    swept = {
        "mask_ratio": [(0.15, "constant", None), (0.3, "constant", None), (0.45, "constant", None), (0.6, "constant", None)],
        "masking_grid": [(0.15, "constant", None), (0.4, "constant", None)],
        "mask_schedule": [(0.15, "constant", None), (0.3, "constant", None), (0.3, "cosine", None), (0.3, "linear", None)],
        "corruption_vs_prediction": [(0.15, "constant", 0.15), (0.15, "constant", 0.4), (0.4, "constant", 0.15),
                                     (0.4, "constant", 0.4)],
    }[name]
    got = sorted({(c["masking"]["ratio"], c["masking"]["schedule"], c["masking"]["prediction_ratio"]) for c in cfgs})
    assert got == swept
    if name == "masking_grid":
        assert {c["masking"]["_target_"].rsplit(".", 1)[1] for c in cfgs} >= {"PmiMasking", "SpanMasking"}


def test_failed_job_is_listed_and_others_kept(tmp_path):
    d = tmp_path / "s"
    r = run_cli(["-m", "data.max_length=64,1000,32", *TINY, f"hydra.sweep.dir={d}"])
    assert r.returncode == 1  # the sweep says a job failed...
    assert _statuses(d) == ["completed", "failed", "completed"]  # ...after running all of them
    md = (d / "summary.md").read_text()
    assert "exceeds the model's position limit" in md and md.count("completed") == 2
    assert read_metrics(d / "2" / "metrics.jsonl")  # the job after the failure ran and logged
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_parallel_launchers(tmp_path, launcher):
    d = tmp_path / launcher
    r = run_cli(["-m", f"hydra/launcher={launcher}", "masking.ratio=0.15,0.4", *TINY, "trainer.max_steps=10", f"hydra.sweep.dir={d}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert _statuses(d) == ["completed", "completed"]
    for run in _runs(d):
        assert max(m["step"] for m in read_metrics(run / "metrics.jsonl")) == 10
    assert "Sweep summary" in r.stdout and (d / "summary.md").is_file()


def test_optuna_search_reports_best(tmp_path):
    d = tmp_path / "optuna"
    r = run_cli(["-cd", "multirun_sweeps", "-cn", "optuna_lr_ratio", "hydra.sweeper.n_trials=3", *TINY, f"hydra.sweep.dir={d}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_runs(d)) == 3
    best = yaml.safe_load((d / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"optim.lr", "masking.ratio"} and 0 <= best["best_value"] <= 1
    assert 5e-4 <= best["best_params"]["optim.lr"] <= 5e-3

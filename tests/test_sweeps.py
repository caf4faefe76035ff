"""Sweeps as users launch them: the ready definitions in multirun_sweeps/, a sweep with a failing job,
the joblib and submitit_local launchers, and the Optuna search. Each is one `python run.py -m ...`."""
import json

import pytest
import yaml

from bertexp.tracking import read_metrics
from conftest import run_cli, run_here

pytestmark = pytest.mark.slow
TINY = ["trainer=smoke", "logger=none"]


def _runs(d):
    return sorted((p for p in d.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def _statuses(d):
    return [json.loads((r / "status.json").read_text())["status"] for r in _runs(d)]


SWEPT = {  # (masking.ratio, masking.schedule, masking.prediction_ratio) of each ready sweep's jobs
    "mask_ratio": [(0.15, "constant", None), (0.3, "constant", None), (0.45, "constant", None), (0.6, "constant", None)],
    "masking_grid": [(0.15, "constant", None), (0.4, "constant", None)],
    "mask_schedule": [(0.15, "constant", None), (0.3, "constant", None), (0.3, "cosine", None), (0.3, "linear", None)],
    "corruption_vs_prediction": [(0.15, "constant", 0.15), (0.15, "constant", 0.4), (0.4, "constant", 0.15),
                                 (0.4, "constant", 0.4)],
}


# mask_schedule and corruption_vs_prediction are token masking like mask_ratio: composing their jobs
# (test_every_ready_sweep_expands_to_valid_jobs) covers what is theirs; running them would repeat mask_ratio
@pytest.mark.parametrize("name,n_runs", [("mask_ratio", 4), ("masking_grid", 5)])
def test_ready_sweep_definitions_run_with_one_command(tmp_path, monkeypatch, capfd, name, n_runs):
    d = tmp_path / name
    # the strategy grid at one of its two ratios (a command-line value replaces the file's list): its five
    # strategies are what is new in it; the ratio list is mask_ratio's business
    narrow = ["masking.ratio=0.4"] if name == "masking_grid" else []
    r = run_here(monkeypatch, capfd, ["-cd", "multirun_sweeps", "-cn", name, *TINY, *narrow, f"hydra.sweep.dir={d}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert _statuses(d) == ["completed"] * n_runs
    summary = (d / "summary.csv").read_text().splitlines()
    assert len(summary) == n_runs + 1 and ("masking.ratio" if name != "masking_grid" else "masking") in summary[0]
    cfgs = [yaml.safe_load((run / ".hydra" / "config.yaml").read_text()) for run in _runs(d)]
    assert {c["experiment"] for c in cfgs} == {name}  # the W&B group of every run of the sweep
    swept = [(0.4, "constant", None)] if name == "masking_grid" else SWEPT[name]
    got = sorted({(c["masking"]["ratio"], c["masking"]["schedule"], c["masking"]["prediction_ratio"]) for c in cfgs})
    assert got == swept
    if name == "masking_grid":
        assert {c["masking"]["_target_"].rsplit(".", 1)[1] for c in cfgs} == {
            "TokenMasking", "WholeWordMasking", "SpanMasking", "NgramMasking", "PmiMasking"}


def test_every_ready_sweep_expands_to_valid_jobs():
    """Each file in multirun_sweeps/ composes, and every job its sweeper params make composes and
    instantiates its masking (the CLI runs above train three of them)."""
    import itertools

    from hydra import compose as hc
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    import bertexp.resolvers  # noqa: F401
    import bertexp.schema  # noqa: F401
    from conftest import ROOT

    conf = [f"hydra.searchpath=[file://{ROOT / 'conf'}]"]  # what run.py's config_path adds to -cd
    for path in sorted((ROOT / "multirun_sweeps").glob("*.yaml")):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(path.parent), version_base="1.3"):
            cfg = hc(path.stem, overrides=conf, return_hydra_config=True)
            params = cfg.hydra.sweeper.get("params") or {}
            if "optuna" in path.stem:
                continue  # Optuna's params are distributions, run by test_optuna_search_reports_best
            grid = [[f"{k}={v}" for v in str(vals).split(",")] for k, vals in params.items()]
            jobs = list(itertools.product(*grid))
            assert jobs, path.name
            got = set()
            for job in jobs:
                job_cfg = hc(path.stem, overrides=[*conf, *job])
                masker = instantiate(job_cfg.masking)
                assert 0 < masker.ratio < 1, (path.name, job)
                m = job_cfg.masking
                got.add((m.ratio, m.schedule, m.get("prediction_ratio")))
            if path.stem in SWEPT:
                assert sorted(got) == SWEPT[path.stem], path.name


def test_failed_job_is_listed_and_others_kept(tmp_path, monkeypatch, capfd):
    d = tmp_path / "s"
    r = run_here(monkeypatch, capfd, ["-m", "data.max_length=64,1000,32", *TINY, f"hydra.sweep.dir={d}"])
    assert r.returncode == 1  # the sweep says a job failed...
    assert _statuses(d) == ["completed", "failed", "completed"]  # ...after running all of them
    md = (d / "summary.md").read_text()
    assert "exceeds the model's position limit" in md and md.count("completed") == 2
    assert read_metrics(d / "2" / "metrics.jsonl")  # the job after the failure ran and logged
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_parallel_launchers(tmp_path, launcher):
    d = tmp_path / launcher
    args = ["-m", f"hydra/launcher={launcher}", "masking.ratio=0.15,0.4", *TINY, "trainer.max_steps=6",
            "trainer.save_every=3", f"hydra.sweep.dir={d}"]
    r = run_cli(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _statuses(d) == ["completed", "completed"]
    for run in _runs(d):
        assert max(m["step"] for m in read_metrics(run / "metrics.jsonl")) == 6
    assert "Sweep summary" in r.stdout and (d / "summary.md").is_file()
    if launcher != "joblib":
        return
    # the joblib sweep resumes too: job 1 "cut off" after its step-3 checkpoint (its later checkpoint gone,
    # its status still running); the same command again leaves job 0 alone and finishes job 1
    import shutil

    shutil.rmtree(d / "1" / "checkpoints" / "step_0000006")
    (d / "1" / "status.json").write_text(json.dumps({"status": "running", "name": "masking.ratio=0.4"}))
    before = (d / "0" / "metrics.jsonl").read_bytes()
    r = run_cli(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (d / "0" / "metrics.jsonl").read_bytes() == before
    assert _statuses(d) == ["completed", "completed"]
    steps = [m["step"] for m in read_metrics(d / "1" / "metrics.jsonl") if "train/loss" in m]
    assert steps == list(range(1, 7))


def test_optuna_search_reports_best(tmp_path, monkeypatch, capfd):
    d = tmp_path / "optuna"
    r = run_here(monkeypatch, capfd, ["-cd", "multirun_sweeps", "-cn", "optuna_lr_ratio", "hydra.sweeper.n_trials=3", *TINY, f"hydra.sweep.dir={d}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_runs(d)) == 3
    best = yaml.safe_load((d / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"optim.lr", "masking.ratio"} and 0 <= best["best_value"] <= 1
    assert 5e-4 <= best["best_params"]["optim.lr"] <= 5e-3


def test_seeded_sweep_groups_with_error_bars_and_a_wandb_summary_run(tmp_path, monkeypatch, capfd):
    """2 ratios x 2 seeds: the summary and bertexp.compare give two groups with mean, sd, CI and N = 2; the
    plot has bands; --x tokens and --x flops work; W&B gets the tables in a job_type=summary run."""
    d = tmp_path / "seeds"
    r = run_here(monkeypatch, capfd, ["-m", "trainer=smoke", "logger.mode=offline", "masking.ratio=0.15,0.4", "seed=1,2",
                 f"hydra.sweep.dir={d}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Over seeds" in r.stdout and "Welch's t-test" in r.stdout
    import csv

    rows = list(csv.DictReader((d / "summary_groups.csv").read_text().splitlines()))
    assert [g["group"] for g in rows] == ["masking.ratio=0.15", "masking.ratio=0.4"]
    runs = {json.loads((run / "status.json").read_text())["name"]: run for run in _runs(d)}
    for g, ratio in zip(rows, ("0.15", "0.4")):
        accs = [read_metrics(runs[f"masking.ratio={ratio},seed={s}"] / "metrics.jsonl")[-1]["eval/mlm_acc"] for s in (1, 2)]
        n, mean = int(g["final/eval/mlm_acc n"]), float(g["final/eval/mlm_acc mean"])
        sd = float(g["final/eval/mlm_acc sd"])
        assert n == 2 and mean == pytest.approx(sum(accs) / 2, rel=1e-3)
        assert sd == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5, rel=1e-3, abs=1e-6)
        half = 12.706 * sd / 2**0.5  # t(0.975, 1 d.f.) = 12.706
        assert float(g["final/eval/mlm_acc ci_low"]) == pytest.approx(mean - half, rel=1e-3, abs=1e-5)
        assert float(g["final/eval/mlm_acc ci_high"]) == pytest.approx(mean + half, rel=1e-3, abs=1e-5)
    assert sum(g["best"].startswith("best") for g in rows) == 1
    from bertexp.compare import main as compare_main

    for x in ("tokens", "flops"):
        assert compare_main([str(d), "--x", x, "--out", str(tmp_path / x)]) == 0
        assert (tmp_path / x / "comparison.png").stat().st_size > 10_000
        assert (tmp_path / x / "comparison_groups.csv").is_file()
    from wandb_reader import inspect, wandb_files

    summary_runs = [inspect(f)["run"] for f in wandb_files(d)]
    assert len(summary_runs) == 1 and summary_runs[0]["job_type"] == "summary"
    logged = {k.split(".")[0] for k in set().union(*inspect(wandb_files(d)[0])["history"])}  # tables: key.field
    assert {"sweep/runs", "sweep/groups", "sweep/plot"} <= logged, logged
    job_groups = {inspect(wandb_files(run)[0])["run"]["run_group"] for run in _runs(d)}
    assert job_groups == {summary_runs[0]["run_group"]}
    # the runs table as W&B holds it: whole numbers as ints, each row named by its job and W&B run id
    (table_file,) = wandb_files(d)[0].parent.glob("files/media/table/sweep/runs_*.table.json")
    table = json.loads(table_file.read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["wandb_id"] for r in rows] == [(run / "wandb_id").read_text() for run in _runs(d)]
    assert all(isinstance(r["rank"], int) and isinstance(r["steps"], int) for r in rows)
    assert all(isinstance(r["final eval mlm_acc"], float) for r in rows)


def _start_sweep(args):
    import subprocess
    import sys

    from conftest import ROOT

    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def test_killed_sweep_resumes_where_it_stopped(tmp_path, monkeypatch, capfd):
    """SIGKILL during the second of three jobs, then the same command again: job 1 is not re-run (its
    metrics byte-identical), job 2 resumes from its checkpoint with its W&B id, job 3 runs, one summary."""
    import hashlib
    import signal
    import time

    d = tmp_path / "s"
    args = ["-m", "trainer=smoke", "logger.mode=offline", "trainer.max_steps=8", "trainer.save_every=2",
            "trainer.eval_every=4", "masking.ratio=0.1,0.2,0.3", f"hydra.sweep.dir={d}"]
    p = _start_sweep(args)
    deadline = time.time() + 300
    while not (d / "1" / "checkpoints" / "step_0000004").is_dir():
        assert p.poll() is None and time.time() < deadline, "the sweep ended before its second job checkpointed"
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert _statuses(d) == ["completed", "running"]
    digest = hashlib.sha256((d / "0" / "metrics.jsonl").read_bytes()).hexdigest()
    wandb_id = (d / "1" / "wandb_id").read_text()
    r = run_here(monkeypatch, capfd, args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert hashlib.sha256((d / "0" / "metrics.jsonl").read_bytes()).hexdigest() == digest
    log = r.stdout + r.stderr
    assert log.count("already completed") == 1 and "Checkpoint found: resuming from step" in log
    assert _statuses(d) == ["completed"] * 3
    assert (d / "1" / "wandb_id").read_text() == wandb_id
    steps = [m["step"] for m in read_metrics(d / "1" / "metrics.jsonl") if "train/loss" in m]
    assert steps == list(range(1, 9))  # nothing lost, nothing twice
    md = (d / "summary.md").read_text()
    assert md.count("completed") == 3
    # the same dir with another value for a job: an error, and the old job's files keep their config
    r = run_here(monkeypatch, capfd, [*args[:-2], "masking.ratio=0.1,0.25,0.3", f"hydra.sweep.dir={d}"])
    assert r.returncode == 2 and "job 1" in r.stderr and "masking.ratio: 0.2 -> 0.25" in r.stderr
    assert "ratio: 0.2" in (d / "1" / ".hydra" / "config.yaml").read_text()


def test_a_job_that_failed_on_a_bad_value_can_be_fixed_in_place(tmp_path, monkeypatch, capfd):
    """Job 1 fails on masking.ratio=1.5 before any checkpoint; re-running with 0.5 starts it afresh (nothing
    of it to keep) while job 0, completed, is left alone."""
    d = tmp_path / "fix"
    r = run_here(monkeypatch, capfd, ["-m", *TINY, "masking.ratio=0.15,1.5", f"hydra.sweep.dir={d}"])
    assert r.returncode == 1 and _statuses(d) == ["completed", "failed"]
    before = (d / "0" / "metrics.jsonl").read_bytes()
    r = run_here(monkeypatch, capfd, ["-m", *TINY, "masking.ratio=0.15,0.5", f"hydra.sweep.dir={d}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert _statuses(d) == ["completed", "completed"] and (d / "0" / "metrics.jsonl").read_bytes() == before
    assert json.loads((d / "1" / "run_config.json").read_text())["masking.ratio"] == 0.5

"""A run dir belongs to one experiment (bertexp.rundir): a resume that would change the result is refused and
leaves the dir as it was, two runs never share a dir, a rollback moves the abandoned branch aside, and every
attempt records its provenance."""
import json
import shutil
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from bertexp.checkpoint import checkpoint_dirs
from bertexp.tracking import read_metrics
from conftest import ROOT, compose, run_cli, run_here, run_main, signal_at_training_call
from wandb_reader import inspect, wandb_files

SMOKE = ["trainer=smoke", "trainer.exam_pairs=32"]


def _job(monkeypatch, run_dir, args) -> int:
    return run_main(monkeypatch, [*args, f"hydra.run.dir={run_dir}"])


def _train_steps(run_dir):
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]


@pytest.mark.slow
def test_resuming_with_other_values_is_refused_and_the_run_keeps_its_config(tmp_path, monkeypatch, capfd):
    """The issue's acceptance, as typed: a finished run at ratio 0.15 in D, then ratio 0.4 into D: exit 2 with
    one line naming masking.ratio; D's .hydra files, W&B run, metrics and status still say what it trained."""
    d = tmp_path / "D"
    r = run_here(monkeypatch, capfd, [*SMOKE, "logger.mode=offline", "masking.ratio=0.15", f"hydra.run.dir={d}"])
    assert r.returncode == 0, r.stderr[-2000:]
    before = {f: (d / f).read_bytes() for f in ("metrics.jsonl", "status.json", ".hydra/config.yaml", ".hydra/overrides.yaml")}
    r = run_here(monkeypatch, capfd, [*SMOKE, "logger.mode=offline", "masking.ratio=0.4", "optim.lr=1e-4",
                                      f"hydra.run.dir={d}"])
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "masking.ratio: 0.15 -> 0.4" in errors[0] and "optim.lr" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert {f: (d / f).read_bytes() for f in before} == before
    assert OmegaConf.load(d / ".hydra" / "config.yaml").masking.ratio == 0.15
    files = wandb_files(d)
    assert len(files) == 1 and inspect(files[0])["run"]["config"]["update"]["masking"]["ratio"] == 0.15


def test_a_checkpoint_continued_in_a_new_dir_with_other_values_is_refused(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _job(monkeypatch, a, [*SMOKE, "logger=none"]) == 0
    code = _job(monkeypatch, b, [*SMOKE, "logger=none", "masking.ratio=0.25", f"trainer.resume={a}/checkpoints/last"])
    assert code == 2 and not checkpoint_dirs(b)
    # with the same values it continues (a new dir, a new W&B run: it is not the first dir's run any more)
    assert _job(monkeypatch, b, [*SMOKE, "logger=none", "trainer.max_steps=6", "trainer.allow_changes=[trainer.max_steps]",
                                 f"trainer.resume={a}/checkpoints/last"]) == 0
    assert _train_steps(b) == [5, 6] and [s for s, _ in checkpoint_dirs(b)] == [6]
    change = json.loads((b / "config_changes.jsonl").read_text().splitlines()[0])
    assert change == {"step": 4, "changes": {"trainer.max_steps": [4, 6]}, "time": change["time"]}


def test_allowed_changes_are_recorded_and_unknown_keys_refused(tmp_path, monkeypatch):
    d = tmp_path / "run"
    assert _job(monkeypatch, d, [*SMOKE, "logger=none"]) == 0
    assert _job(monkeypatch, d, [*SMOKE, "logger=none", "trainer.max_steps=6"]) == 2  # not allowed: refused
    assert _train_steps(d) == [1, 2, 3, 4]
    assert _job(monkeypatch, d, [*SMOKE, "logger=none", "trainer.max_steps=6", "trainer.allow_changes=[trainer.maxsteps]"]) == 2
    # keys that cannot change what is trained may differ freely
    assert _job(monkeypatch, d, [*SMOKE, "logger=none", "trainer.max_steps=6", "trainer.allow_changes=[trainer.max_steps]",
                                 "trainer.log_every=2", "data.num_workers=0"]) == 0
    assert _train_steps(d) == [1, 2, 3, 4, 6]
    assert json.loads((d / "run_config.json").read_text())["trainer.max_steps"] == 6
    assert json.loads((d / "checkpoints" / "last" / "run_config.json").read_text())["trainer.max_steps"] == 6
    assert [json.loads(line)["changes"] for line in (d / "config_changes.jsonl").read_text().splitlines()] == [
        {"trainer.max_steps": [4, 6]}]


@pytest.mark.slow
def test_two_runs_started_together_get_two_dirs(tmp_path):
    """`for r in 0.2 0.3; do python run.py masking.ratio=$r & done`: two dirs, each with its own run."""
    procs = [subprocess.Popen([sys.executable, str(ROOT / "run.py"), *SMOKE, "logger=none", f"masking.ratio={r}"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0.2, 0.3)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    dirs = sorted(p.parent.parent for p in (tmp_path / "outputs").rglob(".hydra/config.yaml"))
    assert len(dirs) == 2
    ratios = sorted(OmegaConf.load(d / ".hydra" / "config.yaml").masking.ratio for d in dirs)
    assert ratios == [0.2, 0.3]
    for d in dirs:
        assert json.loads((d / "status.json").read_text())["status"] == "completed"
        assert _train_steps(d) == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_run_dir_is_locked_while_a_live_process_writes_it(tmp_path):
    d = tmp_path / "run"
    args = [sys.executable, str(ROOT / "run.py"), *SMOKE, "logger=none", "trainer.max_steps=400", f"hydra.run.dir={d}"]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not _train_steps(d):
            assert first.poll() is None and time.time() < deadline, "the first run did not start training"
            time.sleep(0.2)
        r = run_cli([*SMOKE, "logger=none", "masking.ratio=0.3", f"hydra.run.dir={d}"])
        assert r.returncode == 2 and "is in use by a running job" in r.stderr, r.stderr[-2000:]
        assert f"pid {first.pid}" in r.stderr
        assert "masking.ratio" not in (d / ".hydra" / "overrides.yaml").read_text()  # the live run's files put back
    finally:
        first.kill()
        first.wait()


def test_rollback_moves_the_abandoned_branch_aside(tmp_path, monkeypatch):
    """trainer.resume=RUN/checkpoints/step_2 in RUN: the later checkpoints and the records after step 2 move
    to RUN/abandoned/ (nothing deleted), metrics.jsonl holds one branch, the new checkpoint is not pruned
    by the old ones (keep_checkpoints=1), resume=auto then follows the new branch, and W&B gets a new run."""
    d = tmp_path / "run"
    base = [*SMOKE, "logger.mode=offline", "trainer.max_steps=6", "trainer.keep_checkpoints=0"]
    assert _job(monkeypatch, d, base) == 0
    old_metrics = (d / "metrics.jsonl").read_text()
    old_id = (d / "wandb_id").read_text()
    assert _job(monkeypatch, d, [*base, "trainer.keep_checkpoints=1", f"trainer.resume={d}/checkpoints/step_0000002",
                                 "trainer.max_steps=4", "trainer.allow_changes=[trainer.max_steps]"]) == 0
    abandoned = list((d / "abandoned").iterdir())
    assert len(abandoned) == 1 and abandoned[0].name.endswith("rolled-back-to-step_0000002")
    assert sorted(p.name for p in (abandoned[0] / "checkpoints").iterdir()) == ["step_0000004", "step_0000006"]
    assert (abandoned[0] / "metrics.jsonl").read_text() == old_metrics
    assert _train_steps(d) == [1, 2, 3, 4]  # one branch: the old steps 3-6 are gone from it
    assert [s for s, _ in checkpoint_dirs(d)] == [4] and (d / "checkpoints" / "last").resolve().name == "step_0000004"
    new_id = (d / "wandb_id").read_text()
    assert new_id != old_id
    run = inspect(sorted(wandb_files(d))[-1])["run"]
    assert run["config"]["update"]["provenance"]["branch"]["previous_wandb_id"] == old_id
    # the next plain resume continues the new branch
    assert _job(monkeypatch, d, [*base, "trainer.keep_checkpoints=1", "trainer.max_steps=5",
                                 "trainer.allow_changes=[trainer.max_steps]"]) == 0
    assert _train_steps(d) == [1, 2, 3, 4, 5] and (d / "wandb_id").read_text() == new_id


def test_a_fresh_start_in_a_used_dir_moves_the_old_run_aside(tmp_path, monkeypatch):
    d = tmp_path / "run"
    assert _job(monkeypatch, d, [*SMOKE, "logger=none"]) == 0
    (d / "downstream" / "sentiment").mkdir(parents=True)  # as trainer.downstream leaves it: results of this branch
    (d / "downstream" / "sentiment" / "summary.json").write_text("{}")
    assert _job(monkeypatch, d, [*SMOKE, "logger=none", "masking.ratio=0.4", "trainer.resume=never",
                                 "trainer.max_steps=2"]) == 0
    (old,) = (d / "abandoned").iterdir()
    assert old.name.endswith("fresh-start")
    assert (old / "downstream" / "sentiment" / "summary.json").is_file() and not (d / "downstream").exists()
    assert sorted(p.name for p in (old / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    assert _train_steps(d) == [1, 2] and [s for s, _ in checkpoint_dirs(d)] == [2]
    assert json.loads((d / "checkpoints" / "last" / "run_config.json").read_text())["masking.ratio"] == 0.4


def test_an_attempt_cut_off_before_its_first_checkpoint_guards_the_dir_and_keeps_its_records(tmp_path, monkeypatch):
    """A run killed before its first checkpoint (its checkpoints removed, as kill -9 at step 4 of a long
    save_every leaves it): another config into the dir is refused; the same config starts afresh, with the
    cut-off attempt's records moved to abandoned/ (not deleted) and a new W&B run."""
    d = tmp_path / "run"
    base = [*SMOKE, "logger.mode=offline", "masking.ratio=0.15"]
    assert _job(monkeypatch, d, base) == 0
    shutil.rmtree(d / "checkpoints")
    (d / "status.json").write_text(json.dumps({"status": "running"}))
    old_metrics, old_id = (d / "metrics.jsonl").read_text(), (d / "wandb_id").read_text()
    assert _job(monkeypatch, d, [*SMOKE, "logger.mode=offline", "masking.ratio=0.4", "optim.lr=1e-4"]) == 2
    assert (d / "metrics.jsonl").read_text() == old_metrics and (d / "wandb_id").read_text() == old_id
    assert OmegaConf.load(d / ".hydra" / "config.yaml").masking.ratio == 0.15  # the dir's files put back
    assert _job(monkeypatch, d, base) == 0
    (old,) = (d / "abandoned").iterdir()
    assert old.name.endswith("restarted-without-checkpoint")
    assert (old / "metrics.jsonl").read_text() == old_metrics
    assert _train_steps(d) == [1, 2, 3, 4] and (d / "wandb_id").read_text() != old_id


def test_a_stopped_run_that_branched_off_is_told_to_resume_with_resume_auto(tmp_path, monkeypatch, capsys):
    """Started with trainer.resume=never and stopped by SIGTERM: 'the same command' would start afresh
    again, so the message says to resume with trainer.resume=auto; doing so continues from the checkpoint."""
    import signal

    d = tmp_path / "run"
    assert _job(monkeypatch, d, [*SMOKE, "logger=none"]) == 0
    signal_at_training_call(monkeypatch, signal.SIGTERM, 3)
    assert _job(monkeypatch, d, [*SMOKE, "logger=none", "trainer.resume=never", "trainer.max_steps=8"]) == 143
    assert f"hydra.run.dir={d}, but trainer.resume=auto instead of trainer.resume=never" in capsys.readouterr().err
    monkeypatch.undo()
    assert _job(monkeypatch, d, [*SMOKE, "logger=none", "trainer.max_steps=8"]) == 0
    assert _train_steps(d) == list(range(1, 9))


def test_provenance_names_the_code_packages_tokens_and_exam(tmp_path, monkeypatch):
    import torch
    import transformers

    d = tmp_path / "run"
    assert _job(monkeypatch, d, [*SMOKE, "logger.mode=offline"]) == 0
    (attempt,) = json.loads((d / "provenance.json").read_text())["attempts"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    assert attempt["commit"] == head and attempt["dirty"] is dirty
    assert attempt["packages"]["torch"] == torch.__version__
    assert attempt["packages"]["transformers"] == transformers.__version__
    evals = [r for r in read_metrics(d / "metrics.jsonl") if "eval/exam_id" in r]
    assert {r["eval/exam_id"] for r in evals} == {attempt["exam_id"]}
    from bertexp.data.cache import cache_root

    import hashlib

    builds = {hashlib.sha1(m.read_bytes()).hexdigest() for m in cache_root(None).glob("tokens-*/meta.json")}
    assert attempt["tokens_build"] in builds
    config = inspect(wandb_files(d)[0])["run"]["config"]["update"]
    assert config["provenance"]["commit"] == head and config["provenance"]["exam_id"] == attempt["exam_id"]
    resolved = json.loads((d / "run_config.json").read_text())
    assert resolved["masking.ratio"] == compose([]).masking.ratio and resolved["logger.mode"] == "offline"


def test_the_guard_compares_effective_values_not_their_spelling(tmp_path, monkeypatch, capsys):
    """optim.optimizer.lr=1e-3 on the first command and the plain command on the resume: the peak lr would
    change, so the resume is refused naming that key. A change of optim.lr, which optim.optimizer.lr follows,
    is one change, allowed and recorded under its own name."""
    default = compose().optim.lr
    d = tmp_path / "run"
    assert _job(monkeypatch, d, [*SMOKE, "logger=none", "optim.optimizer.lr=1e-3"]) == 0
    longer = ["trainer.max_steps=6", "trainer.allow_changes=[trainer.max_steps]"]
    capsys.readouterr()
    assert _job(monkeypatch, d, [*SMOKE, "logger=none", *longer]) == 2
    assert f"optim.optimizer.lr: 0.001 -> {default!r}" in capsys.readouterr().err
    assert _train_steps(d) == [1, 2, 3, 4]
    e = tmp_path / "e"
    assert _job(monkeypatch, e, [*SMOKE, "logger=none"]) == 0
    assert _job(monkeypatch, e, [*SMOKE, "logger=none", "optim.lr=1e-3", "trainer.max_steps=6",
                                 "trainer.allow_changes=[optim.lr,trainer.max_steps]"]) == 0
    (change,) = read_metrics(e / "config_changes.jsonl")
    assert change["changes"] == {"optim.lr": [default, 0.001], "trainer.max_steps": [4, 6]}


def test_interpolation_sources_resolve_relative_and_absolute_references():
    from bertexp.rundir import interpolation_sources

    cfg = OmegaConf.create({"optim": {"lr": 1.0, "optimizer": {"lr": "${..lr}", "x": "${optim.lr}", "y": "${.z}",
                                                                "z": 2, "path": "${oc.env:HOME}"}}})
    assert interpolation_sources(cfg) == {"optim.optimizer.lr": "optim.lr", "optim.optimizer.x": "optim.lr",
                                          "optim.optimizer.y": "optim.optimizer.z"}


def test_config_changes_of_an_abandoned_branch_leave_with_it(tmp_path, monkeypatch):
    """Changes allowed at steps 4 and 6, then a rollback to step 4: the branch that goes on lists only the
    change made now (the two made on the abandoned branch move to abandoned/ with it); a fresh start lists none."""
    d = tmp_path / "run"
    base = [*SMOKE, "logger=none", "trainer.keep_checkpoints=0"]

    def steps(n, *more):
        return [*base, f"trainer.max_steps={n}", "trainer.allow_changes=[trainer.max_steps]", *more]

    assert _job(monkeypatch, d, base) == 0
    assert _job(monkeypatch, d, steps(6)) == 0
    assert _job(monkeypatch, d, steps(8)) == 0
    assert [c["step"] for c in read_metrics(d / "config_changes.jsonl")] == [4, 6]
    assert _job(monkeypatch, d, steps(7, f"trainer.resume={d}/checkpoints/step_0000004")) == 0
    assert [(c["step"], c["changes"]) for c in read_metrics(d / "config_changes.jsonl")] == [
        (4, {"trainer.max_steps": [4, 7]})]
    (aside,) = (d / "abandoned").iterdir()
    assert [c["step"] for c in read_metrics(aside / "config_changes.jsonl")] == [4, 6]
    assert _job(monkeypatch, d, [*base, "trainer.max_steps=7", "trainer.resume=never"]) == 0
    assert read_metrics(d / "config_changes.jsonl") == []


def test_a_completed_sweep_job_runs_the_downstream_tasks_added_to_it(tmp_path, monkeypatch):
    """A completed job of a sweep is not run again, unless trainer.downstream now names a task it has no
    results for; once that task's results are there, it is skipped again."""
    from bertexp.lifecycle import claim

    d = tmp_path / "0"
    assert _job(monkeypatch, d, [*SMOKE, "logger=none"]) == 0

    def skipped(cfg) -> bool:
        c = claim(cfg, d, sweep_job=0)
        c.release()
        return c.skip

    assert skipped(compose(SMOKE))
    added = compose([*SMOKE, "trainer.downstream=[sentiment]"])
    assert not skipped(added)
    (d / "downstream" / "sentiment").mkdir(parents=True)
    (d / "downstream" / "sentiment" / "summary.json").write_text("{}")
    assert skipped(added)


def test_optimizer_ranges_are_checked_before_the_vocabulary_is_trained(tmp_path, monkeypatch, capfd):
    """optim.schedule=step on an empty cache: one line at once, nothing built in the cache."""
    from conftest import ESSAY

    cache = tmp_path / "cache"
    r = run_here(monkeypatch, capfd, [*SMOKE, "logger=none", "data=text_file", f"data.path={ESSAY}",
                                      f"data.cache_dir={cache}", "optim.schedule=step", f"hydra.run.dir={tmp_path / 'r'}"])
    assert r.returncode == 2 and "optim.schedule='step' must be one of linear, cosine, wsd" in r.stderr, r.stderr[-2000:]
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_a_resume_on_another_corpus_is_refused(tmp_path, monkeypatch, capsys):
    """The corpus is part of what a run trains with: its file changed, or a relative data.path read from
    another directory, refuses the resume naming data.corpus_fingerprint (allowed only by name)."""
    from conftest import ESSAY

    text = ESSAY.read_text(encoding="utf-8")
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        (tmp_path / where / "corpus.txt").write_text(text if where == "a" else text[: len(text) // 2], encoding="utf-8")
    d = tmp_path / "run"
    data = [*SMOKE, "logger=none", "data=text_file", "data.path=corpus.txt"]
    longer = ["trainer.max_steps=6", "trainer.allow_changes=[trainer.max_steps]"]
    monkeypatch.chdir(tmp_path / "a")
    assert _job(monkeypatch, d, data) == 0
    monkeypatch.chdir(tmp_path / "b")
    capsys.readouterr()
    assert _job(monkeypatch, d, [*data, *longer]) == 2
    assert "data.corpus_fingerprint" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path / "a")
    (tmp_path / "a" / "corpus.txt").write_text(text + "\n最后一段是后来加上的。\n", encoding="utf-8")
    assert _job(monkeypatch, d, [*data, *longer]) == 2
    assert "data.corpus_fingerprint" in capsys.readouterr().err
    assert _train_steps(d) == [1, 2, 3, 4]
    assert _job(monkeypatch, d, [*data, "trainer.max_steps=6",
                                 "trainer.allow_changes=[trainer.max_steps,data.corpus_fingerprint]"]) == 0
    assert _train_steps(d) == [1, 2, 3, 4, 5, 6]


def test_a_run_recorded_before_keys_were_added_resumes(tmp_path, monkeypatch):
    """A run dir written by an older bertexp has no record of keys added since (model.attn_implementation,
    trainer.eval_at_start, the corpus fingerprint): they are not compared (the run could not have set them);
    a key it did record is still compared."""
    d = tmp_path / "run"
    assert _job(monkeypatch, d, [*SMOKE, "logger=none"]) == 0
    for f in (d / "run_config.json", d / "checkpoints" / "last" / "run_config.json"):
        old = json.loads(f.read_text())
        for key in ("model.attn_implementation", "trainer.eval_at_start", "data.corpus_fingerprint"):
            del old[key]
        f.write_text(json.dumps(old))
    longer = ["trainer.max_steps=6", "trainer.allow_changes=[trainer.max_steps]"]
    assert _job(monkeypatch, d, [*SMOKE, "logger=none", *longer, "masking.ratio=0.25"]) == 2
    assert _job(monkeypatch, d, [*SMOKE, "logger=none", *longer]) == 0
    assert _train_steps(d) == [1, 2, 3, 4, 5, 6]


def test_a_run_recorded_before_a_recipe_key_was_added_is_compared_with_what_it_did(tmp_path, monkeypatch, capsys):
    """Some keys added since change what a run trains: a record without model.position_init trained with random
    position rows, one without optim.optimizer.fused with the per-tensor AdamW (lifecycle.IMPLIED). Resuming it
    under today's defaults (sinusoidal, fused) is a change, refused in one line, not a silent new recipe."""
    d = tmp_path / "run"
    assert _job(monkeypatch, d, [*SMOKE, "logger=none"]) == 0
    for f in (d / "run_config.json", d / "checkpoints" / "last" / "run_config.json"):
        old = json.loads(f.read_text())
        for key in ("model.position_init", "optim.optimizer.fused"):
            del old[key]
        f.write_text(json.dumps(old))
    longer = ["trainer.max_steps=6", "trainer.allow_changes=[trainer.max_steps]"]
    assert _job(monkeypatch, d, [*SMOKE, "logger=none", *longer]) == 2
    err = capsys.readouterr().err
    assert "model.position_init: 'random' -> 'sinusoidal'" in err and "optim.optimizer.fused: None -> True" in err
    assert _job(monkeypatch, d, [*SMOKE, "logger=none", "model.position_init=random", "~optim.optimizer.fused",
                                 *longer]) == 0
    assert _train_steps(d) == [1, 2, 3, 4, 5, 6]

"""One Hydra job inside a sweep: how it is named, and what a signal or a crash in it does to the sweep.
In process (Hydra's real multirun, the basic launcher), so failures can be injected where they happen."""
import json
import signal
import sys
from types import SimpleNamespace

from omegaconf import OmegaConf

from conftest import run_main, signal_at_training_call

TINY = ["trainer=smoke", "trainer.max_steps=2", "logger=none"]


def _multirun(monkeypatch, sweep_dir, args):
    """`python run.py -m ARGS` in this process; returns the SystemExit code (None when it returned)."""
    return run_main(monkeypatch, ["-m", *args, f"hydra.sweep.dir={sweep_dir}"]) or None


def _status(d):
    return json.loads((d / "status.json").read_text())


def test_swept_keys_come_from_the_sweep_not_the_worker_argv(tmp_path, monkeypatch):
    """Under submitit a job runs in a worker whose argv is submitit's: the run name must still be the swept
    values, read from the sweep's multirun.yaml."""
    from bertexp.naming import swept_keys

    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": [
        "masking.ratio=0.15,0.4", "trainer.max_steps=5", "optim.lr=choice(1e-3,2e-3)"]}}}), tmp_path / "multirun.yaml")
    monkeypatch.setattr(sys, "argv", ["/usr/bin/python", "-u", "-m", "submitit.core._submit", str(tmp_path / ".submitit")])
    hc = SimpleNamespace(sweeper=OmegaConf.create({"params": None}), sweep=SimpleNamespace(dir=str(tmp_path)))
    assert swept_keys(hc) == {"masking.ratio", "optim.lr"}


def test_a_crashing_job_is_recorded_and_the_sweep_still_summarised(tmp_path, monkeypatch):
    """Out of memory (or any bug) in one job: that job is failed with its error, the next job runs, the
    summary is written, and the sweep exits 1."""
    import bertexp.train

    real = bertexp.train.run_training

    def run_training(cfg, run_dir, info):
        if int(cfg.seed) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(cfg, run_dir, info)

    monkeypatch.setattr(bertexp.train, "run_training", run_training)
    code = _multirun(monkeypatch, tmp_path, ["seed=1,2", *TINY])
    assert code == 1
    assert _status(tmp_path / "0") == {"status": "failed", "name": "seed=1", "error": "RuntimeError: CUDA out of memory (simulated)"}
    assert _status(tmp_path / "1")["status"] == "completed"
    assert (tmp_path / "summary.md").is_file(), "the sweep ended without its summary"
    summary = (tmp_path / "summary.md").read_text()
    assert "CUDA out of memory" in summary and "completed" in summary


def test_a_signal_stops_the_whole_sweep_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    """SIGTERM during job 0: it checkpoints, the sweep stops there (job 1 never starts), the summary of what
    ran is written, and the message names the sweep dir to resume with."""
    signal_at_training_call(monkeypatch, signal.SIGTERM, 2)
    code = _multirun(monkeypatch, tmp_path, ["seed=1,2", "trainer=smoke", "trainer.max_steps=50", "logger=none"])
    err = capsys.readouterr().err
    assert code == 143
    assert _status(tmp_path / "0")["status"] == "interrupted"
    assert (tmp_path / "0" / "checkpoints" / "step_0000002").is_dir()
    assert not (tmp_path / "1").exists()
    assert (tmp_path / "summary.md").is_file()
    assert f"hydra.sweep.dir={tmp_path}" in err and "Sweep stopped at job 0" in err

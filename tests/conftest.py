"""Shared fixtures: the real config composed from conf/, shrunk for tests (smoke trainer, offline W&B,
run dirs in tmp_path), and the People's Daily data prepared once per session."""
from __future__ import annotations

import os
from dataclasses import dataclass
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
ESSAY = Path(__file__).parent / "data" / "essay.txt"

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` (the README's command): two workers share the cores, one thread each, and so do the
    # `python run.py` processes they start; oversubscribed torch threads would be several times slower.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def compose(overrides: list[str] | None = None, return_hydra_config: bool = False):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import bertexp.resolvers  # noqa: F401
    import bertexp.schema  # noqa: F401

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=overrides or [], return_hydra_config=return_hydra_config)


def run_in_process(run_dir: Path, overrides: list[str] | None = None, name: str = "test") -> dict:
    """A real training run (bertexp.train.run_training), in this process, on the composed config."""
    from bertexp.train import run_training

    overrides = list(overrides or [])
    logger = [] if "logger=none" in overrides else ["logger.mode=offline"]
    cfg = compose(["trainer=smoke", *logger, *overrides])
    info = {"name": name, "group": "tests", "tags": ["test"], "notes": "pytest", "overrides": overrides or [], "multirun": False}
    return run_training(cfg, Path(run_dir), info)


def run_cli(args: list[str], timeout: float = 300, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python run.py ARGS` as a user types it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True, timeout=timeout,
        env=full_env, cwd=cwd or ROOT,
    )


def signal_at_training_call(monkeypatch, signum: int, call: int) -> None:
    """Deliver `signum` to this process during the `call`-th training forward (numbered from 1): a signal
    that arrives mid-step, as a user's Ctrl-C or a scheduler's SIGTERM does."""
    from bertexp.modeling import PretrainingObjective

    real = PretrainingObjective.forward
    calls = {"n": 0}

    def forward(self, *args):
        if self.training:
            calls["n"] += 1
            if calls["n"] == call:
                os.kill(os.getpid(), signum)
        return real(self, *args)

    monkeypatch.setattr(PretrainingObjective, "forward", forward)


@pytest.fixture(scope="session")
def pd_data():
    """People's Daily, tokenised with the corpus vocabulary of the default model (cached on disk)."""
    from hydra.utils import instantiate

    cfg = compose()
    data = instantiate(cfg.data)
    spec = instantiate(cfg.model)
    tok = spec.tokenizer(data)
    data.prepare(tok, seed=0)
    return data, tok


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def run_here(monkeypatch, capfd, args: list[str]) -> Ran:
    """`python run.py ARGS` (from the repo root) in this process, its output captured: for tests of what a
    run or sweep does rather than of the process around it. Each saves the ~7 s a new interpreter spends
    importing torch and transformers, which is most of a smoke run."""
    monkeypatch.chdir(ROOT)
    capfd.readouterr()
    code = run_main(monkeypatch, args)
    out, err = capfd.readouterr()
    return Ran(code, out, err)


def run_main(monkeypatch, args: list[str]) -> int:
    """`python run.py ARGS` in this process (Hydra's real entry point, bertexp.job and all), so failures can be
    injected where they happen; returns the exit code (0 when it returned)."""
    import runpy

    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.setattr(sys, "argv", [str(ROOT / "run.py"), *args])
    GlobalHydra.instance().clear()
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    try:
        runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        GlobalHydra.instance().clear()
        # run.py sets HYDRA_FULL_ERROR for its process, here pytest's: the `python run.py` processes that later
        # tests of this worker start would inherit it and show Hydra's traceback instead of a one-line error
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error
    return 0

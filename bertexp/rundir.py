"""A run dir belongs to one experiment.

Before a job trains, `claim` makes the run dir its own:
- **Locked** while this process writes it (`RUN/.lock`, an flock held until the job ends), so two live
  processes never share one dir; the second is refused in one line.
- **One config.** What a dir's checkpoints were trained with is recorded (`RUN/run_config.json`, and
  `run_config.json` inside every checkpoint). Resuming with values that change the result is refused, naming
  the keys, unless the user allows exactly those keys (`trainer.allow_changes=[trainer.max_steps]`); then
  the change is recorded with the step it took effect (`RUN/config_changes.jsonl`). Keys that cannot change
  what is trained (logging cadence, caches, W&B settings, ...) may change freely. Hydra writes `.hydra/`
  before any of this runs, so a refused launch puts back the files of the config the run trained with.
- **Branches.** Resuming from an earlier checkpoint of the same dir (a rollback), starting afresh in a used
  dir (`trainer.resume=never`), or continuing another dir's checkpoint here moves what would be abandoned
  (later checkpoints and the metrics after the branch point) into `RUN/abandoned/<time>-<why>/`, never
  deleting it; `metrics.jsonl` keeps the records up to the step resumed from, and the run gets a W&B run of
  its own that names the branch point.
- **Provenance** of every attempt (`RUN/provenance.json`): git commit and whether the tree was dirty,
  package versions, the command, the tokens' build id and the exam id.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bertexp.checkpoint import STATE_FILE, checkpoint_dirs, latest_checkpoint
from bertexp.errors import BertexpError, CheckpointError, ConfigError

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"  # in the run dir and in every checkpoint: the flat, resolved config trained with
RUN_INFO = "run_info.json"  # in every checkpoint: the run's W&B name, group, tags and Hydra choices
CHANGES_FILE = "config_changes.jsonl"
PROVENANCE_FILE = "provenance.json"
LOCK_FILE = ".lock"
HYDRA_TRAINED = ".hydra.trained"  # a copy of .hydra/ as it was for the config the checkpoints were trained with
ABANDONED = "abandoned"
NO_RESUME = ("never", "false", "False", "none", "None")  # trainer.resume values that start afresh
# Keys whose value cannot change what a run trains or how it is scored: they may differ on a resume.
FREE_KEYS = ("trainer.resume", "trainer.allow_changes", "trainer.log_every", "trainer.eval_every", "trainer.save_every",
             "trainer.keep_checkpoints", "trainer.measure_mfu", "trainer.downstream", "trainer.downstream_settings",
             "trainer.downstream_every_checkpoint", "data.cache_dir", "data.num_proc", "data.num_workers", "logger",
             "experiment", "task")


def flat_config(cfg: DictConfig) -> dict:
    """The resolved config as {dotted.key: value} (lists kept whole): what a run trains with."""
    return _flatten(OmegaConf.to_container(cfg, resolve=True))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def derived_keys(cfg: DictConfig) -> set[str]:
    """Keys whose value is an interpolation of another (`optim.optimizer.lr: ${..lr}`): a change shows in
    the key they come from, so they are not listed again."""
    raw = _flatten(OmegaConf.to_container(cfg, resolve=False))
    return {k for k, v in raw.items() if isinstance(v, str) and v.startswith("${") and not v.startswith("${oc.")}


def is_free(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in FREE_KEYS)


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def differences(old: dict, new: dict) -> dict[str, tuple]:
    """{key: (old, new)} for every key whose value differs (a key missing on one side counts as None)."""
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if not _same(old.get(k), new.get(k))}


def checkpoint_config(path: Path) -> dict | None:
    """The flat config a checkpoint was trained with: its run_config.json, or (a checkpoint of an older
    bertexp) the config in its trainer_state.pt; None for a checkpoint that is not bertexp's."""
    path = Path(path)
    try:
        return json.loads((path / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        pass
    if (path / STATE_FILE).is_file():
        from bertexp.checkpoint import load_trainer_state

        saved = load_trainer_state(path).get("config")
        return _flatten(saved) if isinstance(saved, dict) else None
    return None


def write_json(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    tmp.replace(path)


@dataclass
class Claim:
    """What `claim` decided for this job."""

    run_dir: Path
    resume_from: Path | None = None
    previous_status: dict = field(default_factory=dict)
    changes: dict = field(default_factory=dict)  # allowed, result-changing keys: {key: (old, new)}
    branch: dict | None = None  # set when the run continues on a new branch: a W&B run of its own
    skip: bool = False  # a sweep job already completed with this config
    _lock_fd: int | None = None

    def release(self) -> None:
        if self._lock_fd is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(self._lock_fd)
                self._lock_fd = None


def _lock(run_dir: Path) -> int:
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise BertexpError(f"run dir {run_dir} is in use by a running job ({holder}); wait for it to end, or use "
                           "another hydra.run.dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


def resume_target(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint a run continues from: auto, the dir's latest; never, none; else the path given."""
    if resume in NO_RESUME:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    from bertexp.data.sources import user_path

    path = user_path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"trainer.resume: {path} is not a checkpoint (no {STATE_FILE})")
    return path.resolve()


def _inside(path: Path, folder: Path) -> bool:
    return Path(folder).resolve() in Path(path).resolve().parents


def _restore_hydra(run_dir: Path) -> None:
    """Put back the .hydra/ files of the config this dir's run was trained with (Hydra has just written the
    refused launch's over them)."""
    saved = run_dir / HYDRA_TRAINED
    if saved.is_dir():
        shutil.copytree(saved, run_dir / ".hydra", dirs_exist_ok=True)


def _keep_hydra(run_dir: Path) -> None:
    if (run_dir / ".hydra").is_dir():
        shutil.copytree(run_dir / ".hydra", run_dir / HYDRA_TRAINED, dirs_exist_ok=True)


def _shown(changes: dict, n: int = 3) -> str:
    parts = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(changes.items())[:n]]
    return ", ".join(parts) + (f" and {len(changes) - n} more" if len(changes) > n else "")


def claim(cfg: DictConfig, run_dir: Path, *, sweep_job: int | None = None) -> Claim:
    """Lock the run dir and decide how this job may use it (see the module's doc). Raises BertexpError, with
    the dir's files as they were, when the job must not run here."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = _lock(run_dir)
    except BertexpError:
        _restore_hydra(run_dir)
        raise
    c = Claim(run_dir, _lock_fd=fd)
    try:
        _decide(cfg, c, sweep_job)
    except BaseException:
        c.release()
        raise
    return c


def _decide(cfg: DictConfig, c: Claim, sweep_job: int | None) -> None:
    from bertexp.job import read_status

    run_dir = c.run_dir
    flat = flat_config(cfg)
    allowed = [str(k) for k in (cfg.trainer.get("allow_changes") or [])]
    unknown = [k for k in allowed if k not in flat]
    if unknown:
        raise ConfigError(f"trainer.allow_changes: no such key {unknown[0]!r} in the config (name keys as on the "
                          "command line, e.g. trainer.allow_changes=[trainer.max_steps])")
    c.previous_status = read_status(run_dir)
    target = resume_target(run_dir, str(cfg.trainer.resume))
    trained = checkpoint_config(target) if target is not None else None
    if target is None and str(cfg.trainer.resume) == "auto" and _trained_records(run_dir):
        # an attempt cut off before its first checkpoint: nothing to resume, but the dir's records and W&B run
        # are of its config, so another config may not start here either
        trained = checkpoint_config(run_dir)
    if trained is not None:
        derived = derived_keys(cfg)
        diff = {k: v for k, v in differences(trained, flat).items() if not is_free(k) and k not in derived}
        refused = {k: v for k, v in diff.items() if k not in allowed}
        if refused:
            _restore_hydra(run_dir)
            _refuse(run_dir, target, refused, sweep_job)
        if c.previous_status.get("status") == "completed" and not diff and sweep_job is not None:
            c.skip = True
            return
        c.changes = diff if target is not None else {}  # with nothing to resume, the run starts afresh
    c.resume_from = target
    _branch(c, target, str(cfg.trainer.resume))
    if c.changes:
        step = int(target.name.rsplit("_", 1)[-1]) if target is not None and target.name.startswith("step_") else None
        log.warning("Resuming from %s with changed values, as trainer.allow_changes allows: %s", target, _shown(c.changes, 8))
        with open(run_dir / CHANGES_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "changes": {k: list(v) for k, v in c.changes.items()},
                                "time": time.strftime("%Y-%m-%d %H:%M:%S")}, default=str) + "\n")
    write_json(run_dir / RUN_CONFIG, flat)
    _keep_hydra(run_dir)


def resume_hint(resume, where: str) -> str:
    """How to continue a stopped run: the same command, except that a trainer.resume other than auto would
    start afresh or roll back again instead of continuing."""
    resume = str(resume)
    if resume == "auto":
        return f"resume with the same command and {where}"
    return (f"resume with the same command and {where}, but trainer.resume=auto instead of trainer.resume={resume} "
            "(which would branch off again)")


def _trained_records(run_dir: Path) -> bool:
    from bertexp.tracking import read_metrics

    return any("train/loss" in r for r in read_metrics(run_dir / "metrics.jsonl"))


def _refuse(run_dir: Path, target: Path | None, refused: dict, sweep_job: int | None) -> None:
    if sweep_job is not None:
        raise BertexpError(f"job {sweep_job} ({run_dir}) was first run with another config ({_shown(refused)}); re-run "
                           "the sweep with its original command, or use a new hydra.sweep.dir")
    where = f"{run_dir}" if target is None or _inside(target, run_dir) else f"checkpoint {target}"
    keys = ",".join(refused)
    raise BertexpError(f"{where} was trained with other values ({_shown(refused)}): use a new hydra.run.dir for a new "
                       f"experiment, trainer.resume=never to start afresh here, or trainer.allow_changes=[{keys}] to "
                       "go on with the new values")


def _branch(c: Claim, target: Path | None, resume: str) -> None:
    """Move aside what the run leaves behind: checkpoints after the one it resumes from (all of this dir's,
    on a fresh start or when continuing another dir's checkpoint) and the metrics after that step."""
    run_dir = c.run_dir
    if target is None:
        after, why = 0, "fresh-start"
    elif _inside(target, run_dir / "checkpoints"):
        after, why = int(target.name.rsplit("_", 1)[-1]), f"rolled-back-to-{target.name}"
    else:
        after, why = 0, "resumed-from-elsewhere"
    later = [p for s, p in checkpoint_dirs(run_dir) if s > after]
    from bertexp.tracking import read_metrics

    metrics = run_dir / "metrics.jsonl"
    records = read_metrics(metrics)
    if not later and target is None and records:  # an earlier attempt that never checkpointed: keep its records
        why = "fresh-start" if resume in NO_RESUME else "restarted-without-checkpoint"
    elif not later:  # a plain resume (or a first start): records after the checkpoint are redone identically
        return
    tail = [r for r in records if r.get("step", 0) > after]
    dest = run_dir / ABANDONED / f"{time.strftime('%Y%m%d-%H%M%S')}-{why}"
    n = 1
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{dest.name.rsplit('.', 1)[0]}.{n}")
    (dest / "checkpoints").mkdir(parents=True)
    for p in later:
        os.rename(p, dest / "checkpoints" / p.name)
    for name in ("metrics.jsonl", "wandb_id", CHANGES_FILE):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, dest / name)
    kept = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records if r.get("step", 0) <= after)
    tmp = metrics.with_suffix(".jsonl.tmp")
    tmp.write_text(kept, encoding="utf-8")
    tmp.replace(metrics)
    _relink_last(run_dir)
    old_id = (run_dir / "wandb_id").read_text().strip() if (run_dir / "wandb_id").is_file() else None
    c.branch = {"reason": why, "from_step": after, "abandoned": str(dest), "previous_wandb_id": old_id}
    log.warning("%s: moved %d later checkpoint(s) and %d metric record(s) after step %d aside to %s", why,
                len(later), len(tail), after, dest)


def _relink_last(run_dir: Path) -> None:
    root = run_dir / "checkpoints"
    last = root / "last"
    newest = latest_checkpoint(run_dir)
    if last.is_symlink() or last.exists():
        last.unlink()
    if newest is not None:
        os.symlink(newest.name, last)


# ---- provenance --------------------------------------------------------------------------------------

_PACKAGES = ("torch", "transformers", "tokenizers", "hydra-core", "omegaconf", "wandb", "numpy", "numba")


def _git(repo: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def code_version() -> dict:
    """The git commit of the bertexp source that runs, and whether its tracked files differ from it."""
    repo = Path(__file__).resolve().parents[1]
    commit = _git(repo, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def provenance(**extra) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname(), **code_version(),
            "python": platform.python_version(), "packages": versions, "command": " ".join(sys.argv), **extra}


def record_provenance(run_dir: Path, attempt: dict) -> None:
    """Append this attempt to RUN/provenance.json."""
    path = Path(run_dir) / PROVENANCE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        attempts = json.loads(path.read_text()).get("attempts", [])
    except (OSError, ValueError, AttributeError):
        attempts = []
    write_json(path, {"attempts": [*attempts, attempt]})

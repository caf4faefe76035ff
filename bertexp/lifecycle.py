"""One lifecycle for every run: pretraining, fine-tuning (`task=`) and sweep jobs all start, stop and end here.

`claim` makes a run dir this job's own before anything is trained:
- **Locked** while this process writes it (`RUN/.lock`, an flock held until the job ends), so two live
  processes never share one dir; the second is refused in one line.
- **One config.** What a dir trained with is recorded (`RUN/run_config.json`, and inside every checkpoint):
  the effective values (every key resolved, whichever way it was spelled, and the corpus's fingerprint). A
  resume whose values would change the result is refused, naming the keys, unless the user allows exactly
  those keys (`trainer.allow_changes=[trainer.max_steps]`); then the change is recorded with the step it took
  effect (`RUN/config_changes.jsonl`). Keys that cannot change what is trained (logging cadence, caches, W&B
  settings, ...) may change freely. Hydra writes `.hydra/` before any of this runs, so a refused launch puts
  back the files of the config the run trained with (and a sweep's `multirun.yaml`).
- **Resume or branch.** A pretraining run resumes from its latest checkpoint; a fine-tuning job from its
  finished fine-tuning runs (`seeds/`). Resuming from an earlier checkpoint (a rollback), starting afresh in a
  used dir (`trainer.resume=never`), or continuing another dir's checkpoint here moves what would be abandoned
  (later checkpoints, the records after the branch point, the config changes made on that branch and the W&B
  run id) into `RUN/abandoned/<time>-<why>/`, never deleting it: `metrics.jsonl` holds one branch, and each
  branch gets a W&B run of its own.
- **Status.** `status.json` says running, completed, failed or interrupted; a completed sweep job is not run
  again (unless downstream tasks were added to it).

`StopFlag` turns SIGINT/SIGTERM/SIGUSR1/SIGUSR2 into a request that the training loops honour after their
current step, with the exit code each signal means.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from bertexp.checkpoint import STATE_FILE, checkpoint_dirs, latest_checkpoint
from bertexp.errors import BertexpError, CheckpointError, ConfigError
from bertexp.rundir import (CHANGES_FILE, RUN_CONFIG, checkpoint_config, differences, effective_config,
                            interpolation_sources, read_status, write_json, write_status)
from bertexp.tracking import WANDB_ID_FILE, read_metrics, saved_wandb_id

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
HYDRA_TRAINED = ".hydra.trained"  # a copy of .hydra/ as it was for the config the run was trained with
ABANDONED = "abandoned"
SEEDS_DIR = "seeds"  # a fine-tuning job's finished runs, one file each (bertexp.finetune)
NO_RESUME = ("never", "false", "False", "none", "None")  # trainer.resume values that start afresh
# Keys whose value cannot change what a run trains or how it is scored: they may differ on a resume.
FREE_KEYS = ("trainer.resume", "trainer.allow_changes", "trainer.log_every", "trainer.eval_every", "trainer.save_every",
             "trainer.keep_checkpoints", "trainer.measure_mfu", "trainer.downstream", "trainer.downstream_settings",
             "trainer.downstream_every_checkpoint", "data.cache_dir", "data.num_proc", "data.num_workers", "logger",
             "experiment", "task")
# Exit codes 128 + signal number. SIGUSR1 is SLURM's usual pre-emption warning; SIGUSR2 is submitit's.
SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGUSR1: 138, signal.SIGUSR2: 140}


class StopFlag:
    """Turns SIGTERM/SIGINT/SIGUSR1/SIGUSR2 into a request the loop honours after the current step.

    A handler that was installed before ours (submitit's requeue on SIGUSR2 under
    hydra/launcher=submitit_slurm) is called after our checkpoint is written, so the requeued job
    resumes from it.
    """

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for s in SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. some launchers): signals stay as they were
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name

    @property
    def exit_code(self) -> int:
        return SIGNALS.get(self.signum or signal.SIGTERM, 143)

    def chain(self) -> None:
        """Call the handler that was there before ours for the signal received, if it was a Python one."""
        previous = self._old.get(self.signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self.signum, None)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def is_free(key: str, kind: str = "pretrain") -> bool:
    """Whether `key` may change on a resume: a fine-tuning job's own settings (task.*) are what it trains with."""
    if kind == "finetune" and (key == "task" or key.startswith("task.")):
        return False
    return any(key == k or key.startswith(k + ".") for k in FREE_KEYS)


def resume_hint(resume, where: str) -> str:
    """How to continue a stopped run: the same command, except that a trainer.resume other than auto would
    start afresh or roll back again instead of continuing."""
    resume = str(resume)
    if resume == "auto":
        return f"resume with the same command and {where}"
    return (f"resume with the same command and {where}, but trainer.resume=auto instead of trainer.resume={resume} "
            "(which would branch off again)")


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


@dataclass
class Claim:
    """What `claim` decided for this job, and the handle through which the job reports how it is going."""

    run_dir: Path
    kind: str = "pretrain"  # or "finetune" (a task= job)
    resume: str = "auto"  # trainer.resume as given
    resume_from: Path | None = None
    previous_status: dict = field(default_factory=dict)
    changes: dict = field(default_factory=dict)  # allowed, result-changing keys: {key: (old, new)}
    branch: dict | None = None  # set when the run continues on a new branch: a W&B run of its own
    skip: bool = False  # a sweep job already completed with this config
    effective: dict = field(default_factory=dict)  # the launch's effective values, as run_config.json records them
    _lock_fd: int | None = None

    def status(self, status: str, **extra) -> None:
        write_status(self.run_dir, status, **extra)

    def wandb_resume_id(self, in_checkpoint: str | None = None) -> str | None:
        """The W&B run this attempt continues: none on a new branch or a fresh start, nor for another dir's
        checkpoint (this dir's run is not that one); else the checkpoint's, or the dir's (a job cut off before
        its first checkpoint keeps its W&B run)."""
        if self.branch or self.resume in NO_RESUME:
            return None
        if self.resume_from is not None and not _inside(self.resume_from, self.run_dir):
            return None
        return in_checkpoint or saved_wandb_id(self.run_dir)

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


def claim(cfg: DictConfig, run_dir: Path, *, sweep_job: int | None = None) -> Claim:
    """Lock the run dir and decide how this job may use it (see the module's doc). Raises BertexpError, with
    the dir's files (and a sweep's record of its command line) as they were, when the job must not run here."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sweep_record, sweep_first = run_dir.parent / "multirun.yaml", run_dir.parent / "multirun.first.yaml"
    if sweep_job is not None and sweep_record.is_file() and not sweep_first.is_file():
        shutil.copy(sweep_record, sweep_first)  # Hydra rewrites multirun.yaml on every launch of the sweep
    c = Claim(run_dir, kind="finetune" if cfg.get("task") else "pretrain", resume=str(cfg.trainer.resume))
    try:
        c._lock_fd = _lock(run_dir)
        _decide(cfg, c, sweep_job)
    except BaseException:
        c.release()
        _restore_hydra(run_dir)
        if sweep_job is not None and sweep_first.is_file():
            shutil.copy(sweep_first, sweep_record)
        raise
    return c


def _decide(cfg: DictConfig, c: Claim, sweep_job: int | None) -> None:
    run_dir = c.run_dir
    flat = c.effective = effective_config(cfg)
    allowed = [str(k) for k in (cfg.trainer.get("allow_changes") or [])]
    unknown = [k for k in allowed if k not in flat]
    if unknown:
        raise ConfigError(f"trainer.allow_changes: no such key {unknown[0]!r} in the config (name keys as on the "
                          "command line, e.g. trainer.allow_changes=[trainer.max_steps])")
    if c.kind == "finetune" and c.resume != "auto" and c.resume not in NO_RESUME:
        raise ConfigError(f"trainer.resume={c.resume}: a task= job continues from its finished fine-tuning runs; "
                          "use trainer.resume=auto or trainer.resume=never")
    c.previous_status = read_status(run_dir)
    target = resume_target(run_dir, c.resume) if c.kind == "pretrain" else None
    trained = checkpoint_config(target) if target is not None else None
    if target is None and c.resume == "auto" and _used(run_dir, c.kind):
        # records but no checkpoint (a pretraining attempt cut off before its first one, or a fine-tuning job):
        # the dir's records and W&B run are of its config, so another config may not start here either
        trained = checkpoint_config(run_dir)
    if trained is not None:
        diff = _guarded(trained, flat, interpolation_sources(cfg), c.kind)
        refused = {k: v for k, v in diff.items() if k not in allowed}
        if refused:
            _refuse(run_dir, target, refused, sweep_job)
        if c.previous_status.get("status") == "completed" and not diff and sweep_job is not None:
            added = _downstream_added(cfg, run_dir)
            if not added:
                c.skip = True
                return
            log.info("Job %s completed before; running the downstream task(s) added since: %s", sweep_job,
                     ", ".join(added))
        c.changes = diff if target is not None or c.kind == "finetune" else {}  # nothing to resume: afresh
    c.resume_from = target
    _branch(c, target)
    if c.changes:
        _record_changes(c, target)
    write_json(run_dir / RUN_CONFIG, flat)
    _keep_hydra(run_dir)


# Keys added to the config since earlier run dirs were written, with what those runs did without them: compared
# as if recorded, so an old run resumed (or an old sweep job taken as done) is not silently another recipe.
IMPLIED = {"model.position_init": "random", "optim.optimizer.fused": None}


def _guarded(trained: dict, flat: dict, sources: dict[str, str], kind: str) -> dict[str, tuple]:
    """The result-changing differences between what a dir trained with and this launch's effective values. A
    key interpolated from another (`optim.optimizer.lr: ${..lr}`) that changed exactly as its source did is
    that change, listed once under the source; one that changed on its own (set directly on one of the two
    commands) is listed itself. Keys the dir's record does not have at all (added to bertexp since, the
    fingerprints among them) are not compared."""
    # keys added since that change what a run trains: a record without one trained with its old behaviour
    trained = {**{k: v for k, v in IMPLIED.items() if k in flat and k not in trained}, **trained}
    diff = {k: v for k, v in differences(trained, flat).items() if not is_free(k, kind)}
    added = sorted(k for k in diff if k not in trained and not any(k.startswith(t + ".") for t in trained))
    if added:  # keys a newer bertexp added (the run could not have set them): not compared, and said so
        log.warning("Not compared with what this run dir recorded (keys added since it was written): %s",
                    ", ".join(added))
        for key in added:
            del diff[key]
    return {k: v for k, v in diff.items() if not (k in sources and diff.get(sources[k]) == v)}


def _used(run_dir: Path, kind: str) -> bool:
    """Whether an earlier attempt left results here: training records, or finished fine-tuning runs."""
    if kind == "finetune" and any((run_dir / SEEDS_DIR).glob("*.json")):
        return True
    return any("train/loss" in r for r in read_metrics(run_dir / "metrics.jsonl"))


def _downstream_added(cfg: DictConfig, run_dir: Path) -> list[str]:
    """trainer.downstream tasks this completed run has no results for yet (or no curve over its checkpoints,
    when trainer.downstream_every_checkpoint asks for one)."""
    tasks = [str(t) for t in (cfg.trainer.get("downstream") or [])]
    wanted = ["summary.json", "curve.csv"] if cfg.trainer.get("downstream_every_checkpoint") else ["summary.json"]
    return [t for t in tasks if not all((run_dir / "downstream" / t / f).is_file() for f in wanted)]


def _shown(changes: dict, n: int = 3) -> str:
    parts = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(changes.items())[:n]]
    return ", ".join(parts) + (f" and {len(changes) - n} more" if len(changes) > n else "")


def _refuse(run_dir: Path, target: Path | None, refused: dict, sweep_job: int | None) -> None:
    if sweep_job is not None:
        raise BertexpError(f"job {sweep_job} ({run_dir}) was first run with another config ({_shown(refused)}); re-run "
                           "the sweep with its original command, or use a new hydra.sweep.dir")
    where = f"{run_dir}" if target is None or _inside(target, run_dir) else f"checkpoint {target}"
    keys = ",".join(refused)
    raise BertexpError(f"{where} was trained with other values ({_shown(refused)}): use a new hydra.run.dir for a new "
                       f"experiment, trainer.resume=never to start afresh here, or trainer.allow_changes=[{keys}] to "
                       "go on with the new values")


def _record_changes(c: Claim, target: Path | None) -> None:
    step = int(target.name.rsplit("_", 1)[-1]) if target is not None and target.name.startswith("step_") else None
    log.warning("Resuming from %s with changed values, as trainer.allow_changes allows: %s", target or c.run_dir,
                _shown(c.changes, 8))
    with open(c.run_dir / CHANGES_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, "changes": {k: list(v) for k, v in c.changes.items()},
                            "time": time.strftime("%Y-%m-%d %H:%M:%S")}, default=str) + "\n")


def _branch_point(c: Claim, target: Path | None) -> tuple[int, str, list[Path]] | None:
    """(step branched from, why, checkpoints to move aside), or None when the run simply goes on."""
    run_dir = c.run_dir
    if c.kind == "finetune":  # its finished runs are its checkpoints: kept while it goes on as it was
        if not _used(run_dir, c.kind) and not read_metrics(run_dir / "metrics.jsonl"):
            return None
        if c.resume in NO_RESUME:
            return 0, "fresh-start", []
        if c.changes:  # its results depend on what changed: they go aside, not overwritten
            return 0, "changed-settings", []
        if not any((run_dir / SEEDS_DIR).glob("*.json")):  # cut off before its first run finished
            return 0, "restarted-without-finished-run", []
        return None
    if target is None:
        after, why = 0, "fresh-start"
    elif _inside(target, run_dir / "checkpoints"):
        after, why = int(target.name.rsplit("_", 1)[-1]), f"rolled-back-to-{target.name}"
    else:
        after, why = 0, "resumed-from-elsewhere"
    later = [p for s, p in checkpoint_dirs(run_dir) if s > after]
    if not later and target is None and read_metrics(run_dir / "metrics.jsonl"):
        # an earlier attempt that never checkpointed: its records go aside, not lost
        return after, "fresh-start" if c.resume in NO_RESUME else "restarted-without-checkpoint", []
    return (after, why, later) if later else None  # a plain resume: later records are redone identically


def _branch(c: Claim, target: Path | None) -> None:
    """Move aside what the run leaves behind: later checkpoints (a fine-tuning job's finished runs on a fresh
    start), the records and config changes after the branch point, and the W&B run id."""
    point = _branch_point(c, target)
    if point is None:
        return
    after, why, later = point
    run_dir = c.run_dir
    dest = run_dir / ABANDONED / f"{time.strftime('%Y%m%d-%H%M%S')}-{why}"
    n = 1
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{dest.name.rsplit('.', 1)[0]}.{n}")
    (dest / "checkpoints").mkdir(parents=True)
    for p in later:
        os.rename(p, dest / "checkpoints" / p.name)
    moved = _keep_until(run_dir / "metrics.jsonl", dest, lambda r: r.get("step", 0) <= after)
    # a change recorded at step s took effect after s: the branch keeps those made before its branch point
    _keep_until(run_dir / CHANGES_FILE, dest, lambda r: r.get("step") is not None and r["step"] < after)
    # a fine-tuning job's finished runs; a pretraining run's downstream results (of the branch it leaves)
    for name in ([SEEDS_DIR, "summary.json"] if c.kind == "finetune" else ["downstream"]) + [WANDB_ID_FILE]:
        if (run_dir / name).exists():
            os.rename(run_dir / name, dest / name)
    _relink_last(run_dir)
    old_id = saved_wandb_id(dest)
    c.branch = {"reason": why, "from_step": after, "abandoned": str(dest), "previous_wandb_id": old_id}
    log.warning("%s: moved %d later checkpoint(s) and %d record(s) after step %d aside to %s", why, len(later), moved,
                after, dest)


def _keep_until(path: Path, dest: Path, keep) -> int:
    """Copy a JSON-lines file into `dest`, then keep in place only the records `keep` accepts; returns how
    many were dropped."""
    if not path.is_file():
        return 0
    shutil.copy2(path, dest / path.name)
    records = read_metrics(path)
    kept = [r for r in records if keep(r)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    tmp.replace(path)
    return len(records) - len(kept)


def _relink_last(run_dir: Path) -> None:
    root = run_dir / "checkpoints"
    last = root / "last"
    newest = latest_checkpoint(run_dir)
    if last.is_symlink() or last.exists():
        last.unlink()
    if newest is not None:
        os.symlink(newest.name, last)


def _restore_hydra(run_dir: Path) -> None:
    """Put back the .hydra/ files of the config this dir's run was trained with (Hydra has just written the
    refused launch's over them)."""
    saved = run_dir / HYDRA_TRAINED
    if saved.is_dir():
        shutil.copytree(saved, run_dir / ".hydra", dirs_exist_ok=True)


def _keep_hydra(run_dir: Path) -> None:
    if (run_dir / ".hydra").is_dir():
        shutil.copytree(run_dir / ".hydra", run_dir / HYDRA_TRAINED, dirs_exist_ok=True)

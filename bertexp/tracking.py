"""Experiment tracking: every record goes to `metrics.jsonl` in the run dir (always, first, flushed) and to
W&B. This module alone talks to W&B.

W&B mode: `auto` picks `online` when an API key is configured and `offline` otherwise; `disabled` turns it
off. An online init that cannot reach the server within a bounded time falls back to offline with one
warning, so a run never hangs on the network and never loses its metrics to a W&B failure.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from bertexp.errors import ConfigError

log = logging.getLogger(__name__)


class MetricsFile:
    """Append-only JSON lines; each record is flushed as soon as it is written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()

    def truncate_after(self, step: int) -> None:
        """On resume from `step`: drop records logged after that checkpoint (they will be logged again)."""
        self._f.close()
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._f = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl; a last line cut off by a kill is ignored."""
    out = []
    if not Path(path).is_file():
        return out
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        rc = netrc.netrc()
        host = (os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").split("//")[-1].split("/")[0]
        return rc.authenticators(host) is not None
    except Exception:
        return False


def server_reachable(timeout: float) -> bool:
    """Whether the W&B host answers within `timeout` seconds (bertexp.net: a hanging DNS lookup included)."""
    from bertexp.net import connect_error

    return connect_error(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai", timeout) is None


def resolve_mode(mode: str) -> str:
    if mode not in ("auto", "online", "offline", "disabled"):
        raise ConfigError(f"logger.mode={mode!r} must be one of: auto, online, offline, disabled")
    if mode == "auto":
        return "online" if api_key_configured() else "offline"
    return mode


def user_name(logger_cfg, info: dict) -> dict:
    """`info` with the run name the user chose (`logger.name`): as is for one run; in a sweep it prefixes each
    job's swept values, so the jobs stay apart (`first: masking.ratio=0.4`)."""
    chosen = logger_cfg.get("name") if logger_cfg else None
    if not chosen:
        return info
    return {**info, "name": f"{chosen}: {info['name']}" if info.get("multirun") else str(chosen)}


def labels(cfg: dict, info: dict) -> dict:
    """W&B name, group, tags and notes: bertexp's, with the user's `logger.tags` added to its tags (never in
    their place) and `logger.notes` in place of the command line."""
    tags = list(info["tags"])
    tags += [str(t) for t in cfg.get("tags") or [] if str(t) not in tags]
    return {"name": info["name"], "group": info["group"], "tags": tags, "notes": cfg.get("notes") or info["notes"]}


def start_wandb(run_dir: Path, cfg: dict, info: dict, config: dict, resume_id: str | None, job_type: str | None = None):
    """wandb.init with a bounded wait: online when reachable, else offline; None when disabled or failing."""
    import wandb

    mode = resolve_mode(cfg.get("mode", "auto"))
    if mode == "disabled":
        return None
    timeout = float(cfg.get("init_timeout", 15))
    if mode == "online" and not server_reachable(min(timeout, 5.0)):
        log.warning("W&B server unreachable: logging this run offline (upload it later with `wandb sync %s/wandb`)", run_dir)
        mode = "offline"
    kwargs = dict(
        project=cfg.get("project") or "bertexp",
        entity=cfg.get("entity") or None,
        job_type=job_type or cfg.get("job_type") or "pretrain",
        **labels(cfg, info),
        dir=str(run_dir),
        config=config,
        id=resume_id,
        resume="allow" if resume_id else None,
        reinit="finish_previous",
    )
    # Not silent: W&B's own lines say where an offline run is and how to sync it. System metrics (CPU, memory,
    # GPU) are sampled unless logger.system_metrics=false.
    settings = wandb.Settings(init_timeout=timeout, x_disable_stats=not cfg.get("system_metrics", True))
    try:
        run = wandb.init(mode=mode, settings=settings, **kwargs)
    except Exception as e:
        if mode != "online":
            log.warning("W&B init failed (%s: %s); metrics go to metrics.jsonl only", type(e).__name__, e)
            return None
        log.warning("W&B online init failed (%s); logging this run offline", type(e).__name__)
        try:
            run = wandb.init(mode="offline", settings=settings, **kwargs)
        except Exception as e2:
            log.warning("W&B offline init failed too (%s); metrics go to metrics.jsonl only", e2)
            return None
    return run


def recorded_vocab(model_cfg: dict, model) -> dict:
    """The model config as W&B records it: `vocab_size` is the vocabulary the model has (a vocabulary trained on
    a small corpus stops short of the size asked for); the size asked for is kept as `max_vocab_size`."""
    out = dict(model_cfg)
    if "vocab_size" in out:
        out["max_vocab_size"] = out["vocab_size"]
    out["vocab_size"] = int(model.config.vocab_size)
    return out


def _cell(c: str):
    """A CSV cell as W&B should plot it: whole numbers as ints (ranks, steps, N), other numbers as floats."""
    if c in ("", "-") or c.isalpha():
        return c
    try:
        return int(c)
    except ValueError:
        pass
    try:
        return float(c)
    except ValueError:
        return c


def _run_columns(row: list[str], project: str | None, entity: str | None) -> list:
    """The table's `run` column (a path on this disk) as the job's name, W&B run id and, online, its link."""
    path = Path(row[0])
    run_id = saved_wandb_id(path)
    url = f"https://wandb.ai/{entity}/{project}/runs/{run_id}" if run_id and entity and project else ""
    return [path.name, run_id or "", url, *[_cell(c) for c in row[1:]]]


def log_sweep_summary(logger_cfg: dict, sweep_dir: Path, group: str) -> str | None:
    """The sweep's summary tables (summary.csv, summary_groups.csv) as `wandb.Table`s and its plot as an
    image, in a run of the sweep's W&B group with job_type=summary. Returns the run's id."""
    import csv

    import wandb

    chosen = logger_cfg.get("name")
    info = {"name": f"{chosen} summary" if chosen else f"summary-{Path(sweep_dir).name}", "group": group, "tags": ["summary"],
            "notes": f"summary of the sweep in {sweep_dir}"}
    run = start_wandb(Path(sweep_dir), logger_cfg, info, {"sweep_dir": str(sweep_dir)}, None, job_type="summary")
    if run is None:
        return None
    try:
        payload = {}
        for name, key in (("summary", "sweep/runs"), ("summary_groups", "sweep/groups")):
            path = Path(sweep_dir) / f"{name}.csv"
            if path.is_file():
                rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
                if rows and rows[0][0] == "run":  # one row per run: name it by its job, W&B id and link
                    entity = logger_cfg.get("entity") or getattr(run, "entity", None)
                    columns = ["job", "wandb_id", "wandb_url", *rows[0][1:]]
                    data = [_run_columns(row, run.project, entity) for row in rows[1:]]
                else:
                    columns, data = rows[0], [[_cell(c) for c in row] for row in rows[1:]]
                payload[key] = wandb.Table(columns=columns, data=data)
        png = Path(sweep_dir) / "summary.png"
        if png.is_file():
            payload["sweep/plot"] = wandb.Image(str(png))
        run.log(payload)
        run_id = run.id
    finally:
        run.finish()
    return run_id


def login_first() -> str:
    """`wandb login && ` where no API key is configured: `wandb sync` alone answers "No API key configured"."""
    return "" if api_key_configured() else "wandb login && "


def sweep_sync_line(sweep_dir: Path) -> str | None:
    """One command that uploads every offline W&B run of a sweep (its jobs', their fine-tuning runs' and the
    summary run), or None when there is none. Its paths are relative to the sweep dir, so the part in
    parentheses runs as well in a copy of the folder on another machine."""
    import glob
    import shlex

    sweep_dir = Path(sweep_dir)
    runs = sorted(p for p in sweep_dir.glob("**/wandb/offline-run-*") if p.is_dir())
    if not runs:
        return None
    dirs = sorted({str(p.parent.relative_to(sweep_dir)) for p in runs})

    def pattern(rel: str) -> str:  # job dirs (0, 1, ...) and fine-tuning tasks as wildcards
        parts = rel.split("/")
        return "/".join("*" if p.isdigit() or (i and parts[i - 1] == "downstream") else p for i, p in enumerate(parts))

    patterns = sorted({pattern(d) for d in dirs}, key=lambda p: (p.count("/"), p))
    matched = {str(Path(m).relative_to(sweep_dir)) for p in patterns for m in glob.glob(str(sweep_dir / p))}
    args = " ".join(patterns if matched == set(dirs) else dirs)  # a wildcard that would catch more: each dir
    return (f"W&B: the sweep's {len(runs)} offline runs upload in one command: "
            f"{login_first()}(cd {shlex.quote(str(sweep_dir))} && wandb sync {args})")


WANDB_ID_FILE = "wandb_id"
LABELS_FILE = "wandb_labels.json"  # the user's own W&B tags, name and notes for this run


def saved_wandb_id(run_dir: Path) -> str | None:
    """The W&B run id an earlier attempt of this run dir used, if any."""
    try:
        return (Path(run_dir) / WANDB_ID_FILE).read_text().strip() or None
    except OSError:
        return None


def keep_files(run, run_dir: Path, patterns) -> None:
    """Copies of the run dir's files matching `patterns` in the W&B run's `files/`, saved from there. wandb's
    own `save` would symlink them to absolute paths (and say so on every run): a run dir copied to another
    machine before `wandb sync` would lose them. A copy moves with the run and is the file as it was now."""
    import shutil

    files_dir = Path(run.dir)
    for pattern in patterns:
        for src in sorted(Path(run_dir).glob(pattern)):
            dst = files_dir / src.relative_to(run_dir)
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                if dst.is_symlink() or dst.exists():
                    dst.unlink()
                shutil.copy2(src, dst)
                # already in files/: wandb publishes it as is, with no link and no warning
                run.save(str(dst), base_path=str(files_dir), policy="now", glob=False)
            except Exception as e:  # noqa: BLE001 - the files are in the run dir whatever W&B does
                log.warning("W&B could not keep %s (%s)", src, e)


class Tracker:
    def __init__(self, run_dir: Path, logger_cfg: dict | None, run_info: dict, config: dict, resume_id: str | None):
        self.run_dir = Path(run_dir)
        self.metrics = MetricsFile(self.run_dir / "metrics.jsonl")
        self.run = None
        if logger_cfg:
            self.run = self._init_wandb(logger_cfg, run_info, config, resume_id)
        if self.run is not None:
            (self.run_dir / WANDB_ID_FILE).write_text(self.run.id)

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def _own_labels(self, cfg: dict, info: dict, resume_id: str | None) -> tuple[dict, dict]:
        """The user's logger.tags/name/notes are kept with the run (wandb_labels.json): a resume that names none
        of them continues the W&B run under the labels it was given (W&B would take the resume's instead)."""
        path = self.run_dir / LABELS_FILE
        mine = {k: cfg.get(k) for k in ("tags", "name", "notes") if cfg.get(k)}
        if mine:
            path.write_text(json.dumps(mine, ensure_ascii=False), encoding="utf-8")
            return cfg, info
        try:
            saved = json.loads(path.read_text(encoding="utf-8")) if resume_id else {}
        except (OSError, ValueError):
            saved = {}
        return {**cfg, **saved}, user_name(saved, info)

    def _init_wandb(self, cfg: dict, info: dict, config: dict, resume_id: str | None):
        cfg, info = self._own_labels(cfg, info, resume_id)
        run = start_wandb(self.run_dir, cfg, info, config, resume_id)
        if run is None:
            return None
        # One summary scheme: every metric's summary is its last value (W&B's default); the run's best evaluation
        # values are written once more, at the end, as best/eval/* (bertexp.train).
        run.define_metric("step")
        for axis in ("tokens", "predicted_tokens", "flops", "elapsed_s"):  # alternative x axes (bertexp.budget)
            run.define_metric(axis)
        for pattern in ("train/*", "eval/*", "throughput/*", "masking/*", "data/*", "finetune/*"):
            run.define_metric(pattern, step_metric="step")
        run.summary["run_dir"] = str(self.run_dir)
        keep_files(run, self.run_dir, (".hydra/*.yaml", "run_config.json", "provenance.json"))  # the config files
        return run

    last_where = "W&B: off"

    def where(self) -> str:
        """Where this run's W&B record is: its URL online; offline, its folder and the command that uploads it."""
        if self.run is None:
            return "W&B: off"
        if self.run.settings.mode == "offline" or getattr(self.run, "offline", False):
            folder = Path(self.run.dir).parent
            return f"W&B: offline run {self.run.id} in {folder}; upload it with: {login_first()}wandb sync {folder}"
        return f"W&B: {self.run.url}"

    def truncate_after(self, step: int) -> None:
        """Drop records after `step`: all of them on a fresh start (step 0), so a run dir that is reused
        (a kill before the first checkpoint, or trainer.resume=never) never mixes two runs' records."""
        self.metrics.truncate_after(step)

    def log(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        if self.run is not None:
            try:
                self.run.log(record)
            except Exception as e:  # W&B trouble must never cost the metrics already on disk
                log.warning("W&B log failed (%s); continuing with metrics.jsonl", e)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            try:
                self.run.summary.update(values)
            except Exception as e:
                log.warning("W&B summary update failed (%s)", e)

    def log_checkpoint(self, path: Path) -> None:
        """The final checkpoint as a W&B model artifact (stored with the offline run, uploaded by sync)."""
        if self.run is None or not Path(path).is_dir():
            return
        try:
            import wandb

            art = wandb.Artifact(f"model-{self.run.id}", type="model", metadata={"run_dir": str(self.run_dir)})
            art.add_dir(str(Path(path).resolve()))
            self.run.log_artifact(art, aliases=["latest", "final"])
        except Exception as e:
            log.warning("W&B artifact upload failed (%s); the checkpoint stays in %s", e, path)

    def finish(self, exit_code: int = 0) -> None:
        self.metrics.close()
        self.last_where = self.where()
        if self.run is not None:
            try:
                self.run.finish(exit_code=exit_code)
            except Exception as e:
                log.warning("W&B finish failed (%s)", e)
            self.run = None


class NullTracker:
    """What ranks other than 0 log to: nothing."""

    run_id = None
    last_where = "W&B: logged by rank 0"

    def where(self) -> str:
        return self.last_where

    def truncate_after(self, step: int) -> None: ...
    def log(self, record: dict) -> None: ...
    def summary(self, values: dict) -> None: ...
    def log_checkpoint(self, path: Path) -> None: ...
    def finish(self, exit_code: int = 0) -> None: ...

"""A run's names: its W&B name, group, tags and notes, from what the user typed and which options composed;
and which keys a sweep varies."""
from __future__ import annotations

import re
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

# Overrides that say nothing about the experiment: left out of run names.
_NOT_IN_NAMES = ("hydra.", "hydra/", "+hydra", "logger", "trainer.resume", "trainer.allow_changes", "data.cache_dir",
                 "data.num_proc", "data.num_workers", "model.path", "trainer.log_every", "trainer.eval_every",
                 "trainer.save_every", "trainer.keep_checkpoints")
NAME_CHARS = 64


def _short(override: str) -> str:
    """`data.path=/long/dir/corpus.txt` -> `data.path=corpus.txt`: names show what differs, not where."""
    key, _, value = override.partition("=")
    return f"{key}={Path(value.rstrip('/')).name}" if "/" in value else override


def run_info(cfg: DictConfig) -> dict:
    """W&B name, group, tags and notes of this job, from what the user typed and which options composed."""
    hc = HydraConfig.get()
    choices = hc.runtime.choices
    overrides = [o for o in hc.overrides.task if not o.startswith(("hydra.", "hydra/", "+hydra"))]
    multirun = hc.mode == RunMode.MULTIRUN
    default_name = f"{choices.get('model')}-{choices.get('masking')}-{cfg.masking.ratio:g}"
    named = [o for o in overrides if not o.lstrip("+~").startswith(_NOT_IN_NAMES)]
    if multirun:  # a sweep's runs are named by their swept values alone, e.g. masking=span,masking.ratio=0.4
        swept = swept_keys(hc)
        named = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept] or named
    name = ",".join(_short(o) for o in named) or default_name
    if len(name) > NAME_CHARS:
        name = name[: NAME_CHARS - 1] + "…"
    smoke = choices.get("trainer") == "smoke"
    tags = [str(choices.get(k)) for k in ("data", "model", "masking", "objective") if choices.get(k)]
    from bertexp.tracking import user_name

    return user_name(cfg.get("logger"), {
        "name": name,
        "group": wandb_group(cfg, hc.sweep.dir if multirun else None, hc if multirun else None, smoke),
        "tags": tags + ["smoke"] * smoke + ["sweep"] * multirun,
        "notes": "python run.py " + " ".join(sys.argv[1:]),
        "overrides": overrides,
        "multirun": multirun,
        "job": hc.job.num if multirun else None,
        "choices": {k: v for k, v in choices.items() if not k.startswith("hydra") and v is not None},
    })


def wandb_group(cfg: DictConfig, sweep_dir=None, hydra_cfg=None, smoke: bool = False) -> str:
    """The W&B group of a run: logger.group if set; for every job of a sweep and its summary run, the sweep's
    `experiment` (or `sweep` and the swept keys) with the date and time it started; else `experiment`
    (`smoke` for smoke runs, so they never sit among real ones)."""
    group = cfg.logger.get("group") if cfg.get("logger") else None
    if group:
        return str(group)
    if sweep_dir is not None:
        what = str(cfg.experiment)
        if what == "default":
            keys = sorted(swept_keys(hydra_cfg)) if hydra_cfg is not None else []
            what = "sweep " + ("+".join(keys) if keys else Path(sweep_dir).name)
        return f"{what} {_sweep_started(Path(sweep_dir))}"
    if smoke and cfg.experiment == "default":
        return "smoke"
    return str(cfg.experiment)


def _sweep_started(sweep_dir: Path) -> str:
    """`multirun/2026-11-30/07-39-48-478165` -> `2026-11-30 07:39:48`; any other dir: its name."""
    m = re.fullmatch(r"(\d{2})-(\d{2})-(\d{2})(?:-\d+)?", sweep_dir.name)
    if m and re.fullmatch(r"\d{4}-\d{2}-\d{2}", sweep_dir.parent.name):
        return f"{sweep_dir.parent.name} {':'.join(m.groups())}"
    return sweep_dir.name


_SWEEP_FUNCS = ("choice(", "range(", "interval(", "glob(", "tag(")


def swept_keys(hc) -> set[str]:
    """Keys a multirun varies: `hydra.sweeper.params` of a sweep file plus command-line overrides with
    several values (a,b or choice/range/interval/glob).

    The command line is read from the sweep's own record (`multirun.yaml`, written by Hydra's sweeper in the
    sweep dir before any job starts), not from this process's argv: under submitit a job runs in a worker
    whose argv is submitit's, not the user's."""
    keys = set()
    params = hc.sweeper.get("params") if hc.sweeper else None
    if params:
        keys.update(str(k) for k in params.keys())
    record = Path(hc.sweep.dir) / "multirun.yaml"
    if record.is_file():
        args = list(OmegaConf.load(record).hydra.overrides.task)
    else:
        args = sys.argv[1:]
    for arg in args:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        depth, has_comma = 0, False
        for ch in value:
            depth += ch in "[({"
            depth -= ch in "])}"
            has_comma |= ch == "," and depth == 0
        if has_comma or value.startswith(_SWEEP_FUNCS):
            keys.add(key.lstrip("+~"))
    return keys

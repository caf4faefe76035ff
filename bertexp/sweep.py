"""Hydra callback: when a multirun ends, print and write a summary table of all its jobs (failed ones
included), so a sweep is compared without parsing logs."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def write_summary(sweep_dir: Path) -> list[dict] | None:
    """Print and write summary.{md,csv,png} of the jobs in `sweep_dir`; returns the runs (None on failure)."""
    from bertexp.compare import compare

    try:
        table, runs = compare([sweep_dir], out=sweep_dir, stem="summary", with_plot=True)
    except (Exception, SystemExit) as e:  # a summary problem must not turn a finished sweep into a failed one
        log.warning("Sweep summary failed: %s", e)
        return None
    groups = " summary_groups.csv," if (sweep_dir / "summary_groups.csv").is_file() else ""
    print(f"\nSweep summary ({sweep_dir}):\n{table}\nWritten: {sweep_dir}/summary.md, summary.csv,{groups} summary.png")
    return runs


def log_summary_to_wandb(config: DictConfig, sweep_dir: Path) -> None:
    """With W&B on, the summary also goes to a run of the sweep's group (job_type=summary)."""
    if not config.get("logger"):
        return
    from omegaconf import OmegaConf

    from bertexp.naming import wandb_group
    from bertexp.tracking import log_sweep_summary

    try:
        logger_cfg = OmegaConf.to_container(config.logger, resolve=True)
        run_id = log_sweep_summary(logger_cfg, sweep_dir, wandb_group(config, sweep_dir, config.hydra))
        if run_id:
            print(f"W&B: summary tables and plot logged in run {run_id} (job_type=summary)")
    except Exception as e:  # the tables are on disk whatever W&B does
        log.warning("W&B sweep summary failed (%s: %s)", type(e).__name__, e)
    print_sync_line(sweep_dir)


def print_sync_line(sweep_dir: Path) -> None:
    """The one command that uploads every offline run of the sweep, whatever became of its summary."""
    from bertexp.tracking import sweep_sync_line

    try:
        sync = sweep_sync_line(sweep_dir)
    except Exception as e:  # noqa: BLE001 - the runs are on disk; `wandb sync` can find them without us
        log.warning("could not list the sweep's offline W&B runs (%s: %s)", type(e).__name__, e)
        return
    if sync:
        print(sync)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = write_summary(sweep_dir)
        if runs is None:
            if config.get("logger"):
                print_sync_line(sweep_dir)
            return
        log_summary_to_wandb(config, sweep_dir)
        failed = sum(1 for r in runs if r["status"] in ("failed", "interrupted") or r.get("downstream_error"))
        if failed:
            print(f"{failed} job(s) of this sweep failed (or their downstream evaluation did): see the error column "
                  "above.", file=sys.stderr)
            sys.exit(1)

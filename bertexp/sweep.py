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
    print(f"\nSweep summary ({sweep_dir}):\n{table}\nWritten: {sweep_dir}/summary.md, summary.csv, summary.png")
    return runs


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        runs = write_summary(Path(config.hydra.sweep.dir))
        if runs is None:
            return
        failed = sum(1 for r in runs if r["status"] in ("failed", "interrupted"))
        if failed:
            print(f"{failed} job(s) of this sweep failed: see the error column above.", file=sys.stderr)
            sys.exit(1)

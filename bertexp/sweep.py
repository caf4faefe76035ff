"""Hydra callback: when a multirun ends, print and write a summary table of all its jobs (failed ones
included), so a sweep is compared without parsing logs."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from bertexp.compare import compare

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            table, runs = compare([sweep_dir], out=sweep_dir, stem="summary", with_plot=True)
        except Exception as e:  # a summary problem must not turn a finished sweep into a failed one
            log.warning("Sweep summary failed: %s", e)
            return
        print(f"\nSweep summary ({sweep_dir}):\n{table}\nWritten: {sweep_dir}/summary.md, summary.csv, summary.png")
        failed = sum(1 for r in runs if r["status"] in ("failed", "interrupted"))
        if failed:
            print(f"{failed} job(s) of this sweep failed: see the error column above.", file=sys.stderr)
            sys.exit(1)

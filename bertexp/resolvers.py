"""OmegaConf resolvers used by conf/.

`${wandb_mode:}` is logger.mode's default: `offline` when no W&B API key is configured, `online` when one is.

`${run_time:FORMAT}` is Hydra's `${now:FORMAT}` made safe for `torchrun`: every rank of one launch must
agree on the run dir, but each rank starts a few milliseconds apart and `now` could fall on different
seconds. Under torchrun the time is that of the launching agent (the ranks' common parent process), the
same for all of them.
"""
from __future__ import annotations

import os
from datetime import datetime

from omegaconf import OmegaConf

from bertexp import fields_help


def process_start(pid: int | str = "self") -> float | None:
    """When a process started (Unix time), from Linux's /proc; None elsewhere."""
    try:
        ticks = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19])
        btime = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _launch_time() -> datetime:
    if "LOCAL_RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        started = process_start(os.getppid())
        if started is not None:
            return datetime.fromtimestamp(started)
    return datetime.now()


_START = _launch_time()


def _wandb_mode() -> str:
    from bertexp.tracking import api_key_configured

    return "online" if api_key_configured() else "offline"


def register() -> None:
    if not OmegaConf.has_resolver("wandb_mode"):
        # logger.mode's default: offline without an API key, online with one (decided once per process).
        OmegaConf.register_new_resolver("wandb_mode", _wandb_mode, use_cache=True)
    if not OmegaConf.has_resolver("run_time"):
        OmegaConf.register_new_resolver("run_time", lambda fmt: _START.strftime(fmt), use_cache=True)
    if not OmegaConf.has_resolver("rank_zero_only"):
        # Ranks other than 0 write no .hydra/ folder (Hydra's output_subdir: null).
        OmegaConf.register_new_resolver(
            "rank_zero_only", lambda value: value if int(os.environ.get("RANK", "0")) == 0 else None
        )


register()
fields_help.register()  # python run.py --help: each field's description

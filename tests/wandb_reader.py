"""Read an offline W&B run back with wandb's own reader (`wandb leet inspect --json`)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path


def wandb_files(run_dir: Path) -> list[Path]:
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))


def inspect(wandb_file: Path) -> dict:
    exe = shutil.which("wandb") or str(Path(sys.executable).parent / "wandb")
    out = subprocess.run([exe, "leet", "inspect", "--json", str(wandb_file)], capture_output=True, text=True, timeout=120, check=True)
    run, history = None, []
    for line in out.stdout.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("type") == "run" and run is None:
            run = rec["run"]
        elif rec.get("type") == "history":
            item = {k: v for k, v in rec["history"]["item"].items() if not k.startswith("_")}
            history.append(item)
    return {"run": run, "history": history}


def summary(wandb_file: Path) -> dict:
    """The run's final state as W&B stored it: summary, exit code and state."""
    exe = shutil.which("wandb") or str(Path(sys.executable).parent / "wandb")
    out = subprocess.run([exe, "leet", "inspect", "--summary", "--json", str(wandb_file)], capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout)

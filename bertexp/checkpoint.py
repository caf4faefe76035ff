"""Checkpoints: `checkpoints/step_0000100/` in `save_pretrained` format (model + tokenizer), loadable again
with `model=pretrained model.path=...`, plus `trainer_state.pt` (optimizer, scheduler, RNG, data position).

A checkpoint is written under a temporary name and renamed into place, so a run killed at any moment
(SIGKILL included) leaves either a complete checkpoint or none; `last` is a symlink swapped atomically.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from bertexp.errors import CheckpointError

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.pt"


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1][1] if found else None


def rng_state() -> dict:
    """RNG states as tensors and plain Python values only, so `torch.load(weights_only=True)` reads them."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": py_gauss},
    }
    # No CUDA RNG state: every step reseeds the generators it draws from (bertexp.train.Stepper), and a state per
    # visible GPU would not restore on a machine with fewer (8 saved, 1 visible: IndexError)
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    # state["cuda"], written by an older bertexp, is ignored: see rng_state


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, trainer_state: dict, keep: int,
                    files: dict | None = None) -> Path:
    """Write checkpoints/step_N (and point `last` at it); `files` are JSON files to add, {name: value}."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    save_vocab_txt(tokenizer, tmp)
    torch.save({**trainer_state, "rng": rng_state()}, tmp / STATE_FILE)
    for name, value in (files or {}).items():
        (tmp / name).write_text(json.dumps(value, indent=0, ensure_ascii=False, default=str), encoding="utf-8")
    if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    link_tmp = root / f".last-{os.getpid()}"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    os.symlink(final.name, link_tmp)
    os.replace(link_tmp, root / "last")
    _prune(root, keep)
    return final


def save_vocab_txt(tokenizer, folder: Path) -> None:
    """vocab.txt beside tokenizer.json, one entry per line in id order (bert-base-chinese's layout): what
    tools that read BERT vocabularies, and BertTokenizer itself, look for."""
    vocab = tokenizer.get_vocab()
    (Path(folder) / "vocab.txt").write_text("".join(t + "\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])),
                                            encoding="utf-8")


def _prune(root: Path, keep: int) -> None:
    for stale in root.glob(".tmp-step_*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    if keep and keep > 0:
        for _, path in checkpoint_dirs(root.parent)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)


def load_trainer_state(path: Path) -> dict:
    """Tensors and plain values only (weights_only): a checkpoint from elsewhere cannot run code on load."""
    try:
        return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch colours its message
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            reason = (f"it holds a {found.group(1)} object, not only tensors and plain values: a checkpoint of an older "
                      "bertexp, or not bertexp's; start afresh with trainer.resume=never")
        else:
            reason = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path}: cannot read {STATE_FILE} safely ({reason})") from None

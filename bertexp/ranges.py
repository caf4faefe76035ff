"""Value ranges of the config, checked from the composed config alone: before torch is imported and before
Hydra makes a run dir (`RangeCheck`, a Hydra callback named in conf/config.yaml), so a typo such as
`masking.ratio=1.5` is one line in a second and leaves nothing behind. In a sweep every job's config is
checked as it starts (a job out of range fails alone, and the others go on).

Types and unknown keys are checked earlier, when the config is composed (bertexp.schema). The objects that
use the values (bertexp.masking, bertexp.optim, bertexp.data.dataset, ...) check them again where they are
built, with the same messages, for configs that do not come through run.py.
"""
from __future__ import annotations

import math
import sys

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from bertexp.errors import BertexpError, ConfigError

_SPAN = "(room for [CLS] A [SEP] B [SEP])"


def _in(low, high, low_open=False, high_open=False):
    def ok(v):
        v = float(v)
        return math.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    return ok


def _at_least(low):
    return lambda v: float(v) >= low


# key: (test of a set value, message after "KEY=VALUE"); a null value is not checked (null means "none" or "auto")
RANGES = {
    "masking.ratio": (_in(0, 1, True, True), "must be in (0, 1) (exclusive)"),
    "masking.final_ratio": (_in(0, 1, True, True), "must be in (0, 1) (exclusive)"),
    "masking.mask_token_prob": (_in(0, 1), "must be in [0, 1]"),
    "masking.random_token_prob": (_in(0, 1), "must be in [0, 1]"),
    "masking.step_at": (_in(0, 1), "must be in [0, 1] (a fraction of the run)"),
    "masking.p": (_in(0, 1, low_open=True), "must be in (0, 1]"),
    "masking.max_span": (_at_least(1), "must be >= 1"),
    "data.batch_size": (_at_least(1), "must be an integer >= 1"),
    "data.max_length": (_at_least(8), f"must be an integer >= 8 {_SPAN}"),
    "data.val_fraction": (_in(0, 0.5), "must be in [0, 0.5]"),
    "data.short_seq_prob": (_in(0, 1), "must be in [0, 1]"),
    "model.vocab_size": (_at_least(16), "must be >= 16"),
    "objective.nsp_weight": (lambda v: 0 <= float(v) < math.inf, "must be a number >= 0 (0: MLM only)"),
    "trainer.log_every": (_at_least(1), "must be >= 1"),
    "trainer.eval_every": (_at_least(1), "must be >= 1"),
    "trainer.save_every": (_at_least(1), "must be >= 1"),
    "trainer.grad_accum": (_at_least(1), "must be >= 1"),
    "trainer.keep_checkpoints": (_at_least(0), "must be >= 0"),
    "trainer.max_bad_steps": (_at_least(0), "must be >= 0"),
    "trainer.exam_pairs": (_at_least(1), "must be >= 1 (or null for every held-out pair)"),
    "trainer.exam_length": (_at_least(8), f"must be >= 8 {_SPAN}"),
}


# key: the values it may take (checked when set; the objects check them again where they are built)
CHOICES = {
    "model.position_init": ("random", "sinusoidal"),
}


_SHOWN_SHORT = ("masking.ratio", "masking.final_ratio", "optim.decay_fraction")  # as their objects write them


def _shown(key: str, v) -> str:
    return f"{v:g}" if key in _SHOWN_SHORT else str(v)


def check_ranges(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first field of `cfg` outside its range."""
    from omegaconf import OmegaConf

    from bertexp.budget import Budget

    for key, (ok, message) in RANGES.items():
        try:
            v = OmegaConf.select(cfg, key, default=None)
        except Exception:  # noqa: BLE001 - an interpolation only a running job resolves: checked where it is used
            continue
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not ok(v):
            raise ConfigError(f"{key}={_shown(key, v)} {message}")
    for key, allowed in CHOICES.items():
        v = OmegaConf.select(cfg, key, default=None)
        if v is not None and v not in allowed:
            raise ConfigError(f"{key}={v!r} must be one of {', '.join(allowed)}")
    if cfg.get("optim") is not None:
        check_optim(cfg.optim)
    if cfg.get("task") is not None:
        check_task(cfg.task)
    if cfg.get("trainer") is not None and not cfg.get("task"):
        Budget.from_config(cfg.trainer)  # max_steps or one budget, each > 0 (torch-free: bertexp.budget)


SCHEDULES = ("linear", "cosine", "wsd")


def _positive(v) -> bool:
    return math.isfinite(float(v)) and float(v) > 0


def check_optim(cfg) -> None:
    """Range checks of optim.*: here, before torch is imported (RangeCheck), and where the optimizer and the lr
    schedule are built (bertexp.optim), one function for both."""
    if not _positive(cfg.lr):
        raise ConfigError(f"optim.lr={cfg.lr} must be a positive number")
    if not (math.isfinite(float(cfg.weight_decay)) and float(cfg.weight_decay) >= 0):
        raise ConfigError(f"optim.weight_decay={cfg.weight_decay} must be >= 0")
    if int(cfg.warmup_steps) < 0:
        raise ConfigError(f"optim.warmup_steps={cfg.warmup_steps} must be >= 0")
    fraction = cfg.get("warmup_fraction")
    if fraction is not None and not 0.0 <= float(fraction) < 1.0:
        raise ConfigError(f"optim.warmup_fraction={fraction} must be in [0, 1) (or null: warm-up by steps only)")
    if not 0.0 <= float(cfg.min_lr_ratio) <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={cfg.min_lr_ratio} must be in [0, 1]")
    schedule = str(cfg.get("schedule", "linear"))
    if schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={schedule!r} must be one of {', '.join(SCHEDULES)}")
    decay = float(cfg.get("decay_fraction", 0.2))
    if not 0.0 < decay <= 1.0:
        raise ConfigError(f"optim.decay_fraction={decay:g} must be in (0, 1] (the share of the run the lr decays over)")


TASKS = ("sentiment", "ner")


def check_task(tc) -> None:
    """Range checks of task.* (a task= job's, or each of trainer.downstream's)."""
    if tc.name not in TASKS:
        raise ConfigError(f"task.name={tc.name!r} must be one of {', '.join(TASKS)}")
    for field, low in (("seeds", 1), ("epochs", 1), ("batch_size", 1), ("max_length", 8), ("bucket", 1)):
        if int(tc.get(field, low)) < low:
            raise ConfigError(f"task.{field}={tc[field]} must be >= {low}")
    if not _positive(tc.lr):
        raise ConfigError(f"task.lr={tc.lr} must be > 0")
    for field in ("train_limit", "eval_limit"):
        if tc.get(field) is not None and int(tc[field]) < 1:
            raise ConfigError(f"task.{field}={tc[field]} must be >= 1 (or null: all examples)")


class RangeCheck(Callback):
    """Checks a single run's value ranges before Hydra makes its run dir. (A sweep's jobs are checked as each
    starts: a job out of range fails alone, is listed with its error, and the others go on.)"""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        try:
            check_ranges(config)
        except BertexpError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

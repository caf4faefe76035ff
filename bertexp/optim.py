"""Optimizer and learning-rate schedule.

The optimizer itself comes from the config (`optim.optimizer`, a `_partial_` `_target_`); this module only
decides which parameters get weight decay (not biases, not LayerNorm, as in BERT) and the schedule: linear
warm-up to `optim.lr` over `warmup_steps` steps, then linear decay to `min_lr_ratio * lr` at the end of the
run, as a function of the fraction of the run done (bertexp.budget), so a time-, token- or FLOP-budgeted run
reaches its final learning rate exactly when its budget ends.
"""
from __future__ import annotations

import math

import torch
from hydra.utils import instantiate

from bertexp.errors import ConfigError


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    lr = float(cfg.lr)
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"optim.lr={cfg.lr} must be a positive number")
    if float(cfg.weight_decay) < 0:
        raise ConfigError(f"optim.weight_decay={cfg.weight_decay} must be >= 0")
    factory = instantiate(cfg.optimizer)
    return factory(param_groups(model, float(cfg.weight_decay)))


def lr_factor(step: int, progress: float, warmup_steps: int, decay_from: float, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for the step about to be taken (`step`, 0-based), `progress` of the run done.
    Warm-up counts steps (it is about the optimizer's statistics, not the budget); the decay runs linearly
    from 1 at `decay_from` (the progress when warm-up ended) to `min_lr_ratio` at progress 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay_from >= 1.0:
        return 1.0
    f = min(1.0, max(0.0, (progress - decay_from) / (1.0 - decay_from)))
    return 1.0 - (1.0 - min_lr_ratio) * f


class ProgressLR:
    """Sets each parameter group's lr from (step, progress) before every step. Stateless: everything it
    needs is in the run state, so a resume sets exactly the lr an uninterrupted run would."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, min_lr_ratio: float):
        self.optimizer = optimizer
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.peaks = [g["lr"] for g in optimizer.param_groups]

    def set(self, step: int, progress: float, decay_from: float) -> float:
        factor = lr_factor(step, progress, self.warmup_steps, decay_from, self.min_lr_ratio)
        for g, peak in zip(self.optimizer.param_groups, self.peaks):
            g["lr"] = peak * factor
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"warmup_steps": self.warmup_steps, "min_lr_ratio": self.min_lr_ratio}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore (the lr is a function of the run state); older checkpoints hold LambdaLR's."""


def build_scheduler(cfg, optimizer) -> ProgressLR:
    warmup = int(cfg.warmup_steps)
    if warmup < 0:
        raise ConfigError(f"optim.warmup_steps={warmup} must be >= 0")
    if not 0.0 <= float(cfg.min_lr_ratio) <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={cfg.min_lr_ratio} must be in [0, 1]")
    return ProgressLR(optimizer, warmup, float(cfg.min_lr_ratio))

"""Optimizer and learning-rate schedule.

The optimizer itself comes from the config (`optim.optimizer`, a `_partial_` `_target_`); this module only
decides which parameters get weight decay (not biases, not LayerNorm, as in BERT) and the schedule: linear
warm-up to `optim.lr`, then linear decay to `min_lr_ratio * lr` at `max_steps`.
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


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at `step` (0-based: the step about to be taken)."""
    if step < warmup_steps:  # warm-up: from lr/warmup up to lr
        return (step + 1) / warmup_steps
    if max_steps <= warmup_steps:
        return 1.0
    # decay: linear from 1 at the end of warm-up to min_lr_ratio at max_steps
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    return 1.0 - (1.0 - min_lr_ratio) * progress


def build_scheduler(cfg, optimizer, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(cfg.warmup_steps)
    if warmup < 0:
        raise ConfigError(f"optim.warmup_steps={warmup} must be >= 0")
    if not 0.0 <= float(cfg.min_lr_ratio) <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={cfg.min_lr_ratio} must be in [0, 1]")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, max_steps, float(cfg.min_lr_ratio))
    )

"""Optimizer and learning-rate schedule.

The optimizer itself comes from the config (`optim.optimizer`, a `_partial_` `_target_`); this module only
decides which parameters get weight decay (not biases, not LayerNorm, as in BERT) and the schedule: linear
warm-up to `optim.lr` over `warmup_steps` steps, then a decay to `min_lr_ratio * lr` at the end of the run
(`optim.schedule`: linear, cosine, or warmup-stable-decay over the last `decay_fraction` of the run), as a
function of the fraction of the run done (bertexp.budget), so a time-, token- or FLOP-budgeted run reaches
its final learning rate exactly when its budget ends. Warm-up lasts `warmup_steps` steps, or
`warmup_fraction` of the run if that comes first: a short run (or a slow one on a budget) still finishes its
warm-up and ends at its final lr.
"""
from __future__ import annotations

import math

import torch
from hydra.utils import instantiate

from bertexp.ranges import check_optim


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
    check_optim(cfg)
    factory = instantiate(cfg.optimizer)
    return factory(param_groups(model, float(cfg.weight_decay)))


def warmup_done(step: int, progress: float, warmup_steps: int, warmup_fraction: float | None) -> float:
    """How far warm-up is for the step about to be taken (1 = over): it ends after `warmup_steps` steps or at
    the fraction `warmup_fraction` of the run, whichever comes first — so a budgeted run whose steps are
    slow still warms up within its budget."""
    by_steps = (step + 1) / warmup_steps if warmup_steps > 0 else 1.0
    by_share = 1.0 if warmup_fraction is not None and warmup_fraction <= 0 else (
        progress / warmup_fraction if warmup_fraction is not None else 0.0)
    return min(1.0, max(by_steps, by_share))




def lr_factor(warm: float, progress: float, decay_from: float | None, min_lr_ratio: float, schedule: str = "linear",
              decay_fraction: float = 0.2) -> float:
    """Multiplier of the peak lr at `progress` (the fraction of the run done): `warm` (< 1) during warm-up;
    after it, from 1 down to `min_lr_ratio` at the end of the run:
    - linear: in a straight line from `decay_from` (the fraction done when warm-up ended);
    - cosine: along half a cosine from `decay_from` (slow at both ends);
    - wsd (warmup-stable-decay): 1 until the run's last `decay_fraction`, then in a straight line."""
    if warm < 1.0:
        return warm
    if decay_from is None or decay_from >= 1.0:
        return 1.0
    start = max(decay_from, 1.0 - decay_fraction) if schedule == "wsd" else decay_from
    if start >= 1.0:
        return 1.0
    f = min(1.0, max(0.0, (progress - start) / (1.0 - start)))
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * f))
    return 1.0 - (1.0 - min_lr_ratio) * f


class ProgressLR:
    """The learning-rate schedule of every run: pretraining, fine-tuning and the benchmark's reference pipeline.

    `apply(step, progress, ends)` sets each parameter group's lr for the step about to be taken: warm-up, then
    the decay from where warm-up ended (`decay_from`, the fraction of the run done then) to the end of the run.
    `fit(budget)` fixes where the decay starts for the run's budget before it trains, so that a run resumed
    with a larger budget follows exactly the schedule of a fresh run of the new size: on a step budget it is
    a function of the budget alone; on the others it is found again in the run's totals before each of its
    first `warmup_steps` steps (`history`: tokens and FLOPs per step do not depend on the budget), measured
    against the budget as it is now. Its state (`decay_from`, `history`) goes into every checkpoint."""

    HISTORY_LIMIT = 100_000  # warm-ups longer than this many steps keep no history (a resume keeps decay_from)

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, warmup_fraction: float | None,
                 min_lr_ratio: float, schedule: str = "linear", decay_fraction: float = 0.2):
        self.optimizer = optimizer
        self.warmup_steps, self.warmup_fraction, self.min_lr_ratio = warmup_steps, warmup_fraction, min_lr_ratio
        self.schedule, self.decay_fraction = schedule, decay_fraction
        self.peaks = [g["lr"] for g in optimizer.param_groups]
        self.decay_from: float | None = None
        self.history: list[dict] = []  # the run's totals (step, tokens, ...) before each step of the warm-up by steps

    def warm(self, step: int, progress: float) -> float:
        return warmup_done(step, progress, self.warmup_steps, self.warmup_fraction)

    def fit(self, budget) -> None:
        """Where the decay starts, for this budget (see the class's doc)."""
        from types import SimpleNamespace

        if budget.by_steps:
            n = budget.max_steps
            ends = (s / n for s in range(min(n, max(self.warmup_steps, 1))) if self.warm(s, s / n) >= 1.0)
            self.decay_from = next(ends, None)
        elif self.history:  # else (warm-up not begun, or too long to keep): as it was, or set by the loop
            at = (budget.progress(SimpleNamespace(**h)) for h in self.history)
            self.decay_from = next((p for s, p in enumerate(at) if self.warm(s, p) >= 1.0), None)

    def apply(self, step: int, progress: float, ends: float, totals: dict | None = None) -> float:
        """Set the lr of step `step`, which starts at `progress` and ends at about `ends` (fractions of the run;
        a step's lr is the schedule's value where it ends, so the last step's is the final lr). `totals`: the
        run's totals before this step (kept through the warm-up by steps, for `fit`). Returns the lr."""
        if totals is not None and step == len(self.history) and step < min(self.warmup_steps, self.HISTORY_LIMIT):
            self.history.append(totals)
        if self.decay_from is None and self.warm(step, progress) >= 1.0:
            self.decay_from = progress
        factor = lr_factor(self.warm(step, ends), ends, self.decay_from, self.min_lr_ratio, self.schedule,
                           self.decay_fraction)
        for g, peak in zip(self.optimizer.param_groups, self.peaks):
            g["lr"] = peak * factor
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"peaks": list(self.peaks), "warmup_steps": self.warmup_steps, "warmup_fraction": self.warmup_fraction,
                "min_lr_ratio": self.min_lr_ratio, "schedule": self.schedule, "decay_fraction": self.decay_fraction,
                "decay_from": self.decay_from, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        """Where warm-up ended; the settings come from the config (older checkpoints hold LambdaLR's state)."""
        self.decay_from, self.history = state.get("decay_from"), list(state.get("history") or [])


def build_scheduler(cfg, optimizer) -> ProgressLR:
    """Warm-up ends after `optim.warmup_steps` steps or at `optim.warmup_fraction` of the run, whichever comes
    first, so a run shorter than its warm-up (max_steps=40 with warmup_steps=100) still reaches its peak and
    decays to its final lr by the end."""
    check_optim(cfg)
    fraction = cfg.get("warmup_fraction")
    return ProgressLR(optimizer, int(cfg.warmup_steps), None if fraction is None else float(fraction),
                      float(cfg.min_lr_ratio), str(cfg.get("schedule", "linear")), float(cfg.get("decay_fraction", 0.2)))

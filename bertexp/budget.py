"""What ends a run, and how far along it is.

A run ends on steps (`trainer.max_steps`) or on a compute budget: wall-clock minutes of training steps
(`trainer.budget_minutes`; evaluations and checkpoints are not counted, so how often a run is scored does not
change how long it trains), non-pad tokens (`trainer.max_tokens`) or model FLOPs (`trainer.max_flops`).
When any budget is set, the budgets alone end the run (max_steps no longer does), and with several, the one
reached first. `progress` — the fraction of the run done, in [0, 1] — drives the learning-rate schedule and
the masking schedule, so runs of any batch size or speed end their schedules exactly when their budget ends.

Steps, tokens and FLOPs are functions of the data and the step, so a resumed run's schedules are exact; a
wall-clock budget is not (a resumed run is as fast as its machine is then), and is counted over all its
attempts, so a resume does not start the budget afresh.
"""
from __future__ import annotations

from dataclasses import dataclass

from bertexp.errors import ConfigError

# trainer field -> (RunState total it limits, unit shown to people)
LIMITS = {
    "max_steps": ("step", "steps"),
    "max_tokens": ("tokens", "tokens"),
    "max_flops": ("flops", "FLOPs"),
    "budget_minutes": ("train_time", "minutes"),
}


@dataclass(frozen=True)
class Budget:
    limits: dict  # RunState attribute -> limit in that attribute's unit (budget_minutes as seconds)

    @classmethod
    def from_config(cls, tc) -> "Budget":
        budgets = {}
        for name in ("max_tokens", "max_flops", "budget_minutes"):
            v = tc.get(name)
            if v is None:
                continue
            if not float(v) > 0:
                raise ConfigError(f"trainer.{name}={float(v):g} must be > 0 (or null: no such budget)")
            attr = LIMITS[name][0]
            budgets[attr] = float(v) * 60.0 if name == "budget_minutes" else float(v)
        if tc.get("max_tokens") is not None and float(tc.max_tokens) != int(float(tc.max_tokens)):
            raise ConfigError(f"trainer.max_tokens={tc.max_tokens} must be a whole number of tokens")
        if budgets:
            return cls(budgets)
        if tc.get("max_steps") is None:
            raise ConfigError("trainer.max_steps is null and no budget is set: set trainer.max_steps, "
                              "trainer.budget_minutes, trainer.max_tokens or trainer.max_flops")
        if int(tc.max_steps) < 1:
            raise ConfigError(f"trainer.max_steps={tc.max_steps} must be >= 1")
        return cls({"step": float(tc.max_steps)})

    @property
    def by_time(self) -> bool:
        return "train_time" in self.limits

    @property
    def by_steps(self) -> bool:
        return list(self.limits) == ["step"]

    @property
    def max_steps(self) -> int | None:
        return int(self.limits["step"]) if self.by_steps else None

    def progress(self, state) -> float:
        """Fraction of the run done, by whichever budget is furthest along."""
        return min(1.0, max(float(getattr(state, attr)) / limit for attr, limit in self.limits.items()))

    def done(self, state) -> bool:
        return any(float(getattr(state, attr)) >= limit for attr, limit in self.limits.items())

    def describe(self) -> str:
        names = {v[0]: (k, v[1]) for k, v in LIMITS.items()}
        parts = []
        for attr, limit in self.limits.items():
            field, unit = names[attr]
            shown = limit / 60.0 if attr == "train_time" else limit
            parts.append(f"trainer.{field}={shown:g} {unit}")
        return " or ".join(parts)

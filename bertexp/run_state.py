"""The state a run carries from step to step, in one object that a checkpoint saves and restores whole.

Step, data position, the logging window (sums since the last `train/*` record), the best evaluation so far
and the running totals: restoring all of them is what makes a resumed run log exactly what an
uninterrupted one logs, and report the same best values.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from bertexp.data.dataset import Position

WINDOW_KEYS = ("steps", "mlm", "nsp", "tokens", "selected", "corrupted", "predicted", "scheduled", "maskable", "seq",
               "rows", "width", "time", "data_wait", "nsp_random")
# Which way is better, for each evaluation metric whose best value the summary reports.
BEST = {"eval/mlm_acc": max, "eval/mlm_top5_acc": max, "eval/nsp_acc": max, "eval/mlm_loss": min, "eval/perplexity": min}


def _empty_window() -> dict[str, float]:
    return dict.fromkeys(WINDOW_KEYS, 0.0)


@dataclass
class RunState:
    step: int = 0
    epoch: int = 0  # data position: the next batch is examples[index : index + batch] of this epoch
    index: int = 0
    bad_steps: int = 0
    wandb_id: str | None = None
    exam_id: str | None = None  # the exam `best` was scored on
    window: dict[str, float] = field(default_factory=_empty_window)
    best: dict[str, float] = field(default_factory=dict)
    tokens: int = 0  # non-pad tokens trained on, all ranks
    predicted_tokens: int = 0  # positions whose prediction was scored
    flops: float = 0.0  # model FLOPs, forward and backward, prediction heads included
    train_time: float = 0.0  # seconds spent in training steps, all attempts (evaluation and checkpoints excluded)
    last_increment: float = 0.0  # how much of the run the previous step did (estimates where this one ends)
    previous: dict | None = None  # the totals before the previous step: its increment again under a changed budget

    @property
    def position(self) -> Position:
        return Position(self.epoch, self.index)

    def advance(self, position: Position, seconds: float, flops: float = 0.0, **sums: float) -> None:
        """One optimizer step done: move the data position and add the step to the logging window."""
        self.previous = self.totals()
        self.step += 1
        self.epoch, self.index = position.epoch, position.index
        self.tokens += int(sums.get("tokens", 0))
        self.predicted_tokens += int(sums.get("predicted", 0))
        self.flops += flops
        self.train_time += seconds
        w = self.window
        w["steps"] += 1
        w["time"] += seconds
        for key, v in sums.items():
            w[key] = max(w[key], v) if key == "width" else w[key] + v

    def axes(self) -> dict:
        """The compute axes every record carries beside `step`."""
        return {"step": self.step, "tokens": self.tokens, "predicted_tokens": self.predicted_tokens,
                "flops": self.flops, "elapsed_s": round(self.train_time, 3)}

    def totals(self) -> dict:
        """What budgets count (bertexp.budget), as they stand now."""
        return {"step": self.step, "tokens": self.tokens, "flops": self.flops, "train_time": self.train_time}

    def take_window(self) -> dict[str, float]:
        """The logging window's sums, emptied for the next one."""
        w, self.window = self.window, _empty_window()
        return w

    def note_eval(self, record: dict) -> None:
        for key, better in BEST.items():
            v = record.get(key)
            if isinstance(v, (int, float)) and v == v:  # not NaN
                self.best[key] = better(self.best.get(key, v), v)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunState":
        state = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        state.window = {**_empty_window(), **state.window}
        return state

"""User-facing errors: each carries a one-line message naming the field or file and what is wrong.

`run.py` prints these as a single line (no traceback) and exits non-zero; anything else is a bug and
keeps its traceback.
"""


class BertexpError(Exception):
    """Base class of every error whose message is meant for the user as is."""


class ConfigError(BertexpError):
    """A config value is out of range or inconsistent with another."""


class DataError(BertexpError):
    """The corpus file is missing, unreadable or unusable for pretraining."""


class CheckpointError(BertexpError):
    """A model directory or checkpoint is missing files or inconsistent."""


class TrainingError(BertexpError):
    """Training cannot continue (e.g. non-finite loss)."""


class Interrupted(BertexpError):
    """A signal asked the run to stop; a checkpoint was written first."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

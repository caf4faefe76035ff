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


def config_error_line(e: BaseException) -> str | None:
    """One line for an error in composing the config from the command line (an unknown option or key, a wrong
    type, bad override syntax), or None when `e` is not one (then it is a bug, and keeps its traceback)."""
    from hydra.errors import HydraException, InstantiationException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, InstantiationException) or not isinstance(e, (HydraException, OmegaConfBaseException)):
        return None

    def first(x: BaseException) -> str:
        text = str(x).strip()
        return text.splitlines()[0].strip() if text else type(x).__name__

    line = first(e).removeprefix("In 'config': ").rstrip(".")
    if isinstance(e, OverrideParseException):
        line = f"cannot parse the override {getattr(e, 'override', '')!r}: {line}"
    elif isinstance(e, MissingConfigException) and e.options:
        line += f" (options: {', '.join(sorted(e.options))})"
    elif e.__cause__ is not None and first(e.__cause__) not in line:
        line += f": {first(e.__cause__)}"
    return line

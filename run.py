"""bertexp entry point: `python run.py [overrides]`, `python run.py -m [sweep overrides]`.

Thin by design: Hydra composes conf/, bertexp.job runs one job.
"""
import os
import sys

import hydra
from omegaconf import DictConfig

import bertexp.resolvers  # noqa: F401  ${run_time:...}, the same on every torchrun rank
import bertexp.schema  # noqa: F401  registers the config schemas that conf/ names in its defaults


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from bertexp.job import run_job

    return run_job(cfg)


if __name__ == "__main__":
    from bertexp.errors import config_error_line

    # Hydra raises instead of printing its report, and we print one line; unless the user asked for its report
    full_error = "HYDRA_FULL_ERROR" in os.environ and "_BERTEXP_SET_HYDRA_FULL_ERROR" not in os.environ
    if "HYDRA_FULL_ERROR" not in os.environ:
        os.environ["HYDRA_FULL_ERROR"] = os.environ["_BERTEXP_SET_HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except Exception as e:  # noqa: BLE001 - a bad command line is one line and exit 2; anything else is re-raised
        line = None if full_error else config_error_line(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)

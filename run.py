"""bertexp entry point: `python run.py [overrides]`, `python run.py -m [sweep overrides]`.

Thin by design: Hydra composes conf/, bertexp.job runs one job.
"""
import hydra
from omegaconf import DictConfig

import bertexp.resolvers  # noqa: F401  ${run_time:...}, the same on every torchrun rank
import bertexp.schema  # noqa: F401  registers the config schemas that conf/ names in its defaults


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from bertexp.job import run_job

    return run_job(cfg)


if __name__ == "__main__":
    main()

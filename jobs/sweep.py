#!/usr/bin/env python
"""A hyperparameter sweep (num_heads x learning rate) of APT models: Ray Tune over Ray Train.

    python jobs/sweep.py [--config conf/sweep.yaml] [key=value ...]

Running the same command again resumes the sweep in output_dir/<sweep.name>.
Exit codes: 0 success, 1 every trial failed, 2 user error (config or data).
"""

import sys

from hlbd_ray.cli import parse_job_args
from hlbd_ray.errors import run_cli
from hlbd_ray.sweep import run_sweep_job


def main(argv: list[str]) -> int:
    cfg = parse_job_args(argv, "sweep.yaml", description=__doc__.splitlines()[0])
    return run_sweep_job(cfg)


if __name__ == "__main__":
    sys.exit(run_cli(main))

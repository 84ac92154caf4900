#!/usr/bin/env python
"""One APT training run on Ray Train.

    python jobs/train.py [--config conf/train.yaml] [key=value ...]

Exit codes: 0 success, 1 failure at run time, 2 user error (config or data).
"""

import sys

from hlbd_ray.cli import parse_job_args
from hlbd_ray.errors import run_cli
from hlbd_ray.run import run_training_job


def main(argv: list[str]) -> int:
    cfg = parse_job_args(argv, "train.yaml", description=__doc__.splitlines()[0])
    return run_training_job(cfg)


if __name__ == "__main__":
    sys.exit(run_cli(main))

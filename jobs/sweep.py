#!/usr/bin/env python
"""A hyperparameter sweep (num_heads x learning rate) of APT models: Ray Tune over Ray Train.

    python jobs/sweep.py [--config conf/sweep.yaml] [key=value ...]

Running the same command again resumes the sweep in output_dir/<sweep.name>.
Exit codes: 0 success, 1 every trial failed, 2 user error (config or data), 3 stalled
(sweep.stall_timeout_s), 130 Ctrl-C (SIGINT), 143 SIGTERM; after 3, 130 and 143 the
state is saved and the same command resumes the sweep.
"""

import sys

from hlbd_ray.errors import run_cli
from hlbd_ray.sweep import main

if __name__ == "__main__":
    sys.exit(run_cli(main))

#!/usr/bin/env python
"""One APT training run on Ray Train.

    python jobs/train.py [--config conf/train.yaml] [key=value ...]

Re-running the same command resumes the run from its last checkpoint.
Exit codes: 0 success, 1 failure at run time, 2 user error (config or data).
"""

import sys

from hlbd_ray.errors import run_cli
from hlbd_ray.run import main

if __name__ == "__main__":
    sys.exit(run_cli(main))

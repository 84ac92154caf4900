"""What every benchmark prints around its figures: the machine's load, and its JSON line.

The load average frames each run (on a shared machine, a busy neighbour shows there);
the JSON object is the last line of output, the one `--json` promises.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any


def print_load(when: str) -> float:
    """Print the 1, 5 and 15-minute load averages; return the 1-minute one."""
    load = os.getloadavg()
    print(f"load average at {when}: {' '.join(f'{x:.2f}' for x in load)}", flush=True)
    return load[0]


def print_json(result: Mapping[str, Any]) -> None:
    """One JSON object on one line; a float that is not finite is null (JSON has no NaN)."""
    print(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                      for k, v in result.items()}))

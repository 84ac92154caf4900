"""What names a trial's actors in Ray's logs; torch-free, for the Tune trial's process."""

from __future__ import annotations

import sys


def actor_banner(run: str, role: str, d_model: int, num_heads: int, lr: float) -> str:
    """What names a trial's actor in Ray's logs: its trial (in a sweep the Train run is
    named after it), config and role.

    Ray shows only the class name of the actors Train creates (RayTrainWorker,
    TrainController) and a function trainable's name for Tune's, the same for every
    trial: this is what tells them apart."""
    return f"[hlbd] trial {run}: d_model {d_model}, num_heads {num_heads}, lr {lr:.2e}; {role}"


# Ray's log monitor reads a line starting with this as the actor's new name: it keeps the
# line out of the driver's console, and prefixes every later line the actor prints there
# with it instead of the class name (ray._private.ray_constants.LOG_PREFIX_ACTOR_NAME).
RAY_ACTOR_NAME_PREFIX = ":actor_name:"


def name_actor_in_logs(banner: str) -> None:
    """Write `banner` as the first line of this actor's log files (dashboard: Actors ->
    the actor -> Log), off the driver's console. Ray tails stdout and stderr separately,
    so the name goes to both."""
    for stream in (sys.stdout, sys.stderr):
        print(f"{RAY_ACTOR_NAME_PREFIX}{banner}", file=stream, flush=True)

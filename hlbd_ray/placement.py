"""The sweep's placement groups, seen through Ray's public state API.

Ray Train creates each run's worker placement group from its controller actor, and only
Train's own cleaner removes it; a group created while a trial is being stopped can
outlive the trial and hold CPUs the next trials wait for forever (RAY_NOTES, Trap 3).
"""

from __future__ import annotations

import time
from typing import Any


def _address() -> str:
    import ray

    # Our own cluster: without it the state client refuses to choose when another Ray
    # instance runs on the machine.
    return ray.get_runtime_context().gcs_address


def job_groups(timeout: float = 10.0) -> list[Any]:
    """This job's placement groups that still hold or wait for resources."""
    import ray
    from ray.util.state import list_placement_groups

    job_id = ray.get_runtime_context().get_job_id()
    groups = list_placement_groups(address=_address(), filters=[("creator_job_id", "=", job_id)],
                                   detail=True, limit=10_000, timeout=int(timeout),
                                   raise_on_missing_output=False)
    return [g for g in groups if g.state != "REMOVED"]


def leftover_groups(settle_s: float = 15.0, poll_s: float = 1.0) -> list[Any]:
    """The job's groups still alive `settle_s` after the sweep (Train's cleaner needs ~1 s)."""
    deadline = time.monotonic() + settle_s
    while True:
        left = job_groups()
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(poll_s)


def describe(group: Any) -> str:
    bundles = group.bundles or []
    resources = bundles[0].get("unit_resources", {}) if bundles else {}
    return f"{group.placement_group_id[:12]} {group.state} {resources} x{len(bundles)}"

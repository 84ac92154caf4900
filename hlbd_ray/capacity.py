"""Whether a run's Train workers can be placed on the cluster's nodes, node by node.

Cluster totals are not enough: one worker of 2 CPUs fits two 1-CPU nodes by the totals
and no node; Ray would wait for it forever. Ray Train 2.60 asks for one placement group of `num_workers` identical bundles
(`resources_per_worker` each) with `ScalingConfig.placement_strategy`, "PACK" by default
(ray/train/v2/_internal/execution/worker_group/worker_group.py). PACK and SPREAD are
soft: bundles may land on any nodes, so the group fits when the nodes together hold
`num_workers` bundles; STRICT_PACK needs them on one node, STRICT_SPREAD on distinct nodes.
Bundles are identical, so counting whole bundles per node is exact, not a bin-packing guess.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from hlbd_ray.errors import UserError

EPS = 1e-9


def bundles_per_node(nodes: Iterable[dict[str, Any]], cpus: float, gpus: float) -> list[int]:
    """How many worker bundles (`cpus` CPUs, `gpus` GPUs) each alive node holds when empty.

    `nodes` is `ray.nodes()`'s format: dicts with "Alive" and "Resources" (the node's
    totals: a plan is about what could ever run, not what is free this second).
    """
    counts = []
    for node in nodes:
        if not node.get("Alive", False):
            continue
        have = node.get("Resources", {})
        fits = [math.floor(have.get("CPU", 0.0) / cpus + EPS) if cpus > 0 else math.inf,
                math.floor(have.get("GPU", 0.0) / gpus + EPS) if gpus > 0 else math.inf]
        fit = min(fits)
        counts.append(0 if fit == math.inf else int(fit))   # a bundle of nothing: not ours
    return counts


def groups_that_fit(counts: list[int], num_workers: int, strategy: str = "PACK") -> int:
    """How many worker groups of `num_workers` bundles the nodes hold at once."""
    if strategy == "STRICT_PACK":
        return sum(c // num_workers for c in counts)
    if strategy == "STRICT_SPREAD":
        # Each group takes one bundle from num_workers distinct nodes; groups never exceed
        # the total bundles, nor the number of times every group can find distinct nodes.
        groups = 0
        left = sorted(counts, reverse=True)
        while sum(1 for c in left if c > 0) >= num_workers:
            for i in range(num_workers):
                left[i] -= 1
            left.sort(reverse=True)
            groups += 1
        return groups
    return sum(counts) // num_workers          # PACK, SPREAD: soft, any nodes


def check_placeable(nodes: list[dict[str, Any]], num_workers: int, cpus: float, gpus: float,
                    strategy: str = "PACK") -> int:
    """Refuse (UserError) a worker group no node set can hold; else how many fit at once."""
    counts = bundles_per_node(nodes, cpus, gpus)
    groups = groups_that_fit(counts, num_workers, strategy)
    if groups < 1:
        sizes = ", ".join(f"{n.get('Resources', {}).get('CPU', 0):g}/{n.get('Resources', {}).get('GPU', 0):g}"
                          for n in nodes if n.get("Alive", False))
        raise UserError(
            f"train.num_workers={num_workers} workers of {cpus:g} CPUs and {gpus:g} GPUs each "
            f"cannot be placed ({strategy}): the nodes (CPUs/GPUs: {sizes}) hold "
            f"{sum(counts)} such workers; lower train.num_workers or cpus/gpus_per_worker")
    return groups

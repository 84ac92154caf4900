"""Per-node placement of a run's Train workers, on node lists in `ray.nodes()`'s format."""

from __future__ import annotations

import pytest

from hlbd_ray.capacity import bundles_per_node, check_placeable, groups_that_fit
from hlbd_ray.errors import UserError


def node(cpus: float, gpus: float = 0.0, alive: bool = True) -> dict:
    resources = {"CPU": cpus, "memory": 8e9, "node:10.0.0.1": 1.0}
    if gpus:
        resources["GPU"] = gpus
    return {"NodeID": f"n{cpus}-{gpus}", "Alive": alive, "Resources": resources}


# A head without CPUs for trials, and two workers of unequal size.
UNEQUAL = [node(0), node(3), node(1)]


def test_a_worker_larger_than_every_node_is_refused_although_the_totals_fit():
    # 4 CPUs in all, but no node holds a 2-CPU worker besides the 3-CPU one: one fits, two do not.
    assert check_placeable(UNEQUAL, 1, 2.0, 0.0) == 1
    with pytest.raises(UserError, match=r"num_workers=2 workers of 2 CPUs .* hold 1 such workers"):
        check_placeable(UNEQUAL, 2, 2.0, 0.0)
    with pytest.raises(UserError, match="cannot be placed"):
        check_placeable([node(1), node(1)], 1, 2.0, 0.0)      # 2 CPUs in all, no node has 2


def test_pack_spreads_a_group_over_nodes_when_it_must():
    assert bundles_per_node(UNEQUAL, 1.0, 0.0) == [0, 3, 1]
    assert check_placeable(UNEQUAL, 4, 1.0, 0.0) == 1         # 3 + 1 over two nodes
    assert check_placeable(UNEQUAL, 2, 1.0, 0.0) == 2         # two trials at once
    with pytest.raises(UserError):
        check_placeable(UNEQUAL, 5, 1.0, 0.0)


def test_strict_strategies_count_per_node():
    counts = bundles_per_node(UNEQUAL, 1.0, 0.0)
    assert groups_that_fit(counts, 2, "STRICT_PACK") == 1      # only the 3-CPU node
    assert groups_that_fit(counts, 2, "STRICT_SPREAD") == 1    # two distinct nodes once
    assert groups_that_fit(counts, 3, "STRICT_SPREAD") == 0    # the head holds none


def test_gpus_and_dead_nodes():
    nodes = [node(8, 1), node(8, 0.5), node(64, 4, alive=False)]
    assert bundles_per_node(nodes, 1.0, 0.5) == [2, 1]
    assert check_placeable(nodes, 3, 1.0, 0.5) == 1
    with pytest.raises(UserError, match="0.5 GPUs"):
        check_placeable(nodes, 4, 1.0, 0.5)                    # the dead node's 4 GPUs do not count
    assert bundles_per_node([node(4)], 1.0, 1.0) == [0]        # a GPU worker on a CPU node


def test_the_sweep_plan_caps_concurrency_by_what_the_nodes_hold():
    from hlbd_ray.config import load_config
    from hlbd_ray.sweep import plan_resources

    from .conftest import REPO

    cfg = load_config(REPO / "conf" / "smoke.yaml", ["train.num_workers=2", "sweep.max_concurrent_trials=0"])
    # Totals of 5 CPUs hold two 2-worker trials; nodes of 3, 1 and 1 CPUs hold 5 workers: 2 trials.
    assert plan_resources(cfg, {"CPU": 5.0}, [node(0), node(3), node(1), node(1)]).max_concurrent == 2
    big = load_config(REPO / "conf" / "smoke.yaml", ["train.cpus_per_worker=2"])
    assert plan_resources(big, {"CPU": 4.0}).max_concurrent == 2     # the totals alone
    with pytest.raises(UserError, match="cannot be placed"):
        plan_resources(big, {"CPU": 4.0}, [node(0), node(1.5), node(1.5), node(1)])

"""A Ray cluster on this host that a benchmark's sweeps attach to (`cluster.address`).

One cluster for several `jobs/sweep.py` runs pays Ray's start once, not once per sweep
(bench/regret.py); a head with no CPUs plus worker nodes gives a multi-node layout on one
host (bench/two_nodes.py). Trials cost the same either way: their time starts at Tune's
trial start, after the cluster is up.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator, Sequence
from typing import Any


def free_port() -> int:
    """A TCP port nobody listens on now. The dashboard's default (8265) may belong to
    another local cluster on the same machine, and then this one's state API is dead."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_cluster(head_cpus: int, node_cpus: Sequence[int] = ()) -> Iterator[Any]:
    """A head with `head_cpus` CPUs and a worker node per entry of `node_cpus`; yields the
    `ray.cluster_utils.Cluster` (attach to its `address`), and stops exactly these
    processes on the way out. tests/test_multinode.py uses it too."""
    from ray.cluster_utils import Cluster

    # The sweep needs the dashboard's state API (require_state_api), on this host only.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": head_cpus, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": free_port()})
    try:
        for cpus in node_cpus:
            cluster.add_node(num_cpus=cpus)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()

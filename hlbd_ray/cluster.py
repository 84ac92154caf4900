"""Starting or attaching to Ray, with the settings our runs need and safe network defaults."""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hlbd_ray.config import ClusterConfig
from hlbd_ray.errors import UserError

log = logging.getLogger(__name__)

# Ray Train's controller drains worker reports once per health-check interval; its 2 s
# default makes every ray.train.report block ~2 s. The value must reach the controller
# process, which lives wherever Ray starts actors: hence the driver env (a local cluster
# inherits it) *and* the job's runtime_env (an existing cluster does not).
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# How long a Train controller waits for its worker group's placement group before it
# gives up and retries (Train's default: 60 s). Read by the controller: same route.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def ray_env_vars(cluster: ClusterConfig, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Env vars for every Ray process of this job; a value the user already set wins."""
    wanted = {HEALTH_CHECK_ENV: str(cluster.health_check_interval_s),
              # The spot-node preemption watcher costs ~1 s per run start and only matters
              # on clusters with preemptible nodes (set it to 1 there).
              "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", **(extra or {})}
    return {k: v for k, v in wanted.items() if k not in os.environ}


def pin_cluster_address() -> None:
    """Name this job's cluster in RAY_ADDRESS inside a Ray worker process.

    Some Ray code finds its cluster by itself: Ray Train's placement-group cleaner calls
    the state API with no address. Left to search, it fails with "Found multiple active
    Ray instances" when another Ray runs on the same machine, or follows a stale
    `ray_current_cluster` record to a dead one; then the cleaner dies and stops freeing
    the placement groups of stopped trials (seen in the tests on a shared machine)."""
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def worker_setup(hook: str | Callable[[], None] | None) -> Callable[[], None]:
    """The job's `worker_process_setup_hook`: pin the cluster address, then run `hook`
    ("module.function" or a function), if any."""
    def setup() -> None:
        pin_cluster_address()
        if isinstance(hook, str):
            module, _, name = hook.rpartition(".")
            getattr(importlib.import_module(module), name)()
        elif hook is not None:
            hook()
    return setup


def start_ray(cluster: ClusterConfig, extra_env: dict[str, str] | None = None,
              setup_hook: str | Callable[[], None] | None = None,
              dashboard_port: int = 0) -> dict[str, Any]:
    """Attach to a running cluster (cluster.address or RAY_ADDRESS) or start a local one.

    `extra_env` joins the env vars of every Ray process of the job; `setup_hook`
    ("module.function", or a function) runs in each of its worker processes at start;
    `dashboard_port` (0: Ray's default, 8265) is for a local cluster only.
    A local cluster binds its dashboard to cluster.dashboard_host (127.0.0.1 unless the
    user asks otherwise): exposing it would hand job submission to the network.
    """
    import ray

    env = ray_env_vars(cluster, extra_env)
    os.environ.update(env)
    runtime_env: dict[str, Any] = {"env_vars": env} if env else {}
    runtime_env["worker_process_setup_hook"] = worker_setup(setup_hook)
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        context = ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # "local" starts a fresh cluster even when a stale /tmp/ray/ray_current_cluster
        # (left by a head that was killed) would make a bare ray.init() try to attach.
        context = ray.init(address="local", num_cpus=cluster.num_cpus, num_gpus=cluster.num_gpus,
                           include_dashboard=True, dashboard_host=cluster.dashboard_host,
                           runtime_env=runtime_env, dashboard_port=dashboard_port or None)  # None: Ray's default
    url = getattr(context, "dashboard_url", None)
    info = {"address": address or "local", "dashboard_url": f"http://{url}" if url else None,
            "resources": ray.cluster_resources()}
    if info["dashboard_url"]:
        mode = auth_mode(info["dashboard_url"])
        print("\n".join(dashboard_lines(info["dashboard_url"], mode)), flush=True)
    return info


def auth_mode(dashboard_url: str, timeout_s: float = 5.0) -> str:
    """"token" or "disabled": what the cluster's dashboard asks of a browser.

    Asked of the dashboard itself (the public, unauthenticated endpoint its own page
    reads first), so it is right for an attached cluster too; Ray's Python side has no
    public call for it. If the dashboard does not answer, RAY_AUTH_MODE decides, as for
    a local cluster Ray starts (token unless set to something else).
    """
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with no_proxy.open(f"{dashboard_url}/api/authentication_mode",
                           timeout=timeout_s) as answer:
            return str(json.load(answer)["authentication_mode"])
    except Exception as err:  # an old or busy dashboard: fall back on the setting
        log.info("dashboard %s did not say its auth mode (%s: %s); using RAY_AUTH_MODE",
                 dashboard_url, type(err).__name__, err)
        return os.environ.get("RAY_AUTH_MODE", "token").lower()


def dashboard_lines(url: str, mode: str) -> list[str]:
    """The dashboard URL and, when it asks for a token, the command that prints it."""
    lines = [f"Ray dashboard: {url}"]
    if mode == "token":
        ray_cli = Path(sys.executable).with_name("ray")
        lines.append(f"  it asks for the cluster's token: paste what `{ray_cli} get-auth-token` "
                     "prints (on the head node)")
    return lines


def require_state_api(timeout_s: float = 90.0) -> None:
    """Refuse a cluster without the dashboard's state API, before any trial starts.

    When a scheduler stops a trial early, its Train workers' placement group is removed
    by a cleaner that asks the state API whether the run's controller is gone. Without
    it the CPUs are never freed and the next trials wait forever.
    """
    import ray
    from ray.util.state import list_nodes

    # Our own cluster's address: without it the state client refuses to choose when
    # another Ray instance runs on the machine.
    address = ray.get_runtime_context().gcs_address
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            list_nodes(address=address, limit=1, timeout=5, raise_on_missing_output=False)
            return
        except Exception as err:  # the dashboard may still be starting (slowly, on a busy
            # machine): retry, then refuse
            if time.monotonic() > deadline:
                raise UserError(
                    f"the Ray cluster's dashboard/state API did not answer within {timeout_s:.0f} s "
                    f"({type(err).__name__}); sweeps need it to free early-stopped trials' "
                    "CPUs: start the head with --include-dashboard=true") from None
            time.sleep(1.0)

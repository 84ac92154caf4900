"""The sweep driver owns its trials' Train placement groups: none may outlive its trial.

Ray Train creates each run's worker placement group from its controller actor and only
its own `PlacementGroupCleaner` removes it, after registering the group once the workers
have started. A controller that dies before that (its trial stopped while the group was
pending or its workers were being created) leaves the group behind; so does a
controller that, already dying with its trial, restarts its worker group. Such a group
holds its CPUs until the job ends, and on a small machine the next trials wait for them
forever (RAY_NOTES, Trap 3). Measured in BENCHMARKS.md: 1-4 groups leaked per stress run.

Which trial owns a group: the state API drops the group's creator (GCS keeps
`creator_actor_id`; `PlacementGroupState` has no such column) and Train gives its groups
no name. So each trial marks its own: its Train `ScalingConfig.label_selector` carries
`{TRIAL_KEY: "!<trial id>", OWNER_KEY: "!<trial actor id>"}`, which Train copies into
every bundle of every worker group it creates for that run, retries included, and which
the state API returns with the group. "Not equal to x" matches every node (no node has
these labels), so the mark never constrains scheduling. A mark names exactly one trial
of this job (trial ids are unique within an experiment, and we only look at groups our
own job created) and the actor that owns the run: the trial's function actor, whose
death takes the Train controller with it (the controller runs inside it by default,
`sweep.controller_in_trial`, or else is its child actor).

When Tune reports a trial stopped, errored or completed, its groups are removed as soon
as that actor is gone, and after `grace_s` at the latest. Not before: a controller that
is still alive when its workers die restarts them in a new group.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from hlbd_ray.live import LiveCallback

log = logging.getLogger(__name__)

TRIAL_KEY, OWNER_KEY = "hlbd-ray.io/trial", "hlbd-ray.io/owner"
PERSISTENT_FAILURES = 5     # state API failures in a row before the console hears of it


def trial_tag(trial_id: str, owner_actor_id: str) -> dict[str, str]:
    """The label selector marking a trial's Train placement groups as its own."""
    return {TRIAL_KEY: "!" + trial_id, OWNER_KEY: "!" + owner_actor_id}


def marks_of(group: Any) -> tuple[str | None, str | None]:
    """(trial id, owner actor id) a group is marked with; (None, None) if unmarked."""
    for bundle in group.bundles or []:
        selector = bundle.get("label_selector") or {}
        if TRIAL_KEY in selector:
            return (selector[TRIAL_KEY].removeprefix("!"),
                    selector.get(OWNER_KEY, "").removeprefix("!") or None)
    return None, None


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


def living_actors(timeout: float = 10.0) -> list[Any]:
    """Every actor of the cluster that is not dead (alive, starting or restarting)."""
    from ray.util.state import list_actors

    return list_actors(address=_address(), filters=[("state", "!=", "DEAD")], detail=True,
                       limit=10_000, timeout=int(timeout), raise_on_missing_output=False)


def job_actors(timeout: float = 10.0) -> list[Any]:
    """This job's actors that are not dead and die with it: the trials' actors and every
    actor they start. Not the detached ones (Train's autoscaling coordinator, created by
    the first sweep on a cluster, lives on)."""
    import ray
    from ray.util.state import list_actors

    job_id = ray.get_runtime_context().get_job_id()
    actors = list_actors(address=_address(), filters=[("state", "!=", "DEAD"), ("job_id", "=", job_id)],
                         detail=True, limit=10_000, timeout=int(timeout), raise_on_missing_output=False)
    return [a for a in actors if not a.is_detached]


def occupied_groups(timeout: float = 10.0) -> set[str]:
    """Ids of the placement groups that hold at least one actor that is not dead."""
    return {a.placement_group_id for a in living_actors(timeout) if a.placement_group_id}


def remove(group_id: str) -> None:
    """Remove a placement group by id (a no-op when it is already removed)."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))


def describe(group: Any) -> str:
    bundles = group.bundles or []
    resources = bundles[0].get("unit_resources", {}) if bundles else {}
    trial, _ = marks_of(group)
    return (f"{group.placement_group_id[:12]} {group.state} {resources} x{len(bundles)}"
            f"{f' of trial {trial}' if trial else ''}")


class PlacementGroupKeeper(LiveCallback):
    """Tune callback (runs in the sweep driver): no Train placement group outlives its trial.

    Every `every_s` (and at each trial's end) it removes the marked groups whose trial
    has ended or whose owner actor is dead; `settle` does the same after the sweep.
    """

    live_name = "placements"

    def __init__(self, every_s: float = 1.0, grace_s: float = 3.0):
        self.every_s, self.grace_s = every_s, grace_s
        # Counted over the sweep's whole life, so not in Tune's `setup`: a sweep with a
        # confirmation stage runs two Tune experiments through this one keeper.
        self.ended: dict[str, float] = {}        # trial id -> when Tune reported its end
        self.first_seen: dict[str, float] = {}   # group id -> when we first listed it
        self.last_round = 0.0
        self.freed = self.strays = self.failures = self.failing = 0
        self.longest_after_end_s = 0.0

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.trial_ended(trial, trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.trial_ended(trial, trials)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        # A paused trial (promotion.py) has ended for now: its groups get the same grace.
        for trial in trials:
            if trial.status == "PAUSED":
                self.ended.setdefault(trial.trial_id, time.monotonic())
            elif trial.status == "RUNNING":
                self.ended.pop(trial.trial_id, None)
        if time.monotonic() - self.last_round >= self.every_s:
            self.collect(running_trials(trials))

    def trial_ended(self, trial: Any, trials: list) -> None:
        self.ended[trial.trial_id] = time.monotonic()
        self.collect(running_trials(trials) - {trial.trial_id})

    def collect(self, running: set[str]) -> int:
        """Remove the marked groups whose trial is not running or whose owner is dead."""
        now = self.last_round = time.monotonic()
        groups = [g for g in self._list(job_groups) or [] if marks_of(g)[0]]
        actors = self._list(living_actors) if groups else None
        if actors is None:
            return 0          # nothing marked, or the actors could not be listed: decide nothing
        alive = {a.actor_id for a in actors}
        removed = 0
        for group in groups:
            trial, owner = marks_of(group)
            assert trial is not None  # `groups` holds marked groups only
            first = self.first_seen.setdefault(group.placement_group_id, now)
            ended = self.ended.get(trial)
            if owner in alive and (trial in running or (ended and now - ended < self.grace_s)):
                continue      # a live run, or a stopped one given time to exit on its own
            if self._remove(group, trial, ended):
                removed += 1
                self.freed += 1
                if ended:      # (a trial cut by the sweep's end has no end of its own)
                    self.strays += first > ended + 0.5
                    self.longest_after_end_s = max(self.longest_after_end_s, now - ended)
        return removed

    def settle(self, quiet_s: float = 3.0, timeout_s: float = 30.0) -> list[Any]:
        """After the sweep: collect until no marked group appeared for `quiet_s`, or sooner
        once nothing is left that could create one; returns the job's groups still alive
        then (none, unless removal itself fails)."""
        start = last_seen = time.monotonic()
        while time.monotonic() - last_seen < quiet_s and time.monotonic() - start < timeout_s:
            if self.collect(running=set()):
                last_seen = time.monotonic()
            elif self.nothing_can_appear():
                break
            time.sleep(0.5)
        return self._list(job_groups) or []

    def nothing_can_appear(self) -> bool:
        """No marked group is left and no actor of this job lives. Only a trial's Train
        controller creates a marked group, and it is an actor of this job (the trial's
        actor or its child), so none can appear any more."""
        groups = self._list(job_groups)
        if groups is None or any(marks_of(g)[0] for g in groups):
            return False
        return self._list(job_actors) == []

    def summary(self, left: int) -> dict[str, Any]:
        return {"freed": self.freed, "created_after_their_trial_ended": self.strays,
                "longest_after_trial_end_s": round(self.longest_after_end_s, 1),
                "left": left, "state_api_failures": self.failures}

    def _list(self, lister: Any) -> list[Any] | None:
        """The lister's answer, or None when the state API failed this round."""
        try:
            answer = lister()
        except Exception as err:  # the dashboard can be slow to answer on a busy machine
            # (or gone, after a Ctrl-C to the whole process group): skip this round, the
            # next one retries; say so in the log, and on the console if it persists
            self.failures += 1
            self.failing += 1
            level = logging.WARNING if self.failing == PERSISTENT_FAILURES else logging.INFO
            log.log(level, "state API: %s failed (%d in a row; placement groups are not "
                    "checked meanwhile): %s: %s", lister.__name__, self.failing,
                    type(err).__name__, err)
            return None
        self.failing = 0
        return answer

    def _remove(self, group: Any, trial: str, ended: float | None) -> bool:
        try:
            remove(group.placement_group_id)
        except Exception as err:  # retried by the next round
            log.warning("could not remove placement group %s: %s", describe(group), err)
            return False
        why = (f"{time.monotonic() - ended:.1f} s after its trial ended" if ended
               else "its trial's actor is gone")
        log.info("removed placement group %s: %s", describe(group), why)
        return True


def running_trials(trials: list) -> set[str]:
    return {t.trial_id for t in trials if t.status == "RUNNING"}

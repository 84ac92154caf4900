"""Which trial owns a placement group, and the keeper's decisions (no Ray: the state API
answers are given; test_stress.py runs the keeper on a real cluster)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from hlbd_ray import placement
from hlbd_ray.placement import PlacementGroupKeeper, marks_of, trial_tag


@dataclass
class Group:
    """The fields of `ray.util.state.common.PlacementGroupState` the keeper reads."""

    placement_group_id: str
    bundles: list[dict[str, Any]] = field(default_factory=list)
    state: str = "CREATED"


@dataclass
class Actor:
    actor_id: str
    placement_group_id: str | None = None


@dataclass
class Trial:
    trial_id: str
    status: str = "RUNNING"


def group(group_id: str, trial: str | None, owner: str = "") -> Group:
    selector = trial_tag(trial, owner) if trial else {}
    return Group(group_id, [{"unit_resources": {"CPU": 0.99}, "label_selector": selector}])


def test_a_mark_names_its_trial_and_owner_and_matches_every_node():
    mark = trial_tag("abc_00003", "f00d")
    assert all(value.startswith("!") for value in mark.values())     # "not equal": no constraint
    assert marks_of(group("g", "abc_00003", "f00d")) == ("abc_00003", "f00d")
    assert marks_of(group("g", None)) == (None, None)


class Cluster:
    """What the state API would answer; `remove` records instead of removing."""

    def __init__(self, monkeypatch, groups: list[Group], alive: list[str]):
        self.groups, self.alive, self.removed = groups, alive, []
        monkeypatch.setattr(placement, "job_groups", lambda: [g for g in self.groups
                                                              if g.placement_group_id not in self.removed])
        monkeypatch.setattr(placement, "living_actors", lambda: [Actor(a) for a in self.alive])
        monkeypatch.setattr(placement, "remove", self.removed.append)
        self.job_alive: list[str] = []      # this job's actors that are not dead
        monkeypatch.setattr(placement, "job_actors", lambda: [Actor(a) for a in self.job_alive])


class Clock:
    """placement's `time`: sleeping advances the monotonic clock, and runs `on_sleep`."""

    def __init__(self, on_sleep=lambda naps: None):
        self.now, self.naps, self.on_sleep = 100.0, 0, on_sleep

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.naps += 1
        self.on_sleep(self.naps)


def test_a_running_trials_group_is_kept_and_an_ended_trials_group_goes_once_its_actor_is_gone(
        monkeypatch):
    cluster = Cluster(monkeypatch, [group("live", "t1", "a1"), group("ended", "t2", "a2"),
                                    group("other", None)], alive=["a1", "a2"])
    keeper = PlacementGroupKeeper(grace_s=3.0)
    keeper.trial_ended(Trial("t2", "TERMINATED"), [Trial("t1"), Trial("t2", "TERMINATED")])
    # t2's actor still lives: give it `grace_s` to exit by itself (its controller would
    # restart the workers of a group removed under it).
    assert cluster.removed == []
    cluster.alive = ["a1"]
    assert keeper.collect({"t1"}) == 1
    assert cluster.removed == ["ended"]          # never the running trial's, nor an unmarked one
    assert keeper.summary(left=0)["freed"] == 1


def test_a_paused_trials_group_gets_the_grace_of_an_ended_one_and_its_resumed_group_is_kept(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(placement, "time", clock)
    cluster = Cluster(monkeypatch, [group("paused", "t1", "a1")], alive=["a1"])
    keeper = PlacementGroupKeeper(every_s=0.0, grace_s=3.0)
    keeper.on_step_end(0, [Trial("t1", "PAUSED")])
    assert cluster.removed == []                 # its actor is still exiting: the grace
    clock.now += 3.5
    keeper.on_step_end(0, [Trial("t1", "PAUSED")])
    assert cluster.removed == ["paused"]
    # Resumed under a new trial actor: its new group belongs to a running trial.
    cluster.groups.append(group("resumed", "t1", "a9"))
    cluster.alive = ["a9"]
    keeper.on_step_end(0, [Trial("t1", "RUNNING")])
    assert cluster.removed == ["paused"] and "t1" not in keeper.ended


def test_an_ended_trials_group_goes_after_the_grace_even_if_its_actor_lingers(monkeypatch):
    cluster = Cluster(monkeypatch, [group("ended", "t2", "a2")], alive=["a2"])
    keeper = PlacementGroupKeeper(grace_s=0.0)
    keeper.trial_ended(Trial("t2", "TERMINATED"), [])
    assert cluster.removed == ["ended"]


def test_a_group_whose_owner_died_goes_even_while_tune_still_calls_the_trial_running(monkeypatch):
    cluster = Cluster(monkeypatch, [group("orphan", "t1", "dead-actor"), group("new", "t1", "a1")],
                      alive=["a1"])
    PlacementGroupKeeper().collect({"t1"})
    assert cluster.removed == ["orphan"]


def test_nothing_is_decided_when_the_actors_cannot_be_listed(monkeypatch):
    cluster = Cluster(monkeypatch, [group("live", "t1", "a1")], alive=["a1"])

    def unavailable():
        raise TimeoutError("state API busy")

    monkeypatch.setattr(placement, "living_actors", unavailable)
    keeper = PlacementGroupKeeper()
    assert keeper.collect(set()) == 0 and cluster.removed == []
    assert keeper.failures == 1


@pytest.mark.parametrize("status", ["TERMINATED", "ERROR"])
def test_a_group_created_after_its_trial_ended_counts_as_a_stray(monkeypatch, status):
    cluster = Cluster(monkeypatch, [], alive=[])
    keeper = PlacementGroupKeeper(grace_s=3.0)
    keeper.trial_ended(Trial("t2", status), [])
    keeper.ended["t2"] -= 1.0                   # the dying controller restarted a second later
    cluster.groups.append(group("late", "t2", "a2"))
    keeper.collect(set())
    assert cluster.removed == ["late"]
    summary = keeper.summary(left=0)
    assert summary["created_after_their_trial_ended"] == 1
    assert 1.0 <= summary["longest_after_trial_end_s"] < 5


def test_settle_ends_at_once_when_no_marked_group_is_left_and_no_actor_of_the_job_lives(monkeypatch):
    cluster = Cluster(monkeypatch, [group("ended", "t1", "a1"), group("tune's own", None)], alive=[])
    clock = Clock()
    monkeypatch.setattr(placement, "time", clock)
    left = PlacementGroupKeeper().settle(quiet_s=3.0)
    assert cluster.removed == ["ended"]
    assert clock.naps == 1       # the round that removed a group, then one that found nothing
    assert [g.placement_group_id for g in left] == ["tune's own"]     # reported, not ours to remove


def test_settle_waits_while_an_actor_of_the_job_could_still_create_a_group(monkeypatch):
    cluster = Cluster(monkeypatch, [], alive=["controller"])
    cluster.job_alive = ["controller"]

    def controller_acts(naps: int) -> None:
        if naps == 2:            # a dying controller restarts its workers in a new group
            cluster.groups.append(group("late", "t1", "controller"))
        if naps == 4:
            cluster.alive = cluster.job_alive = []

    clock = Clock(controller_acts)
    monkeypatch.setattr(placement, "time", clock)
    assert PlacementGroupKeeper().settle(quiet_s=3.0) == []
    assert cluster.removed == ["late"]
    assert clock.naps == 4       # until the last actor of the job was gone, not quiet_s after "late"


def test_settle_gives_up_deciding_early_when_the_state_api_fails(monkeypatch):
    Cluster(monkeypatch, [], alive=[])

    def unavailable():
        raise TimeoutError("state API busy")

    monkeypatch.setattr(placement, "job_actors", unavailable)
    clock = Clock()
    monkeypatch.setattr(placement, "time", clock)
    PlacementGroupKeeper().settle(quiet_s=3.0)
    assert clock.naps == 6       # the full quiet_s in 0.5 s rounds: no early end on no answer

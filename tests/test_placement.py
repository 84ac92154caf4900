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

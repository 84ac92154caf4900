"""Promotion-based ASHA (hlbd_ray/promotion.py): pauses, promotions by rank, the end of a
search, the searcher told at the first rung, and a real sweep whose trial pauses and
resumes from its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from optuna.trial import TrialState
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from hlbd_ray.config import SweepConfig
from hlbd_ray.promotion import PromotionASHA, rung_epochs
from hlbd_ray.search import EpochOptunaSearch, build_searcher, param_space
from hlbd_ray.search_restore import restorable_search

from .conftest import REPO, run_job
from .test_search_restore import started

SMOKE = str(REPO / "conf" / "smoke.yaml")
CONTINUE, PAUSE = TrialScheduler.CONTINUE, TrialScheduler.PAUSE


class FakeTrial:
    def __init__(self, trial_id: str) -> None:
        self.trial_id, self.status, self.last_result = trial_id, Trial.RUNNING, {}


class FakeController:
    """The parts of Tune's controller a scheduler reads; records pauses and stops."""

    def __init__(self, trials: list[FakeTrial], finished: bool = False) -> None:
        self.trials, self.finished = trials, finished
        self.search_alg = self
        self.events: list[tuple[str, str]] = []

    def get_trials(self) -> list[FakeTrial]:
        return self.trials

    def is_finished(self) -> bool:
        return self.finished

    def on_pause(self, trial_id: str) -> None:
        self.events.append(("pause", trial_id))

    def on_unpause(self, trial_id: str) -> None:
        self.events.append(("unpause", trial_id))

    def stop_trial(self, trial: FakeTrial) -> None:
        self.events.append(("stop", trial.trial_id))
        trial.status = Trial.TERMINATED


def scheduler(mode: str = "min", max_t: int = 4, reduction_factor: int = 3, max_running: int = 2) -> PromotionASHA:
    s = PromotionASHA(time_attr="epochs_done", max_t=max_t, grace_period=1, reduction_factor=reduction_factor,
                      max_running=max_running)
    s.set_search_properties("val_loss", mode)
    return s


def report(s: PromotionASHA, ctl: FakeController, trial: FakeTrial, epoch: int, loss: float | None) -> str:
    trial.last_result = {"epochs_done": epoch, "val_loss": loss}
    decision = s.on_trial_result(ctl, trial, trial.last_result)
    if decision == PAUSE:
        trial.status = Trial.PAUSED
    return decision


def test_rungs_are_the_grace_period_times_powers_of_the_factor_below_the_last_epoch():
    assert rung_epochs(1, 4, 3) == [1, 3]
    assert rung_epochs(1, 10, 3) == [1, 3, 9]
    assert rung_epochs(2, 4, 2) == [2]
    assert rung_epochs(4, 4, 3) == []


def test_a_trial_goes_on_only_when_it_ranks_in_the_top_third_of_its_rung():
    a, b, c, d = (FakeTrial(x) for x in "abcd")
    ctl, s = FakeController([a, b, c, d]), scheduler()
    # No peers: the first two pause (Ray's ASHA lets the first one go on).
    assert report(s, ctl, a, 1, 2.0) == PAUSE and report(s, ctl, b, 1, 3.0) == PAUSE
    assert ctl.events == [("pause", "a"), ("pause", "b")]
    assert s.choose_trial_to_run(ctl) is None            # 2 at the rung: no top third yet
    # The third is worse than a: it pauses, and a, now the top third of 3, is promoted at
    # once: it takes the slot c frees (counted again by the search's limit before c's is
    # released, so no new trial takes it), and runs when fewer than 2 trials are active.
    assert report(s, ctl, c, 1, 2.5) == PAUSE
    assert ctl.events[-2:] == [("pause", "c"), ("unpause", "a")] and s.due == ["a"]
    assert s.choose_trial_to_run(ctl) is a and s.due == []
    a.status = Trial.PENDING                              # Tune stages it
    assert s.choose_trial_to_run(ctl) is a                # a pending trial, not a second promotion
    # Six at the rung: the top third is two; d, the best, goes on without a pause.
    a.status = Trial.RUNNING
    e, f = FakeTrial("e"), FakeTrial("f")
    ctl.trials += [e, f]
    assert report(s, ctl, e, 1, 9.0) == PAUSE
    assert report(s, ctl, d, 1, 1.0) == CONTINUE
    assert report(s, ctl, f, 1, 8.0) == PAUSE
    assert s.promoted[1] == {"a", "d"} and s.choose_trial_to_run(ctl) is None


def test_a_promoted_trial_waits_for_a_slot_while_the_limit_is_running():
    a, b, c, d, e = (FakeTrial(x) for x in "abcde")
    ctl, s = FakeController([a, b, c, d, e]), scheduler(max_running=2)
    report(s, ctl, a, 1, 1.0)
    report(s, ctl, b, 1, 2.0)
    # c goes on at its rung, and a now ranks: due, but c and d hold both slots.
    assert report(s, ctl, c, 1, 0.5) == CONTINUE and s.due == []
    assert report(s, ctl, e, 1, 3.0) == PAUSE           # n=4: top 1 is c, already promoted
    f, g = FakeTrial("f"), FakeTrial("g")
    ctl.trials += [f, g]
    report(s, ctl, f, 1, 4.0)
    report(s, ctl, g, 1, 5.0)                           # n=6: top 2 = c, a: a is due
    assert s.due == ["a"] and ("unpause", "a") in ctl.events
    c.status = d.status = Trial.RUNNING
    assert s.choose_trial_to_run(ctl) is None           # two running: a waits
    d.status = Trial.TERMINATED
    assert s.choose_trial_to_run(ctl) is a


def test_a_resumed_trials_repeated_rung_report_and_a_missing_metric_change_nothing():
    a, b, c = (FakeTrial(x) for x in "abc")
    ctl, s = FakeController([a, b, c]), scheduler()
    assert report(s, ctl, a, 1, None) == CONTINUE and s.recorded[1] == {}
    for trial, loss in ((a, 1.0), (b, 2.0), (c, 3.0)):
        report(s, ctl, trial, 1, loss)
    assert s.choose_trial_to_run(ctl) is a
    a.status = Trial.RUNNING
    # After the resume the train loop reports epoch 1 again (from its checkpoint).
    assert report(s, ctl, a, 1, 1.0) == CONTINUE and s.recorded[1] == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert report(s, ctl, a, 2, 0.9) == CONTINUE           # not a rung


def test_mode_max_ranks_the_highest_first():
    a, b, c = (FakeTrial(x) for x in "abc")
    ctl, s = FakeController([a, b, c]), scheduler(mode="max")
    report(s, ctl, a, 1, 0.2)
    report(s, ctl, b, 1, 0.1)
    assert report(s, ctl, c, 1, 0.9) == CONTINUE


def test_the_end_promotes_the_highest_rungs_best_once_then_stops_the_paused():
    trials = [FakeTrial(x) for x in "abcd"]
    a, b, c, d = trials
    ctl, s = FakeController(trials), scheduler()
    assert [report(s, ctl, t, 1, loss) for t, loss in ((a, 2.0), (b, 3.0), (c, 1.5))] == [PAUSE, PAUSE, CONTINUE]
    # c went on (the top third of 3) and pauses alone at epoch 3; d pauses at epoch 1.
    assert report(s, ctl, c, 3, 1.2) == PAUSE
    assert report(s, ctl, d, 1, 2.5) == PAUSE
    # While the search may still create trials, nothing more is promoted.
    assert s.choose_trial_to_run(ctl) is None
    # The search is done and only paused trials are left, none at the last epoch: the best
    # of the highest rung (c, at epoch 3) runs on, as synchronous successive halving ends.
    ctl.finished = True
    assert s.choose_trial_to_run(ctl) is c
    c.status = Trial.RUNNING
    assert s.choose_trial_to_run(ctl) is None and not any(kind == "stop" for kind, _ in ctl.events)
    c.status, c.last_result = Trial.TERMINATED, {"epochs_done": 4, "val_loss": 1.1}
    # One trial reached the last epoch: the paused ones are stopped, each counted again by
    # the search's limit first so that its end reaches the searcher.
    assert s.choose_trial_to_run(ctl) is None
    stops = [e for e in ctl.events if e[0] in ("stop", "unpause")][-6:]
    assert stops == [("unpause", "a"), ("stop", "a"), ("unpause", "b"), ("stop", "b"), ("unpause", "d"), ("stop", "d")]
    assert all(t.status == Trial.TERMINATED for t in trials)


def test_optuna_is_told_a_trials_value_at_the_first_rung_once(caplog):
    sweep = SweepConfig(search="optuna", scheduler="promotion", startup_trials=2, seed=1)
    searcher = build_searcher(sweep, 2)
    assert isinstance(searcher, EpochOptunaSearch)
    searcher.set_search_properties("val_loss", "min", param_space(sweep))
    searcher.suggest("a")
    searcher.on_trial_result("a", {"val_loss": 2.5, "epochs_done": 1, "training_iteration": 5})
    study = searcher._ot_study
    assert [(t.state, t.value) for t in study.trials] == [(TrialState.COMPLETE, 2.5)]
    # Later results and the trial's end (after a promotion) are not Optuna's any more.
    searcher.on_trial_result("a", {"val_loss": 1.5, "epochs_done": 2, "training_iteration": 9})
    searcher.on_trial_complete("a", {"val_loss": 1.2, "epochs_done": 4})
    assert [(t.state, t.value) for t in study.trials] == [(TrialState.COMPLETE, 2.5)]
    assert "already finished" not in caplog.text
    # Ray's stopping ASHA: told at the end, as before.
    plain = build_searcher(SweepConfig(search="optuna", scheduler="asha", startup_trials=2), 2)
    plain.set_search_properties("val_loss", "min", param_space(sweep))
    plain.suggest("b")
    plain.on_trial_result("b", {"val_loss": 2.5, "epochs_done": 1, "training_iteration": 5})
    plain.on_trial_complete("b", {"val_loss": 1.2, "epochs_done": 4})
    assert [t.value for t in plain._ot_study.trials] == [1.2]


@pytest.mark.parametrize("search", ["optuna", "random"])
def test_a_paused_trial_frees_its_slot_of_the_concurrency_limit(search):
    sweep = SweepConfig(search=search, scheduler="promotion", seed=3)
    alg = started(restorable_search(build_searcher(sweep, 2), 2), sweep)
    a, b = alg.next_trial(), alg.next_trial()
    assert a is not None and b is not None and alg.next_trial() is None      # 2 at once
    alg.on_pause(a.trial_id)
    c = alg.next_trial()
    assert c is not None and alg.next_trial() is None
    alg.on_unpause(a.trial_id)                                               # a runs again: 3 live
    alg.on_trial_complete(b.trial_id, result={"val_loss": 1.0})
    assert alg.next_trial() is None
    alg.on_trial_complete(c.trial_id, result={"val_loss": 1.0})
    assert alg.next_trial() is not None


def result_rows(trial_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]


@pytest.mark.slow
def test_a_paused_trial_resumes_from_its_checkpoint_and_keeps_its_counters(tmp_path):
    # One trial: alone at the first rung it pauses; the search has no other trial, so it is
    # promoted as the highest rung's best and resumes to its last epoch.
    result = run_job("sweep.py", "--config", SMOKE, f"output_dir={tmp_path}", "cluster.num_cpus=2",
                     "sweep.num_samples=1", "sweep.scheduler=promotion", "sweep.reduction_factor=2",
                     "train.epochs=2", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert " resumed: " in result.stdout and "trials: 1 = 1 completed" in result.stdout
    exp = tmp_path / "smoke"
    (trial_dir,) = [p for p in exp.iterdir() if (p / "result.json").is_file()]
    rows = result_rows(trial_dir)
    epochs = [r["epochs_done"] for r in rows]
    first = epochs.index(1)
    # The resumed run starts from the epoch-1 checkpoint (it repeats that report), never
    # from epoch 0, and Tune's counters go on from where the pause left them.
    assert 0 not in epochs[first:] and epochs[-1] == 2
    assert [r["training_iteration"] for r in rows] == list(range(1, len(rows) + 1))
    pids = [r["pid"] for r in rows]
    resumed_at = next(i for i in range(1, len(pids)) if pids[i] != pids[i - 1])
    assert resumed_at > first
    assert rows[resumed_at]["time_total_s"] > rows[resumed_at - 1]["time_total_s"]
    times = [r["time_total_s"] for r in rows]
    assert times == sorted(times)
    trials = json.loads((exp / "best.json").read_text())
    assert trials["epochs"] == 2

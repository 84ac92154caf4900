"""A resumed sweep's search agrees with its trials when Tune's saved search state is older
or newer than its saved trials (a driver killed between their uploads; seen on S3).

The trials here are Tune's own, created by the search algorithms, and the experiment state
is written from their own `get_json_state`, as Tune writes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from optuna.trial import TrialState
from ray.tune.experiment import Experiment
from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.search.basic_variant import BasicVariantGenerator

from hlbd_ray.config import SweepConfig
from hlbd_ray.search import build_searcher, param_space
from hlbd_ray.search_restore import (
    FINISHED,
    STATE_GLOB,
    RestoredSearchGenerator,
    RestoredVariantGenerator,
    restorable_search,
    saved_trials,
)

from .conftest import RAY_TEST_ENV, REPO, run_job

SAMPLES = 4
SMOKE = str(REPO / "conf" / "smoke.yaml")


def started(search: Any, sweep: SweepConfig) -> Any:
    """`search` as Tune starts it: the sweep's space and its num_samples."""
    search.set_search_properties(sweep.metric, str(sweep.mode), param_space(sweep))
    search.add_configurations([Experiment("x", run=lambda config: None, config=param_space(sweep),
                                          num_samples=SAMPLES)])
    return search


def save_trials(folder: Path, trials: list[Any], finished: dict[str, dict]) -> None:
    """Tune's experiment state file for `trials`; those in `finished` (-> last result)
    TERMINATED, the others RUNNING."""
    data = []
    for trial in trials:
        trial.set_status("TERMINATED" if trial.trial_id in finished else "RUNNING")
        trial.run_metadata.last_result = finished.get(trial.trial_id, {})
        data.append(list(trial.get_json_state()))
    (folder / "experiment_state-2026-12-04_16-24-22.json").write_text(json.dumps({"trial_data": data}))


def resumed(search: Any, folder: Path) -> Any:
    search.restore_from_dir(str(folder))
    return search


def run_out(search: Any, unfinished: list[Any], limit: int = 20) -> list[str]:
    """Tune's loop after a resume: the unfinished trials complete, then every trial the
    search creates, until it says it is finished. Returns the new trials' ids; fails if
    the search neither creates a trial nor finishes (where Tune waits forever)."""
    for trial in unfinished:
        search.on_trial_complete(trial.trial_id, result={"val_loss": 2.0})
    new = []
    for _ in range(limit):
        trial = search.next_trial()
        if trial is None:
            assert search.is_finished(), "no trial to run, and the search is not finished: Tune waits forever"
            return new
        new.append(trial.trial_id)
        search.on_trial_complete(trial.trial_id, result={"val_loss": 2.0})
    raise AssertionError(f"more than {limit} trials")


def test_saved_trials_reads_the_newest_experiment_state(tmp_path):
    sweep = SweepConfig(search="random")
    search = started(build_searcher(sweep, 2), sweep)
    a, b = search.next_trial(), search.next_trial()
    save_trials(tmp_path, [a], {a.trial_id: {"val_loss": 1.5}})
    (tmp_path / "experiment_state-2026-12-04_16-24-22.json").rename(tmp_path / "experiment_state-2026-12-04_16-00-00.json")
    save_trials(tmp_path, [a, b], {a.trial_id: {"val_loss": 1.0}})
    trials = saved_trials(tmp_path)
    assert {tid: (t.status, t.last_result.get("val_loss")) for tid, t in trials.items()} == {
        a.trial_id: ("TERMINATED", 1.0), b.trial_id: ("RUNNING", None)}
    assert saved_trials(tmp_path / "absent") == {}


def test_a_generator_state_older_than_the_trials_neither_hangs_nor_creates_a_trial_twice(tmp_path):
    def fresh(cls: type) -> Any:
        sweep = SweepConfig(search="random", seed=5)
        return started(cls(random_state=sweep.seed, max_concurrent=2), sweep)

    search = fresh(RestoredVariantGenerator)
    a, b = search.next_trial(), search.next_trial()
    assert search.next_trial() is None                 # two at once
    search.save_to_dir(str(tmp_path), "s")             # the upload that lagged
    search.on_trial_complete(a.trial_id)
    c = search.next_trial()
    search.on_trial_complete(b.trial_id)
    d = search.next_trial()
    save_trials(tmp_path, [a, b, c, d], {a.trial_id: {}, b.trial_id: {}})

    # Tune's own generator counts a and b as running for ever: it waits for a free slot.
    stock = resumed(fresh(BasicVariantGenerator), tmp_path)
    for trial in (c, d):
        stock.on_trial_complete(trial.trial_id)
    assert stock.next_trial() is None and not stock.is_finished()

    # Ours runs c and d, creates none of the four again, and finishes.
    assert run_out(resumed(fresh(RestoredVariantGenerator), tmp_path), [c, d]) == []


def test_a_generator_state_newer_than_the_trials_creates_the_lost_trial_again(tmp_path):
    sweep = SweepConfig(search="random", seed=5)
    search = started(build_searcher(sweep, 1), sweep)
    a = search.next_trial()
    save_trials(tmp_path, [a], {})                     # the trials' upload that lagged
    search.on_trial_complete(a.trial_id)
    b = search.next_trial()                            # created after it: lost with it
    search.save_to_dir(str(tmp_path), "s")
    uninterrupted = [b.config]                          # the configs of b and after it
    search.on_trial_complete(b.trial_id)
    while (trial := search.next_trial()) is not None:
        uninterrupted.append(trial.config)
        search.on_trial_complete(trial.trial_id)

    # Tune's own generator waits for b, which no longer exists.
    stock = resumed(started(BasicVariantGenerator(random_state=sweep.seed, max_concurrent=1), sweep), tmp_path)
    stock.on_trial_complete(a.trial_id)
    assert stock.next_trial() is None and not stock.is_finished()

    # Ours runs a again, then b with its id and config, then the other two, as the sweep
    # would have without the restart.
    ours = resumed(started(build_searcher(sweep, 1), sweep), tmp_path)
    created = []
    ours.on_trial_complete(a.trial_id)
    while (trial := ours.next_trial()) is not None:
        created.append(trial)
        ours.on_trial_complete(trial.trial_id)
    assert ours.is_finished() and len(created) == SAMPLES - 1
    assert created[0].trial_id == b.trial_id and [t.config for t in created] == uninterrupted
    assert a.trial_id not in {t.trial_id for t in created}


def test_an_optuna_state_older_than_the_trials_learns_their_results_and_finishes(tmp_path):
    sweep = SweepConfig(search="optuna", seed=2, startup_trials=2)

    def fresh(stock: bool = False) -> Any:
        searcher = build_searcher(sweep, 2)
        search = SearchGenerator(ConcurrencyLimiter(searcher, 2)) if stock else restorable_search(searcher, 2)
        return started(search, sweep)

    search = fresh()
    assert isinstance(search, RestoredSearchGenerator)
    a, b = search.next_trial(), search.next_trial()
    assert search.next_trial() is None
    search.save_to_dir(str(tmp_path), "s")
    search.on_trial_complete(a.trial_id, result={"val_loss": 1.0})
    c = search.next_trial()
    search.on_trial_complete(b.trial_id, result={"val_loss": 3.0})
    d = search.next_trial()
    save_trials(tmp_path, [a, b, c, d], {a.trial_id: {"val_loss": 1.0}, b.trial_id: {"val_loss": 3.0}})
    result = {"val_loss": 2.0, "training_iteration": 1}

    stock = resumed(fresh(stock=True), tmp_path)
    assert stock.next_trial() is None and not stock.is_finished()

    ours = resumed(fresh(), tmp_path)
    # c is unknown to the restored Optuna (Tune's OptunaSearch raises KeyError): nothing to tell.
    ours.on_trial_result(c.trial_id, result)
    assert run_out(ours, [c, d]) == []                  # all four exist: finished
    study = ours.searcher.searcher._ot_study
    assert sorted(t.value for t in study.get_trials(states=(TrialState.COMPLETE,))) == [1.0, 3.0]


def test_an_optuna_state_newer_than_the_trials_asks_for_a_trial_in_place_of_the_lost_one(tmp_path):
    sweep = SweepConfig(search="optuna", seed=2, startup_trials=2)

    def fresh() -> Any:
        return started(restorable_search(build_searcher(sweep, 1), 1), sweep)

    search = fresh()
    a = search.next_trial()
    save_trials(tmp_path, [a], {})                      # the trials' upload that lagged
    search.on_trial_complete(a.trial_id, result={"val_loss": 1.0})
    b = search.next_trial()                             # asked for after it: lost with it
    search.save_to_dir(str(tmp_path), "s")

    ours = resumed(fresh(), tmp_path)
    new = run_out(ours, [a])
    # a exists; b is lost, so SAMPLES - 1 trials are created, none of them b.
    assert len(new) == SAMPLES - 1 and b.trial_id not in new
    study = ours.searcher.searcher._ot_study
    assert [t.state for t in study.get_trials() if t.number == 1] == [TrialState.FAIL]   # b


Snapshot = tuple[Path, bytes]


def killed_sweep(tmp_path: Path, state_glob: str, early: Callable[[list[str]], bool],
                 kill: Callable[[list[str]], bool]) -> tuple[list[str], Snapshot]:
    """Runs the smoke sweep on a real local Ray and kills its driver once `kill` holds for
    the trials' statuses in the saved experiment state. Returns those statuses and a copy
    of the newest `state_glob` file as it was when `early` first held."""
    experiment = tmp_path / "smoke"
    driver = subprocess.Popen([sys.executable, str(REPO / "jobs" / "sweep.py"), *smoke_args(tmp_path)], cwd=REPO,
                              env={**os.environ, **RAY_TEST_ENV}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    copy: Snapshot | None = None
    try:
        deadline = time.monotonic() + 240
        while True:
            assert driver.poll() is None and time.monotonic() < deadline, "the sweep ended or never got there"
            statuses = [t.status for t in saved_trials(experiment).values()]
            files = sorted(experiment.glob(state_glob))
            if copy is None and files and early(statuses):
                copy = (files[-1], files[-1].read_bytes())
            if copy and kill(statuses):
                break
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert copy is not None
    return statuses, copy


def smoke_args(tmp_path: Path) -> list[str]:
    return ["--config", SMOKE, f"output_dir={tmp_path}", "cluster.num_cpus=2"]


@pytest.mark.slow
@pytest.mark.extended       # ~1 min; the unit tests above run in the default set
def test_a_sweep_resumed_with_a_search_state_older_than_its_trials_finishes(tmp_path):
    """The CI hang on a real local Ray: the search state saved while the first two trials
    ran, the trials' state once both had finished (as a driver killed between the two
    uploads leaves them). Tune's own generator then waits forever for a free slot."""
    statuses, early = killed_sweep(tmp_path, "basic-variant-state-*.json",
                                   early=lambda statuses: bool(statuses) and FINISHED not in statuses,
                                   kill=lambda statuses: statuses.count(FINISHED) >= 2)
    assert len(statuses) < 4 or statuses.count(FINISHED) < 4, "the sweep finished before the kill"
    early[0].write_bytes(early[1])          # the search state as the lagging upload left it

    again = run_job("sweep.py", *smoke_args(tmp_path), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = saved_trials(tmp_path / "smoke")
    assert len(trials) == 4 and all(t.status == FINISHED for t in trials.values()), trials


@pytest.mark.slow
@pytest.mark.extended       # ~1.5 min
def test_a_sweep_resumed_with_trials_older_than_its_search_state_runs_every_trial_once(tmp_path):
    """The other order: the trials' state saved while the first two trials ran, the
    search state once all four were created. The two created after the trials' save are
    created again, with the ids they had, and the report holds the four trials alone."""
    statuses, early = killed_sweep(tmp_path, STATE_GLOB,
                                   early=lambda statuses: len(statuses) == 2 and FINISHED not in statuses,
                                   kill=lambda statuses: len(statuses) == 4)
    assert statuses.count(FINISHED) < 4, "the sweep finished before the kill"
    created = set(saved_trials(tmp_path / "smoke"))
    early[0].write_bytes(early[1])          # the trials' state as the lagging upload left it
    assert len(saved_trials(tmp_path / "smoke")) == 2

    again = run_job("sweep.py", *smoke_args(tmp_path), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = saved_trials(tmp_path / "smoke")
    assert set(trials) == created and all(t.status == FINISHED for t in trials.values()), trials
    report = pq.read_table(tmp_path / "smoke" / "report" / "trials.parquet").to_pylist()
    assert {row["trial_id"] for row in report} == created
    assert all(row["status"] == FINISHED and row["epochs_done"] >= 1 for row in report), report

"""Search algorithms that a resumed sweep restores in agreement with its trials.

Tune saves an experiment as separate files, the trials' state and the search algorithm's
state, and uploads them to storage one by one. A driver killed between two uploads leaves
a search state older (or newer) than the trials. That was seen on S3 in tests/test_s3.py.
Restored as it is, the search still counts trials that had finished as running. With its
concurrency limit full, it creates no trial and never reports itself finished. Tune then
waits for a new trial forever, 600 s at a time in a loop.

Each class here restores the search state and then reconciles it with the experiment
state that Tune restores the trials from, which the same folder holds:
- the trials still to run are the running ones, and no others;
- a trial already created is not created again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune.execution.tune_controller import TuneController
from ray.tune.experiment import Trial
from ray.tune.search import ConcurrencyLimiter, Searcher, SearchGenerator
from ray.tune.search.basic_variant import BasicVariantGenerator

FINISHED = Trial.TERMINATED     # every other status is resumed and runs
STATE_GLOB = TuneController.CKPT_FILE_TMPL.format("*")


@dataclass(frozen=True)
class SavedTrial:
    status: str
    last_result: dict


def saved_trials(folder: str | Path) -> dict[str, SavedTrial]:
    """trial_id -> its status and last result in the newest experiment state in `folder`
    (Tune resumes from the newest by name, as here)."""
    states = sorted(Path(folder).glob(STATE_GLOB))
    return trials_in_state(states[-1].read_text()) if states else {}


def trials_in_state(text: str | bytes) -> dict[str, SavedTrial]:
    """trial_id -> its status and last result, from the text of a Tune experiment state."""
    trials = {}
    for trial_state, run_metadata in json.loads(text)["trial_data"]:
        trial, metadata = json.loads(trial_state), json.loads(run_metadata)
        trials[trial["trial_id"]] = SavedTrial(trial["status"], metadata.get("last_result") or {})
    return trials


def running(trials: dict[str, SavedTrial]) -> set[str]:
    """The trials a resumed sweep runs, errored ones included (it resumes them too), each
    of which reports its completion again."""
    return {tid for tid, trial in trials.items() if trial.status != FINISHED}


class RestoredVariantGenerator(BasicVariantGenerator):
    """Tune's basic generator (random, grid), which limits concurrency itself."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._restored: set[str] = set()

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        trials = saved_trials(dirpath)
        self._restored, self._live_trials = set(trials), running(trials)

    def next_trial(self) -> Any:
        while True:
            live = set(self._live_trials)
            trial = super().next_trial()
            if trial is None or trial.trial_id not in self._restored:
                return trial
            # The generator's state was older than the trials: this one exists already,
            # running or not as it was.
            self._live_trials = live


class RestoredSearchGenerator(SearchGenerator):
    """A searcher (Optuna) behind Tune's concurrency limit, as Tune wraps it for
    TuneConfig.max_concurrent_trials.

    A trial created after the searcher's state was saved is unknown to the searcher: it
    runs, but the searcher does not learn from it. That costs the search one data point
    and no trial.
    """

    def __init__(self, searcher: Searcher, max_concurrent: int) -> None:
        super().__init__(ConcurrencyLimiter(searcher, max_concurrent=max_concurrent))

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        trials = saved_trials(dirpath)
        # Trials created since the searcher's state was saved count towards num_samples.
        self._counter = max(self._counter, len(trials))
        limiter: Any = self.searcher
        for trial_id in sorted(limiter.live_trials - running(trials)):
            # Finished while the state lagged: the searcher learns its result now. Absent
            # from the trials (the searcher's state was newer): it never runs, so it failed.
            if trial_id in trials:
                limiter.on_trial_complete(trial_id, result=trials[trial_id].last_result)
            else:
                limiter.on_trial_complete(trial_id, error=True)


def restorable_search(search: Any, max_concurrent: int) -> Any:
    """The search algorithm a sweep gives Tune: `search` (from search.build_searcher)
    limited to `max_concurrent` trials at once, restored in agreement with its trials."""
    if isinstance(search, RestoredVariantGenerator):
        return search
    return RestoredSearchGenerator(search, max_concurrent)

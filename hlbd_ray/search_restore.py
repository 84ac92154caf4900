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
- a trial already created is not created again;
- a trial created after the trials' state was saved (the search state was newer) is
  created again, so the sweep still runs every trial it was asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune.execution.tune_controller import TuneController
from ray.tune.experiment import Trial
from ray.tune.search import ConcurrencyLimiter, Searcher, SearchGenerator
from ray.tune.search.basic_variant import BasicVariantGenerator, _count_variants, _TrialIterator
from ray.tune.search.sample import _BackwardsCompatibleNumpyRng

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
    """Tune's basic generator (random, grid), which limits concurrency itself.

    On a restore it does not trust its saved position in the sequence of trials, which
    can be behind or ahead of the trials' state. It generates the sequence again from
    the start, under the saved trial-id prefix and the same seed, so every trial gets
    the id and config it had, and skips the trials that exist. A trial created after the
    trials' state was saved is so created again, with its id and config.
    """

    def __init__(self, random_state: int | None = None, max_concurrent: int = 0) -> None:
        super().__init__(random_state=random_state, max_concurrent=max_concurrent)
        self._seed = random_state           # saved with the state, to replay it from
        self._restored: set[str] = set()

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        self._from_the_start()
        trials = saved_trials(dirpath)
        self._restored, self._live_trials = set(trials), running(trials)

    def _from_the_start(self) -> None:
        """Every iterator back at its first trial, as add_configurations built it."""
        assert not self._points_to_evaluate   # the sweep gives none; they would be spent
        rng: Any = _BackwardsCompatibleNumpyRng(self._seed)   # as add_configurations passes it
        iterators, start = [], 0
        for old in self._iterators:
            iterators.append(_TrialIterator(
                uuid_prefix=self._uuid_prefix, num_samples=old.num_samples, unresolved_spec=old.unresolved_spec,
                constant_grid_search=old.constant_grid_search, lazy_eval=old.lazy_eval, start=start,
                random_state=rng))
            start += _count_variants(old.unresolved_spec, [])
        self.set_state({"_iterators": iterators, "_random_state": rng, "_finished": False})

    def on_pause(self, trial_id: str) -> None:
        """A paused trial (promotion.py) holds no slot of the concurrency limit."""
        self._live_trials.discard(trial_id)

    def on_unpause(self, trial_id: str) -> None:
        self._live_trials.add(trial_id)

    def next_trial(self) -> Any:
        while True:
            live = set(self._live_trials)
            trial = super().next_trial()
            if trial is None or trial.trial_id not in self._restored:
                return trial
            # This one exists already, running or not as it was.
            self._live_trials = live


class RestoredSearchGenerator(SearchGenerator):
    """A searcher (Optuna) behind Tune's concurrency limit, as Tune wraps it for
    TuneConfig.max_concurrent_trials.

    A trial created after the searcher's state was saved is unknown to the searcher: it
    runs, but the searcher does not learn from it. That costs the search one data point
    and no trial. A trial the searcher asked for after the trials' state was saved is
    lost with its config; the searcher is told it failed and asks for another in its
    place.
    """

    def __init__(self, searcher: Searcher, max_concurrent: int) -> None:
        super().__init__(ConcurrencyLimiter(searcher, max_concurrent=max_concurrent))

    def on_pause(self, trial_id: str) -> None:
        """A paused trial (promotion.py) holds no slot of the concurrency limit."""
        limiter: Any = self.searcher
        limiter.live_trials.discard(trial_id)

    def on_unpause(self, trial_id: str) -> None:
        """Counted again when it resumes or is stopped, so that its end reaches the searcher."""
        limiter: Any = self.searcher
        limiter.live_trials.add(trial_id)

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        trials = saved_trials(dirpath)
        # num_samples counts the trials that exist: those created since the searcher's
        # state was saved, and not those lost since the trials' state was.
        self._counter = len(trials)
        limiter: Any = self.searcher
        for trial_id in sorted(limiter.live_trials - running(trials)):
            # Finished while the state lagged: the searcher learns its result now. Absent
            # from the trials (the searcher's state was newer): it never runs, so it failed.
            if trial_id in trials:
                limiter.on_trial_complete(trial_id, result=trials[trial_id].last_result)
            else:
                limiter.on_trial_complete(trial_id, error=True)
        # Every trial that runs on the resume holds a slot, one that was paused too.
        limiter.live_trials |= running(trials)


def restorable_search(search: Any, max_concurrent: int) -> Any:
    """The search algorithm a sweep gives Tune: `search` (from search.build_searcher)
    limited to `max_concurrent` trials at once, restored in agreement with its trials."""
    if isinstance(search, RestoredVariantGenerator):
        return search
    return RestoredSearchGenerator(search, max_concurrent)

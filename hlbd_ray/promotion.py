"""ASHA as its paper states it: promotion-based, with paused trials (Li et al. 2020, "A
System for Massively Parallel Hyperparameter Tuning", Algorithm 2).

Ray's ASHA (`AsyncHyperBandScheduler`) is stopping-based: a trial reaching a rung goes
on unless it is below the rung's cutoff among the trials that reached it *before* it.
The first trials at a rung have few or no peers, so they go on: in bench/regret.py's
searches 55% of trials passed the first rung against the 1/3 that reduction factor 3
aims for, and the search spent 0.35 of the exhaustive grid's CPU; promotion-based, 39%
and 0.31, and more searches picked a config within the seed noise (BENCHMARKS.md
section 9). Here a trial reaching a rung goes on only if it ranks in the top
1/reduction_factor of every trial that reached that rung so far; otherwise it is paused
(its Train run saved a checkpoint at that epoch) and its slot goes to a promotion or a
new trial. A paused trial is promoted, and resumes from its checkpoint, as soon as
enough trials reached its rung for it to rank in that top part. When the search has
created all its trials and only paused ones are left, the best paused trial of the
highest rung is promoted if no trial has reached the last epoch yet (synchronous
successive halving's end), and the rest are stopped.

A resume pays a trial's launch again, so a trial that ranks at once goes on without a
pause. The search algorithm is told of a pause and of a promotion (`on_pause`,
`on_unpause`): a paused trial holds no slot of its concurrency limit, a promoted one takes
its slot back at once and resumes while fewer than `max_running` trials run. The sweep's
Optuna searcher learns each trial's value at the first rung (search.EpochOptunaSearch).
"""

from __future__ import annotations

from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler


def rung_epochs(grace_period: int, max_t: int, reduction_factor: int) -> list[int]:
    """The epochs a trial is judged at: grace_period x reduction_factor^k below max_t."""
    rungs, epoch = [], grace_period
    while epoch < max_t:
        rungs.append(epoch)
        epoch *= reduction_factor
    return rungs


class PromotionASHA(FIFOScheduler):
    """Promotion-based ASHA at epoch rungs (module docstring), `max_running` trials at once."""

    def __init__(self, time_attr: str, max_t: int, grace_period: int, reduction_factor: int,
                 max_running: int) -> None:
        super().__init__()
        self._time_attr, self._max_t, self._rf, self._max_running = time_attr, max_t, reduction_factor, max_running
        self.rungs = rung_epochs(grace_period, max_t, reduction_factor)
        # rung -> {trial_id: value, lower is better}, and the trials promoted from it.
        self.recorded: dict[int, dict[str, float]] = {r: {} for r in self.rungs}
        self.promoted: dict[int, set[str]] = {r: set() for r in self.rungs}
        # Promoted paused trials waiting for a slot, in promotion order. Each holds its slot
        # of the search's concurrency limit already (on_unpause), so that no new trial
        # takes it: Tune starts every pending trial whose actor fits, and a trial's actor
        # needs almost no CPU, so a resume beside two running trials would make three
        # share two CPUs (seen: resumes that took 30-43 s to start).
        self.due: list[str] = []
        self._metric, self._mode = "", "min"

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        value, epoch = result.get(self._metric), result.get(self._time_attr)
        if value is None or epoch not in self.recorded or trial.trial_id in self.recorded[epoch]:
            # No metric yet, not a rung, or the repeat of a rung's report after a resume.
            return TrialScheduler.CONTINUE
        self.recorded[epoch][trial.trial_id] = float(value) if self._mode == "min" else -float(value)
        if trial.trial_id in self._top(epoch):
            self.promoted[epoch].add(trial.trial_id)
            return TrialScheduler.CONTINUE
        tune_controller.search_alg.on_pause(trial.trial_id)
        self._promote_ranked(tune_controller)       # its slot goes to them first
        return TrialScheduler.PAUSE

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        trials = tune_controller.get_trials()
        self._promote_ranked(tune_controller)
        if not self.due and self._only_paused_left(tune_controller, trials):
            self._end(tune_controller, trials)
        by_id = {t.trial_id: t for t in trials}
        active = sum(t.status in (Trial.RUNNING, Trial.PENDING) for t in trials)
        if self.due and active < self._max_running:
            return by_id[self.due.pop(0)]
        return next((t for t in trials if t.status == Trial.PENDING), None)

    def _promote_ranked(self, tune_controller: Any) -> None:
        """Every paused trial that now ranks in its rung's top part joins `due`."""
        paused = self._paused(tune_controller)
        for rung in reversed(self.rungs):
            for trial_id in self._top(rung):
                if trial_id in paused and trial_id not in self.promoted[rung]:
                    self._make_due(tune_controller, rung, trial_id)

    def _end(self, tune_controller: Any, trials: list[Trial]) -> None:
        """Only paused trials are left: the highest rung's best goes on if no trial reached
        the last epoch (successive halving's end); otherwise the paused trials are stopped,
        each counted again by the search's limit first so that its end reaches the searcher."""
        paused = self._paused(tune_controller)
        if not any((t.last_result or {}).get(self._time_attr, 0) >= self._max_t for t in trials):
            for rung in reversed(self.rungs):
                best = next((t for t in self._ranked(rung) if t in paused and t not in self.promoted[rung]), None)
                if best is not None:
                    self._make_due(tune_controller, rung, best)
                    return
        for trial in paused.values():
            tune_controller.search_alg.on_unpause(trial.trial_id)
            tune_controller.stop_trial(trial)

    def _make_due(self, tune_controller: Any, rung: int, trial_id: str) -> None:
        self.promoted[rung].add(trial_id)
        self.due.append(trial_id)
        tune_controller.search_alg.on_unpause(trial_id)

    def _paused(self, tune_controller: Any) -> dict[str, Trial]:
        return {t.trial_id: t for t in tune_controller.get_trials()
                if t.status == Trial.PAUSED and t.trial_id not in self.due}

    @staticmethod
    def _only_paused_left(tune_controller: Any, trials: list[Trial]) -> bool:
        """The search made all its trials, some are paused, and none is pending or running."""
        return (tune_controller.search_alg.is_finished() and any(t.status == Trial.PAUSED for t in trials)
                and not any(t.status in (Trial.PENDING, Trial.RUNNING) for t in trials))

    def _ranked(self, rung: int) -> list[str]:
        return sorted(self.recorded[rung], key=self.recorded[rung].__getitem__)

    def _top(self, rung: int) -> list[str]:
        """The trials in the top 1/reduction_factor of those that reached `rung`."""
        ranked = self._ranked(rung)
        return ranked[:len(ranked) // self._rf]

    def debug_string(self) -> str:
        counts = ", ".join(f"epoch {r}: {len(self.recorded[r])} reached, {len(self.promoted[r])} promoted"
                           for r in self.rungs)
        return f"Promotion-based ASHA ({counts})."

"""The search space, search algorithm and scheduler of a sweep.

`num_heads` must divide `d_model`. Rather than sampling both and rejecting (which wastes
trials and breaks searchers that learn from every sample), the space holds one
categorical over the valid pairs, "256x8", decoded in the trial. That works with every
searcher and scheduler Tune offers, so every launched config is valid by construction.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.repeater import Repeater

from hlbd_ray.config import SpaceConfig, SweepConfig, sampled_configs, space_pairs
from hlbd_ray.params import ARCH_KEY, LR_KEY, REPEAT_KEY, STAGE_KEY, decode_arch  # noqa: F401  (re-exported)
from hlbd_ray.promotion import PromotionASHA
from hlbd_ray.search_restore import RestoredVariantGenerator


def valid_pairs(space: SpaceConfig) -> list[str]:
    """Every (d_model, num_heads) the space allows with d_model % num_heads == 0, as "DxH"."""
    return [f"{d}x{h}" for d, h in space_pairs(space)]


def lr_grid(space: SpaceConfig) -> list[float]:
    if space.lr_values:
        return [float(v) for v in space.lr_values]
    n = space.lr_grid_points
    if n == 1:
        return [space.lr_min]
    ratio = math.log(space.lr_max / space.lr_min)
    return [space.lr_min * math.exp(ratio * i / (n - 1)) for i in range(n)]


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """The Tune search space of a sweep section that `config.validate` has accepted."""
    pairs = valid_pairs(sweep.space)
    s = sweep.space
    if sweep.search == "grid":
        space = {ARCH_KEY: tune.grid_search(pairs), LR_KEY: tune.grid_search(lr_grid(s))}
        if sweep.repeats > 1:
            space[REPEAT_KEY] = tune.grid_search(list(range(sweep.repeats)))
        return space
    lr = tune.choice(lr_grid(s)) if s.lr_values else tune.loguniform(s.lr_min, s.lr_max)
    return {ARCH_KEY: tune.choice(pairs), LR_KEY: lr}


def num_trials(sweep: SweepConfig) -> int:
    """Tune's num_samples: grid points expand on their own (each once, its copies in the
    grid); a sampled config comes `repeats` times."""
    return 1 if sweep.search == "grid" else sampled_configs(sweep) * sweep.repeats


def search_trials(sweep: SweepConfig) -> int:
    """How many trials the search launches: for a grid, every point x repeats (Tune's
    num_samples is 1 there, see num_trials)."""
    if sweep.search != "grid":
        return num_trials(sweep)
    return len(valid_pairs(sweep.space)) * len(lr_grid(sweep.space)) * sweep.repeats


def confirm_space(candidates: list[tuple[str, float]], first_copy: int, seeds: int) -> dict[str, Any]:
    """Every candidate (arch, lr) once per seed; copy numbers from `first_copy` on, so the
    confirmation never reuses a seed the search ran."""
    def pick(i: int):
        # The basic generator hands the whole spec ({"config": ...}) to the function.
        return tune.sample_from(lambda spec: candidates[spec.get("config", spec)["candidate"]][i])

    return {"candidate": tune.grid_search(list(range(len(candidates)))),
            REPEAT_KEY: tune.grid_search(list(range(first_copy, first_copy + seeds))),
            ARCH_KEY: pick(0), LR_KEY: pick(1), STAGE_KEY: "confirm"}


# How often a draw that repeats a launched config is drawn again before it is kept (a
# space smaller than the sweep's trials has to repeat itself).
MAX_REDRAWS = 20


class EpochOptunaSearch(OptunaSearch):
    """Optuna search with three changes for a sweep's trials:

    - Intermediate values must be numbers; before the first validation (or after a
      non-finite one) the metric is missing and is not reported.
    - No config twice. On a finite space (lr_values) Optuna draws a config it already
      launched surprisingly often: its random start-up drew 2 repeats in 9 draws on the
      18-config space of bench/regret.py, and once modelling, TPE proposes its incumbent
      again and again. With the same train.seed that trial is the same run again: a
      wasted slot. Such a draw is told to Optuna as failed (TPE learns only from complete
      and pruned trials, so it neither counts nor skews anything) and replaced: on a
      finite space by a config not launched yet, enqueued so that Optuna records and
      learns from it; otherwise by drawing again, up to MAX_REDRAWS times. The
      replacement is one of the unlaunched configs nearest the repeated one (fewest
      parameters changed; seeded random among them): TPE proposed the incumbent because
      its model rates it best, so its neighbours are what the model would try next
      (bench/regret_replay.py, conf/sweep.yaml: 89% of searches within the seed noise,
      against 74% with a random replacement). Copies of a config on purpose are
      sweep.repeats.
    - With `tell_epoch` (the first rung of promotion-based ASHA), a trial's value is
      told to Optuna when it reports that epoch, not when it ends. Paused trials end
      only when the search does, so TPE would otherwise model nothing; and every trial
      reaches that epoch, so TPE compares like with like rather than favouring the trials
      that ran longer. Later results of a told trial are not Optuna's any more.
    """

    def __init__(self, *args: Any, fallback_seed: int = 0, tell_epoch: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tell_epoch = tell_epoch
        # Both saved and restored with the searcher (its __dict__).
        self._launched: set[tuple] = set()
        self._fallback = random.Random(fallback_seed)

    def suggest(self, trial_id: str) -> dict | None:
        from optuna.trial import TrialState

        study: Any = self._ot_study   # Ray declares it None until set_search_properties
        for _ in range(MAX_REDRAWS):
            params = super().suggest(trial_id)
            if _config_key(params) not in self._launched:
                break
            study.tell(self._ot_trials.pop(trial_id), state=TrialState.FAIL)
            fresh = self._nearest_unlaunched(params or {})
            if fresh:
                study.enqueue_trial(self._fallback.choice(fresh))   # the next ask takes it
        else:
            params = super().suggest(trial_id)   # the space is spent: a repeat it is
        self._launched.add(_config_key(params))
        return params

    def _nearest_unlaunched(self, repeated: dict) -> list[dict]:
        """The configs not launched yet that change the fewest parameters of `repeated`;
        [] when the space is not finite or is spent."""
        fresh = [c for c in self._finite_configs() if _config_key(c) not in self._launched]

        changed = [sum(c[k] != repeated.get(k) for k in c) for c in fresh]
        fewest = min(changed, default=0)
        return [c for c, n in zip(fresh, changed) if n == fewest]

    def _finite_configs(self) -> list[dict]:
        """Every config of a finite space (all categorical); [] otherwise."""
        from optuna.distributions import CategoricalDistribution

        space: Any = self._space
        if callable(space) or not all(isinstance(d, CategoricalDistribution) for d in space.values()):
            return []
        names = sorted(space)
        return [dict(zip(names, values)) for values in itertools.product(*(space[n].choices for n in names))]

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if result.get(self.metric) is None or not self._knows(trial_id):
            return
        super().on_trial_result(trial_id, result)
        if self._tell_epoch is not None and result.get("epochs_done") == self._tell_epoch:
            super().on_trial_complete(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._knows(trial_id):
            super().on_trial_complete(trial_id, result, error)

    def _knows(self, trial_id: str) -> bool:
        """Whether Optuna asked for this trial and has not been told its value. A resumed
        sweep can run a trial created after the searcher's state was saved (see
        search_restore): nothing to tell."""
        return trial_id in self._ot_trials and trial_id not in self._completed_trials


def _config_key(params: dict | None) -> tuple:
    return tuple(sorted((params or {}).items()))


class SeedRepeater(Repeater):
    """Tune's Repeater (the searcher learns from the mean over a config's copies), where a
    copy that ended without the metric counts as missing (nan) instead of failing."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False, **kwargs: Any) -> None:
        if result is not None and result.get(self.searcher.metric) is None:
            result = {k: v for k, v in result.items() if k != self.searcher.metric}
        super().on_trial_complete(trial_id, result, error=error, **kwargs)


class PeerBracket(_Bracket):
    """Ray's ASHA bracket, where a rung sets no cutoff, and so stops no one, until at
    least `min_peers` trials have reached it (Ray's own rule is one: `cutoff` is None
    only for an empty rung). Every result is recorded as before."""

    def __init__(self, *args: Any, min_peers: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.min_peers = min_peers

    def cutoff(self, recorded: dict) -> Any:
        return None if len(recorded) < self.min_peers else super().cutoff(recorded)


class EpochASHA(AsyncHyperBandScheduler):
    """ASHA with two changes:

    - A missing metric (no validation yet, or non-finite) is no information, not a
      failure on None.
    - No stop on too few peers: a trial reaching a rung is compared with the trials that
      reached it before. Ray's ASHA cuts the second trial at a rung when it is worse than
      the first, so with 2 trials at once one of the first pair is stopped on a single
      comparison, within the seed noise (seen in bench/regret.py: the best config cut
      after epoch 1 by the one trial ahead of it). Its one bracket is a PeerBracket: a
      trial is stopped only when at least `min_peers` trials reached the rung before it.
    """

    def __init__(self, time_attr: str, max_t: int, grace_period: int, reduction_factor: int,
                 min_peers: int = 0) -> None:
        super().__init__(time_attr=time_attr, max_t=max_t, grace_period=grace_period,
                         reduction_factor=reduction_factor)
        # The bracket Ray builds (brackets=1: s=0), with the peer rule.
        self._brackets = [PeerBracket(grace_period, max_t, reduction_factor, 0, min_peers=min_peers)]

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get(self._metric) is None:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if result.get(self._metric) is None:
            self.on_trial_remove(tune_controller, trial)
            return
        super().on_trial_complete(tune_controller, trial, result)


def build_searcher(sweep: SweepConfig, max_concurrent: int) -> Any:
    """Tune's basic generator (random, grid) or Optuna TPE, all seeded by sweep.seed.

    The basic generator limits concurrency itself; search_restore.restorable_search puts
    the limit on the others. Running more trials than the CPUs hold starves their Train
    workers.
    """
    if sweep.search == "optuna":
        # metric and mode come from TuneConfig (Tune refuses them in two places).
        from optuna.samplers import TPESampler
        quiet_optuna()
        # Promotion-based ASHA pauses trials: TPE learns from the first rung (see above).
        # (A trial that never reaches it, with grace_period >= epochs, is told at its end.)
        tell = sweep.grace_period if sweep.scheduler == "promotion" and sweep.repeats == 1 else None
        searcher = EpochOptunaSearch(sampler=TPESampler(seed=sweep.seed, n_startup_trials=sweep.startup_trials),
                                     tell_epoch=tell,
                                     fallback_seed=sweep.seed)
    elif sweep.search == "random" and sweep.repeats > 1:
        # The basic generator cannot hand out one config several times; Optuna's random
        # sampler draws the same distribution, and Repeater copies each draw.
        from optuna.samplers import RandomSampler
        quiet_optuna()
        searcher = EpochOptunaSearch(sampler=RandomSampler(seed=sweep.seed), fallback_seed=sweep.seed)
    else:
        return RestoredVariantGenerator(random_state=sweep.seed, max_concurrent=max_concurrent)
    return SeedRepeater(searcher, repeat=sweep.repeats) if sweep.repeats > 1 else searcher


def quiet_optuna() -> None:
    """Optuna logs "A new study created in memory" at INFO, on the sweep's console."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def build_scheduler(sweep: SweepConfig, max_epochs: int, max_concurrent: int = 1) -> Any:
    """ASHA at epoch rungs (the time attribute counts epochs, not reports), stopping- or
    promotion-based, or FIFO."""
    if sweep.scheduler == "fifo":
        return FIFOScheduler()
    if sweep.scheduler == "promotion":
        return PromotionASHA(time_attr="epochs_done", max_t=max_epochs,
                             grace_period=min(sweep.grace_period, max_epochs),
                             reduction_factor=sweep.reduction_factor, max_running=max(1, max_concurrent))
    return EpochASHA(time_attr="epochs_done", max_t=max_epochs,
                     grace_period=min(sweep.grace_period, max_epochs),
                     reduction_factor=sweep.reduction_factor, min_peers=sweep.rung_min_peers)

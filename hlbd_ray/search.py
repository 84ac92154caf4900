"""The search space, search algorithm and scheduler of a sweep.

`num_heads` must divide `d_model`. Rather than sampling both and rejecting (which wastes
trials and breaks searchers that learn from every sample), the space holds one
categorical over the valid pairs, "256x8", decoded in the trial. That works with every
searcher and scheduler Tune offers, so every launched config is valid by construction.
"""

from __future__ import annotations

import math
from typing import Any

from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from hlbd_ray.config import SpaceConfig, SweepConfig, space_pairs

ARCH_KEY, LR_KEY = "arch", "lr"


def valid_pairs(space: SpaceConfig) -> list[str]:
    """Every (d_model, num_heads) the space allows with d_model % num_heads == 0, as "DxH"."""
    return [f"{d}x{h}" for d, h in space_pairs(space)]


def decode_arch(arch: str) -> tuple[int, int]:
    d_model, num_heads = (int(part) for part in arch.split("x"))
    return d_model, num_heads


def lr_grid(space: SpaceConfig) -> list[float]:
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
        return {ARCH_KEY: tune.grid_search(pairs), LR_KEY: tune.grid_search(lr_grid(s))}
    return {ARCH_KEY: tune.choice(pairs), LR_KEY: tune.loguniform(s.lr_min, s.lr_max)}


class EpochOptunaSearch(OptunaSearch):
    """Optuna's intermediate values must be numbers; before the first validation (or
    after a non-finite one) the metric is missing and is not reported."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if result.get(self.metric) is not None:
            super().on_trial_result(trial_id, result)


class EpochASHA(AsyncHyperBandScheduler):
    """ASHA that treats a missing metric (no validation yet, or non-finite) as no
    information instead of failing on None."""

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

    The basic generator must get the concurrency limit itself: Tune ignores
    TuneConfig.max_concurrent_trials for it (only a warning), and running more trials
    than the CPUs hold starves their Train workers.
    """
    if sweep.search == "optuna":
        # metric and mode come from TuneConfig (Tune refuses them in two places).
        return EpochOptunaSearch(seed=sweep.seed)
    return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=max_concurrent)


def build_scheduler(sweep: SweepConfig, max_epochs: int) -> Any:
    """ASHA at epoch rungs (the time attribute counts epochs, not reports), or FIFO."""
    if sweep.scheduler == "fifo":
        return FIFOScheduler()
    return EpochASHA(time_attr="epochs_done", max_t=max_epochs,
                     grace_period=min(sweep.grace_period, max_epochs),
                     reduction_factor=sweep.reduction_factor)

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

from hlbd_ray.config import SpaceConfig, SweepConfig, valid_head_counts
from hlbd_ray.errors import UserError

ARCH_KEY, LR_KEY = "arch", "lr"


def valid_pairs(space: SpaceConfig) -> list[str]:
    """Every (d_model, num_heads) the space allows with d_model % num_heads == 0, as "DxH"."""
    if not space.d_model or not space.num_heads:
        raise UserError("sweep.space.d_model and sweep.space.num_heads must not be empty")
    for key, values in (("d_model", space.d_model), ("num_heads", space.num_heads)):
        if any(v <= 0 for v in values):
            raise UserError(f"sweep.space.{key} values must be > 0, got {list(values)}")
    pairs = [f"{d}x{h}" for d in space.d_model for h in space.num_heads if d % h == 0]
    if not pairs:
        hints = "; ".join(f"d_model={d} allows num_heads in {valid_head_counts(d)}"
                          for d in space.d_model)
        raise UserError(f"sweep.space has no valid pair: no num_heads in {list(space.num_heads)} "
                        f"divides any d_model in {list(space.d_model)} ({hints})")
    return pairs


def decode_arch(arch: str) -> tuple[int, int]:
    d_model, num_heads = (int(part) for part in arch.split("x"))
    return d_model, num_heads


def lr_grid(space: SpaceConfig) -> list[float]:
    n = space.lr_grid_points
    if n == 1:
        return [space.lr_min]
    ratio = math.log(space.lr_max / space.lr_min)
    return [space.lr_min * math.exp(ratio * i / (n - 1)) for i in range(n)]


def check_space(sweep: SweepConfig) -> list[str]:
    """Validate the sweep section; returns the valid pairs (refused here, before Ray starts)."""
    s = sweep.space
    if not (0 < s.lr_min <= s.lr_max and math.isfinite(s.lr_max)):
        raise UserError(f"sweep.space needs 0 < lr_min <= lr_max, got {s.lr_min}, {s.lr_max}")
    if s.lr_grid_points < 1:
        raise UserError(f"sweep.space.lr_grid_points must be >= 1, got {s.lr_grid_points}")
    if sweep.search not in ("random", "grid", "optuna"):
        raise UserError(f"sweep.search must be 'random', 'grid' or 'optuna', got {sweep.search!r}")
    if sweep.scheduler not in ("asha", "fifo"):
        raise UserError(f"sweep.scheduler must be 'asha' or 'fifo', got {sweep.scheduler!r}")
    if sweep.mode not in ("min", "max"):
        raise UserError(f"sweep.mode must be 'min' or 'max', got {sweep.mode!r}")
    if (sweep.num_samples < 1 or sweep.max_concurrent_trials < 0 or sweep.time_budget_s < 0
            or sweep.stall_timeout_s < 0):
        raise UserError("sweep.num_samples must be >= 1; max_concurrent_trials, time_budget_s, "
                        "stall_timeout_s >= 0")
    if sweep.grace_period < 1 or sweep.reduction_factor < 2:
        raise UserError("sweep.grace_period must be >= 1 and sweep.reduction_factor >= 2")
    if not sweep.name or "/" in sweep.name or sweep.name.startswith("."):
        raise UserError(f"sweep.name must be a plain folder name, got {sweep.name!r}")
    return valid_pairs(s)


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    pairs = check_space(sweep)
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

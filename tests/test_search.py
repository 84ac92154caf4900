"""The search space: only valid (d_model, num_heads) pairs, seeded, refused when empty."""

from __future__ import annotations

import pytest
from optuna.trial import TrialState
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from hlbd_ray.config import SpaceConfig, SweepConfig
from hlbd_ray.errors import UserError
from hlbd_ray.search import (
    REPEAT_KEY,
    STAGE_KEY,
    EpochASHA,
    EpochOptunaSearch,
    build_scheduler,
    build_searcher,
    confirm_space,
    decode_arch,
    lr_grid,
    num_trials,
    param_space,
    search_trials,
    valid_pairs,
)


def test_only_dividing_pairs_are_in_the_space():
    space = SpaceConfig(d_model=[128, 192], num_heads=[2, 3, 4, 6, 8])
    pairs = valid_pairs(space)
    assert pairs == ["128x2", "128x4", "128x8", "192x2", "192x3", "192x4", "192x6", "192x8"]
    assert all(d % h == 0 for d, h in map(decode_arch, pairs))


def test_a_space_with_no_valid_pair_is_refused_naming_the_valid_counts():
    with pytest.raises(UserError, match=r"no valid pair.*d_model=256 allows num_heads in \[1, 2, 4"):
        valid_pairs(SpaceConfig(d_model=[256], num_heads=[3, 5, 12]))


@pytest.mark.parametrize("search", ["random", "grid", "optuna"])
def test_every_search_algorithm_samples_only_valid_pairs(search):
    sweep = SweepConfig(search=search, space=SpaceConfig(d_model=[64, 96], num_heads=[3, 4, 8]))
    space = param_space(sweep)
    domain = space["arch"]
    values = domain["grid_search"] if search == "grid" else domain.categories
    assert set(values) == {"64x4", "64x8", "96x3", "96x4", "96x8"}


def test_grid_learning_rates_are_log_spaced_between_the_bounds():
    grid = lr_grid(SpaceConfig(lr_min=1e-4, lr_max=1e-2, lr_grid_points=3))
    assert grid == pytest.approx([1e-4, 1e-3, 1e-2])


def test_searchers_and_schedulers_follow_the_config():
    assert isinstance(build_searcher(SweepConfig(search="optuna"), 2), EpochOptunaSearch)
    basic = build_searcher(SweepConfig(search="random"), 2)
    assert isinstance(basic, BasicVariantGenerator) and basic.max_concurrent == 2
    asha = build_scheduler(SweepConfig(scheduler="asha", grace_period=5), max_epochs=3)
    assert isinstance(asha, EpochASHA)
    assert isinstance(build_scheduler(SweepConfig(scheduler="fifo"), max_epochs=3), FIFOScheduler)


class Trial:
    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def test_asha_cuts_at_epoch_rungs_counted_by_epochs_done():
    from ray.tune.schedulers import TrialScheduler

    asha = build_scheduler(SweepConfig(grace_period=1, reduction_factor=2), max_epochs=4)
    asha.set_search_properties("val_loss", "min")
    good, bad = Trial("good"), Trial("bad")
    for trial in (good, bad):
        asha.on_trial_add(None, trial)
    # Many reports within the first epoch reach no rung, however bad: results carry no
    # training_iteration here, so the time attribute can only be epochs_done.
    for _ in range(5):
        assert asha.on_trial_result(None, bad, {"epochs_done": 0, "val_loss": 9.0}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, good, {"epochs_done": 1, "val_loss": 1.0}) == TrialScheduler.CONTINUE
    # At the first epoch's rung the worse half stops.
    assert asha.on_trial_result(None, bad, {"epochs_done": 1, "val_loss": 9.0}) == TrialScheduler.STOP
    # The grace period is capped at the run's epochs: a trial that finished them stops.
    short = build_scheduler(SweepConfig(grace_period=5), max_epochs=3)
    short.set_search_properties("val_loss", "min")
    short.on_trial_add(None, good)
    assert short.on_trial_result(None, good, {"epochs_done": 2, "val_loss": 1.0}) == TrialScheduler.CONTINUE
    assert short.on_trial_result(None, good, {"epochs_done": 3, "val_loss": 1.0}) == TrialScheduler.STOP


def test_asha_treats_a_missing_metric_as_no_information():
    from ray.tune.schedulers import TrialScheduler

    asha = build_scheduler(SweepConfig(), max_epochs=4)
    asha.set_search_properties("val_loss", "min")

    class Trial:
        trial_id = "t1"

    asha.on_trial_add(None, Trial())
    assert asha.on_trial_result(None, Trial(), {"epochs_done": 1, "val_loss": None}) == TrialScheduler.CONTINUE
    asha.on_trial_complete(None, Trial(), {"epochs_done": 1, "val_loss": None})  # must not raise


def sampled_configs(sweep: SweepConfig, n: int) -> list[tuple[str, float]]:
    """What the basic generator would launch, in order (no cluster needed)."""
    from ray.tune.experiment import Experiment

    generator = build_searcher(sweep, 0)
    generator.add_configurations([Experiment("x", run=lambda config: None,
                                             config=param_space(sweep), num_samples=n)])
    return [(t.config["arch"], t.config["lr"]) for t in (generator.next_trial() for _ in range(n))]


def test_a_fixed_seed_reproduces_the_sampled_configs():
    first = sampled_configs(SweepConfig(seed=3), 6)
    assert first == sampled_configs(SweepConfig(seed=3), 6)
    assert first != sampled_configs(SweepConfig(seed=4), 6)
    assert all(decode_arch(a)[0] % decode_arch(a)[1] == 0 and 1e-4 <= lr <= 3e-3 for a, lr in first)


# --- grid points once, copies with their own seeds --------------------------------------


def launched(sweep: SweepConfig, limit: int = 100) -> list[dict]:
    """Every trial config the sweep's searcher would launch (no cluster needed)."""
    from ray.tune.experiment import Experiment
    from ray.tune.search import SearchGenerator

    searcher = build_searcher(sweep, 0)
    if not isinstance(searcher, BasicVariantGenerator):
        searcher.set_search_properties(sweep.metric, str(sweep.mode), param_space(sweep))
        searcher = SearchGenerator(searcher)
    searcher.add_configurations([Experiment("x", run=lambda config: None, config=param_space(sweep),
                                            num_samples=num_trials(sweep))])
    configs = []
    while len(configs) < limit and not searcher.is_finished():
        trial = searcher.next_trial()
        if trial is None:
            break
        configs.append(trial.config)
    return configs


def test_grid_runs_every_point_once():
    sweep = SweepConfig(search="grid", space=SpaceConfig(d_model=[64], num_heads=[2, 4], lr_grid_points=3))
    configs = launched(sweep)
    points = [(c["arch"], c["lr"]) for c in configs]
    assert len(points) == 6 and len(set(points)) == 6 and all(REPEAT_KEY not in c for c in configs)


@pytest.mark.parametrize(("search", "repeats"), [("grid", 1), ("grid", 2), ("random", 2), ("optuna", 1)])
def test_the_trial_count_a_sweep_announces_is_what_it_launches(search, repeats):
    # 128x6 does not divide: the grid has 3 arch points x 2 lrs, not 4 x 2.
    space = SpaceConfig(d_model=[128], num_heads=[2, 4, 6, 8], lr_grid_points=2)
    sweep = SweepConfig(search=search, num_samples=None if search == "grid" else 3, repeats=repeats, space=space)
    assert search_trials(sweep) == len(launched(sweep))


@pytest.mark.parametrize("search", ["grid", "random", "optuna"])
def test_repeats_copy_every_config_with_distinct_copy_numbers(search):
    space = SpaceConfig(d_model=[64], num_heads=[2, 4], lr_grid_points=2)
    sweep = SweepConfig(search=search, num_samples=None if search == "grid" else 3, repeats=2, space=space)
    configs = launched(sweep)
    by_config: dict[tuple, list[int]] = {}
    for c in configs:
        by_config.setdefault((c["arch"], c["lr"]), []).append(c[REPEAT_KEY])
    assert len(configs) == (8 if search == "grid" else 6)
    assert all(sorted(copies) == [0, 1] for copies in by_config.values()), by_config


def test_a_copy_without_the_metric_does_not_break_the_repeater():
    sweep = SweepConfig(search="optuna", num_samples=2, repeats=2)
    repeater = build_searcher(sweep, 0)
    repeater.set_search_properties("val_loss", "min", param_space(sweep))
    repeater.suggest("a"), repeater.suggest("b")
    repeater.on_trial_complete("a", {"val_loss": None})       # stopped before any validation
    repeater.on_trial_complete("b", {"val_loss": 1.5})         # must not raise


def test_the_confirmation_space_runs_each_candidate_once_per_fresh_seed():
    from ray.tune.experiment import Experiment

    generator = BasicVariantGenerator(random_state=0)
    picked = [("64x2", 1e-3), ("64x4", 3e-4)]
    generator.add_configurations([Experiment("x", run=lambda config: None,
                                             config=confirm_space(picked, first_copy=2, seeds=3))])
    configs = [t.config for t in iter(generator.next_trial, None)]
    got = sorted((c["arch"], c["lr"], c[REPEAT_KEY], c[STAGE_KEY]) for c in configs)
    assert got == sorted((a, lr, n, "confirm") for a, lr in picked for n in (2, 3, 4))


def test_explicit_learning_rates_are_the_only_ones_any_searcher_launches():
    space = SpaceConfig(d_model=[64], num_heads=[2, 4], lr_values=[1e-4, 1e-3])
    assert sorted({c["lr"] for c in launched(SweepConfig(search="grid", space=space))}) == [1e-4, 1e-3]
    for search in ("random", "optuna"):
        configs = launched(SweepConfig(search=search, num_samples=6, space=space))
        assert len(configs) == 6 and {c["lr"] for c in configs} <= {1e-4, 1e-3}


def test_optuna_never_launches_a_config_twice_until_the_space_is_spent():
    sweep = SweepConfig(search="optuna", seed=0,
                        space=SpaceConfig(d_model=[32], num_heads=[2, 4], lr_values=[1e-3, 3e-3]))
    searcher = build_searcher(sweep, 2)
    assert searcher.set_search_properties("val_loss", "min", param_space(sweep))
    drawn = [searcher.suggest(f"t{i}") for i in range(4)]
    # 4 configs, 4 draws: each once (without the redraw, seed 0 repeats one of them).
    assert sorted((d["arch"], d["lr"]) for d in drawn) == [("32x2", 1e-3), ("32x2", 3e-3),
                                                          ("32x4", 1e-3), ("32x4", 3e-3)]
    for i, d in enumerate(drawn):
        searcher.on_trial_complete(f"t{i}", {"val_loss": 1.0 + i, **d})
    # A spent space repeats itself rather than failing or looping.
    fifth = searcher.suggest("t4")
    assert (fifth["arch"], fifth["lr"]) in {(d["arch"], d["lr"]) for d in drawn}


def test_asha_waits_for_min_peers_at_a_rung_before_it_stops_anyone():
    from ray.tune.schedulers import TrialScheduler

    def cut(min_peers: int) -> list[str]:
        asha = build_scheduler(SweepConfig(grace_period=1, reduction_factor=2, rung_min_peers=min_peers),
                               max_epochs=4)
        asha.set_search_properties("val_loss", "min")
        trials = [Trial(f"t{i}") for i in range(4)]
        for trial in trials:
            asha.on_trial_add(None, trial)
        # Each reaches the first rung worse than every trial before it.
        return [asha.on_trial_result(None, t, {"epochs_done": 1, "val_loss": 1.0 + i})
                for i, t in enumerate(trials)]

    C, S = TrialScheduler.CONTINUE, TrialScheduler.STOP
    assert cut(0) == [C, S, S, S]          # Ray's rule: one trial ahead is enough
    assert cut(2) == [C, C, S, S]          # the second survives; the third has 2 peers ahead
    assert cut(3) == [C, C, C, S]
    # At the last epoch a trial stops whatever its peers: it has run its course.
    asha = build_scheduler(SweepConfig(rung_min_peers=5), max_epochs=1)
    asha.set_search_properties("val_loss", "min")
    asha.on_trial_add(None, Trial("only"))
    assert asha.on_trial_result(None, Trial("only"), {"epochs_done": 1, "val_loss": 1.0}) == S


def test_optuna_models_the_results_after_its_startup_draws():
    """TPE takes over after sweep.startup_trials random draws; Optuna's own default (10)
    would leave a sweep of 10 trials or fewer a random search."""
    import math

    def draws(startup: int, seed: int) -> list[float]:
        """Each draw's distance (in decades) from the best lr, 1e-3, which is its loss."""
        sweep = SweepConfig(search="optuna", seed=seed, num_samples=20, startup_trials=startup,
                            space=SpaceConfig(d_model=[32], num_heads=[2], lr_min=1e-5, lr_max=1e-1))
        searcher = build_searcher(sweep, 1)
        searcher.set_search_properties("val_loss", "min", param_space(sweep))
        out = []
        for i in range(20):
            out.append(abs(math.log10(searcher.suggest(f"t{i}")["lr"]) + 3))
            searcher.on_trial_complete(f"t{i}", {"val_loss": out[-1]})
        return out

    for seed in range(5):
        modelled, random = draws(3, seed), draws(100, seed)
        # The same random start-up, then TPE's own draws, which home in: over the last
        # 10 they land nearer the best lr than a random search's (about 0.65x here).
        assert modelled[:3] == random[:3] and modelled[3:] != random[3:]
        assert sum(modelled[10:]) < sum(random[10:]), (seed, modelled, random)


def test_tpe_proposing_its_incumbent_again_gets_a_config_not_launched_yet():
    space = SpaceConfig(d_model=[32], num_heads=[2, 4], lr_values=[3e-4, 1e-3, 3e-3])
    sweep = SweepConfig(search="optuna", seed=0, num_samples=6, startup_trials=2, space=space)
    searcher = build_searcher(sweep, 1)
    searcher.set_search_properties("val_loss", "min", param_space(sweep))
    drawn = []
    for i in range(6):
        drawn.append(searcher.suggest(f"t{i}"))
        # lr 3e-3 is best by far: TPE, modelling from the third draw, keeps proposing it.
        searcher.on_trial_complete(f"t{i}", {"val_loss": 1.0 if drawn[-1]["lr"] == 3e-3 else 2.0})
    assert len({(d["arch"], d["lr"]) for d in drawn}) == 6
    # What the fallback draws, Optuna records as a complete trial TPE learns from.
    assert len(searcher._ot_study.get_trials(states=(TrialState.COMPLETE,))) == 6


def test_a_repeat_is_replaced_by_an_unlaunched_config_nearest_to_it():
    """TPE proposed the repeat because its model rates it best: the replacement changes as
    few parameters of it as any config not launched yet does."""
    space = SpaceConfig(d_model=[32], num_heads=[2, 4, 8], lr_values=[3e-4, 1e-3, 3e-3])
    sweep = SweepConfig(search="optuna", seed=1, num_samples=9, startup_trials=1, space=space)
    searcher = build_searcher(sweep, 1)
    searcher.set_search_properties("val_loss", "min", param_space(sweep))
    for i in range(9):
        searcher.suggest(f"t{i}")
        # The first config is best by far: TPE keeps proposing it.
        searcher.on_trial_complete(f"t{i}", {"val_loss": 1.0 if i == 0 else 2.0})
    every = [(a, lr) for a in ("32x2", "32x4", "32x8") for lr in (3e-4, 1e-3, 3e-3)]
    trials = searcher._ot_study.get_trials()
    launched = [(t.params["arch"], t.params["lr"]) for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(launched) == sorted(every)

    def changed(a: tuple, b: tuple) -> int:
        return (a[0] != b[0]) + (a[1] != b[1])

    repeats = [(t, trials[t.number + 1]) for t in trials if t.state == TrialState.FAIL]
    assert len(repeats) >= 4
    for repeat, replacement in repeats:
        proposed = (repeat.params["arch"], repeat.params["lr"])
        before = {(t.params["arch"], t.params["lr"]) for t in trials[:repeat.number] if t.state == TrialState.COMPLETE}
        nearest = min(changed(proposed, c) for c in every if c not in before)
        assert changed(proposed, (replacement.params["arch"], replacement.params["lr"])) == nearest

"""The confirmation stage's arithmetic: distinct candidates, per-config seed statistics,
and the rule that says whether the winner's lead exceeds the seed noise."""

from __future__ import annotations

import math

import pytest

from hlbd_ray.confirm import candidates, config_stats, format_report, verdict
from hlbd_ray.train import WORST_SCORE, checkpoint_score


def row(tid, arch, lr, best=None, final=None, exact=None, seed=0):
    return {"trial_id": tid, "arch": arch, "lr": lr, "best_metric": best, "final_metric": final,
            "final_val_loss": final, "final_val_exact": exact, "seed": seed}


def test_candidates_are_distinct_configs_ranked_by_the_mean_over_their_copies():
    rows = [row("a", "64x2", 1e-3, best=1.0), row("b", "64x2", 1e-3, best=1.4),   # mean 1.2
            row("c", "64x4", 1e-3, best=1.1), row("d", "64x4", 1e-3, best=1.1),   # mean 1.1
            row("e", "64x8", 3e-4, best=1.3), row("f", "64x8", 1e-2, best=None)]
    assert candidates(rows, 2, "min") == [("64x4", 1e-3), ("64x2", 1e-3)]
    assert candidates(rows, 10, "min") == [("64x4", 1e-3), ("64x2", 1e-3), ("64x8", 3e-4)]
    assert candidates(rows, 1, "max") == [("64x8", 3e-4)]


def confirmed(winner_losses, runner_losses):
    rows = [row(f"w{i}", "64x4", 1e-3, final=v, exact=0.5, seed=i) for i, v in enumerate(winner_losses)]
    rows += [row(f"r{i}", "64x2", 1e-3, final=v, exact=0.4, seed=i) for i, v in enumerate(runner_losses)]
    stats = config_stats(rows, "val_loss", "min")
    return stats, verdict(stats)


def test_a_lead_larger_than_twice_the_standard_error_beats_the_noise():
    stats, result = confirmed([1.00, 1.01, 0.99], [1.10, 1.11, 1.09])
    assert [(e["arch"], e["final_metric_n"]) for e in stats] == [("64x4", 3), ("64x2", 3)]
    assert stats[0]["final_val_loss_mean"] == pytest.approx(1.0)
    assert stats[0]["final_val_loss_std"] == pytest.approx(0.01)
    assert result["lead"] == pytest.approx(0.1)
    assert result["noise_se"] == pytest.approx(math.sqrt(2 * 0.01 ** 2 / 3))
    assert result["lead_beyond_noise"] is True and result["winner"].startswith("64x4")
    assert "larger than the seed noise" in format_report(stats, result, "val_loss")


def test_a_lead_inside_the_seed_noise_is_reported_as_such():
    stats, result = confirmed([1.00, 1.20, 0.90], [1.05, 1.25, 0.95])
    assert result["winner"].startswith("64x4") and result["lead_beyond_noise"] is False
    assert "within the seed noise" in format_report(stats, result, "val_loss")


def test_one_seed_gives_no_noise_estimate():
    _, result = confirmed([1.0], [1.1])
    assert result["noise_se"] is None and result["lead_beyond_noise"] is None


@pytest.mark.parametrize("mode", ["min", "max"])
def test_a_checkpoint_without_the_metric_ranks_last_and_stays_a_finite_number(mode):
    assert checkpoint_score({"val_loss": 0.5}, "val_loss", mode) == 0.5
    for missing in ({"val_loss": None}, {}, {"val_loss": float("nan")}):
        score = checkpoint_score(missing, "val_loss", mode)
        assert score == WORST_SCORE[mode] and math.isfinite(score)
    worse = max if mode == "min" else min
    assert worse(0.5, WORST_SCORE[mode]) == WORST_SCORE[mode]

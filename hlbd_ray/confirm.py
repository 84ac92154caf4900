"""The confirmation stage: the search's top configs retrained over fresh seeds, and a
winner whose lead is weighed against the seed noise.

A search ranks single-seed results, so its best trial is partly the luckiest seed (and
early stopping compares trials mid-run). The confirmation retrains the `top_k` distinct
configs from scratch at the full budget, `seeds` times each with seeds the search never
used, and ranks them by the mean of their final metric. The rule for "the lead is larger
than the seed noise": lead > 2 x the standard error of the difference of the two means,
sqrt(s1^2/n1 + s2^2/n2) (Welch's), about a 95% one-sided margin for normal noise; with
few seeds the standard deviations are rough, which the report's n makes visible.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

NOISE_RULE = "lead > 2 x standard error of the difference of the means (Welch)"
CONFIRM_STAGE = "confirm"


def config_key(row: dict[str, Any]) -> tuple[str, float]:
    return str(row["arch"]), float(row["lr"])


def candidates(rows: list[dict[str, Any]], top_k: int, mode: str) -> list[tuple[str, float]]:
    """The top_k distinct (arch, lr) of the search, by the mean over a config's copies of
    each copy's best metric; configs without any metric are never candidates."""
    by_config: dict[tuple[str, float], list[float]] = defaultdict(list)
    for row in rows:
        if row.get("arch") and row.get("lr") is not None and row.get("best_metric") is not None:
            by_config[config_key(row)].append(row["best_metric"])
    ranked = sorted(by_config, key=lambda key: statistics.fmean(by_config[key]),
                    reverse=(mode == "max"))
    return ranked[:top_k]


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def config_stats(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Per confirmed config (best mean final metric first): seeds run, mean and standard
    deviation of the final val_loss, val_exact and sweep metric."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[config_key(row)].append(row)
    stats = []
    for (arch, lr), members in groups.items():
        entry: dict[str, Any] = {"arch": arch, "lr": lr, "trials": [r["trial_id"] for r in members],
                                 "seeds": [r.get("seed") for r in members]}
        for key in ("final_metric", "final_val_loss", "final_val_exact"):
            values = [r[key] for r in members if r.get(key) is not None]
            entry[f"{key}_mean"], entry[f"{key}_std"] = _mean_std(values)
            entry[f"{key}_n"] = len(values)
        stats.append(entry)
    scored = [e for e in stats if e["final_metric_mean"] is not None]
    scored.sort(key=lambda e: e["final_metric_mean"], reverse=(mode == "max"))
    return scored + [e for e in stats if e["final_metric_mean"] is None]


def verdict(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Winner, runner-up, the winner's lead in the metric, the noise it is measured
    against, and whether the lead is larger (NOISE_RULE)."""
    scored = [e for e in stats if e["final_metric_mean"] is not None]
    if not scored:
        return {"winner": None, "rule": NOISE_RULE}
    winner = scored[0]
    out: dict[str, Any] = {"winner": f"{winner['arch']} lr {winner['lr']:.3e}", "rule": NOISE_RULE,
                           "runner_up": None, "lead": None, "noise_se": None, "lead_beyond_noise": None}
    if len(scored) > 1:
        second = scored[1]
        lead = abs(second["final_metric_mean"] - winner["final_metric_mean"])
        variances = [(e["final_metric_std"] ** 2) / e["final_metric_n"]
                     for e in (winner, second) if e["final_metric_std"] is not None]
        se = math.sqrt(sum(variances)) if len(variances) == 2 else None
        out.update(runner_up=f"{second['arch']} lr {second['lr']:.3e}", lead=lead, noise_se=se,
                   lead_beyond_noise=None if se is None else lead > 2 * se)
    return out


def format_report(stats: list[dict[str, Any]], result: dict[str, Any], metric: str) -> str:
    """The console table of the confirmation and its verdict."""
    def pm(entry: dict[str, Any], key: str, spec: str) -> str:
        mean, std = entry[f"{key}_mean"], entry[f"{key}_std"]
        if mean is None:
            return "-"
        return format(mean, spec) + (f" ± {format(std, spec)}" if std is not None else "")

    lines = [f"\nconfirmation: {'config':<8} {'lr':>9} {'seeds':>5}  {'final val_loss':>17}  "
             f"{'final val_exact':>17}"]
    for e in stats:
        lines.append(f"              {e['arch']:<8} {e['lr']:>9.2e} {e['final_metric_n']:>5}  "
                     f"{pm(e, 'final_val_loss', '.4f'):>17}  {pm(e, 'final_val_exact', '.4f'):>17}")
    if result.get("runner_up"):
        beyond = result["lead_beyond_noise"]
        word = ("larger than the seed noise" if beyond else "within the seed noise" if beyond is not None
                else "not comparable (one seed: no noise estimate)")
        se = result["noise_se"]
        lines.append(f"winner {result['winner']}: leads {result['runner_up']} by {result['lead']:.4f} "
                     f"{metric}, {word} (standard error {'-' if se is None else format(se, '.4f')}; "
                     f"rule: {result['rule']})")
    elif result.get("winner"):
        lines.append(f"winner {result['winner']}: no runner-up to compare with")
    return "\n".join(lines)

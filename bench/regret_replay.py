"""Benchmark: the search of bench/regret.py replayed over many search seeds, no training.

bench/regret.py runs the search for real, a few minutes per search seed, so it can afford
4 seeds: too few to tell two settings apart. But a search trial of config c is the same
run as the one-seed grid's trial of c, in the ground truth's "truth" sweep (the same
train.seed and data order; their val_loss agrees at every epoch to the last digit). So
the search can be replayed from that sweep's recorded epochs: the sweep's real searcher
and scheduler (`search.build_searcher`, `search.build_scheduler`, built from the same
config as regret.py's search, --set included) are driven by those epochs, with 2 trials
at once as regret.py runs them. A trial reports epoch e at its start plus the grid's
`time_total_s` at e; its slot time is that at its last epoch. Its machine time is 2 slots
x the span from the first launch to the last trial's end, against the grid replayed the
same way (its trials in order, 2 at once, no gap between). What the replay does not
have is the search run's own timing, which can reorder results at a rung: a trial that
runs beside an idle slot or a lighter trial runs faster than the grid's did
(BENCHMARKS.md section 9).

    python bench/regret.py --out DIR                          # the ground truth, once
    python bench/regret_replay.py DIR --seeds 120             # the default search
    python bench/regret_replay.py DIR --seeds 120 --set sweep.reduction_factor=3
    python bench/regret_replay.py DIR --smoke --json          # DIR from regret.py --smoke
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from bench_output import print_json, print_load
from regret import CONCURRENT, FULL, REPO, SMOKE, arch, ground_truth, read_truth, regret_of, search_overrides, space_overrides, truth_name

# (arch, lr) -> [(val_loss, time_total_s) at the end of each epoch] of the first copy.
Curves = dict[tuple[str, float], list[tuple[float, float]]]


class ReplayedTrial:
    """What Tune's scheduler reads of a trial."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id

    def __repr__(self) -> str:
        return self.trial_id


def first_copy_curves(truth: Path, trials: list[dict]) -> Curves:
    """The one-seed grid's epochs (`truth`: its sweep folder, `trials`: its trials)."""
    epochs: dict[str, list[dict]] = defaultdict(list)
    for row in pq.read_table(truth / "report" / "epochs.parquet").to_pylist():
        epochs[row["trial_id"]].append(row)
    curves = {}
    for t in trials:
        rows = sorted(epochs[t["trial_id"]], key=lambda r: r["epoch"])
        curves[(arch(t), round(t["lr"], 12))] = [(r["val_loss"], r["time_total_s"]) for r in rows]
    return curves


def replay(curves: Curves, cfg: Any) -> tuple[list[tuple[tuple[str, float], int]], float]:
    """One search: (config, epochs it ran) of each trial, in launch order, and the time
    its last trial ended (the first ones launch at 0)."""
    from ray.tune.schedulers import TrialScheduler

    from hlbd_ray.search import build_scheduler, build_searcher, param_space

    sweep, epochs = cfg.sweep, cfg.train.epochs
    searcher = build_searcher(sweep, CONCURRENT)
    searcher.set_search_properties(sweep.metric, sweep.mode.value, param_space(sweep))
    scheduler = build_scheduler(sweep, epochs)
    scheduler.set_search_properties(sweep.metric, sweep.mode.value)
    events: list[tuple] = []      # (time, order, trial index, epoch, start)
    order = itertools.count()
    runs: list[tuple[tuple[str, float], int]] = []
    trials: list[ReplayedTrial] = []

    def launch(now: float) -> None:
        trials.append(ReplayedTrial(f"t{len(trials)}"))
        params = searcher.suggest(trials[-1].trial_id)
        key = (params["arch"], round(params["lr"], 12))
        runs.append((key, 0))
        scheduler.on_trial_add(None, trials[-1])
        heapq.heappush(events, (now + curves[key][0][1], next(order), len(runs) - 1, 1, now))

    for _ in range(min(CONCURRENT, sweep.num_samples)):
        launch(0.0)
    now = 0.0
    while events:
        now, _, index, epoch, start = heapq.heappop(events)
        trial, key = trials[index], runs[index][0]
        runs[index] = (key, epoch)
        result = {sweep.metric: curves[key][epoch - 1][0], "epochs_done": epoch, "training_iteration": epoch}
        searcher.on_trial_result(trial.trial_id, result)
        if epoch < epochs and scheduler.on_trial_result(None, trial, result) == TrialScheduler.CONTINUE:
            heapq.heappush(events, (start + curves[key][epoch][1], next(order), index, epoch + 1, start))
            continue
        searcher.on_trial_complete(trial.trial_id, result)
        scheduler.on_trial_complete(None, trial, result)
        if len(trials) < sweep.num_samples:
            launch(now)
    return runs, now


def grid_span(curves: Curves) -> float:
    """The one-seed grid replayed as a search is: its trials in the order recorded,
    CONCURRENT at once, each for its time_total_s; the time the last one ends."""
    slots = [0.0] * CONCURRENT
    for curve in curves.values():
        heapq.heapreplace(slots, slots[0] + curve[-1][1])
    return max(slots)


def outcome(curves: Curves, runs: list[tuple[tuple[str, float], int]]) -> tuple[tuple[str, float], float]:
    """The search's pick (its trial with the best val_loss at any epoch, as best.json's
    search_best) and its slot time."""
    pick = min(runs, key=lambda run: min(loss for loss, _ in curves[run[0]][:run[1]]))[0]
    return pick, sum(curves[key][epochs - 1][1] for key, epochs in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="bench/regret.py's --out folder (its ground truth sweeps are read)")
    parser.add_argument("--smoke", action="store_true", help="the folder is from regret.py --smoke")
    parser.add_argument("--seeds", type=int, default=120, help="replay sweep.seed 0..N-1")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the search, as regret.py --set; repeatable")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()
    from hlbd_ray.config import load_config

    mode = SMOKE if args.smoke else FULL
    copies = read_truth(Path(args.out))
    truth, noise, grid_cpu = ground_truth(copies)
    curves = first_copy_curves(Path(args.out) / truth_name(0), copies[0])
    load_start = print_load("start")
    grid_machine = grid_span(curves)   # the same grid for every seed
    regrets, ratios, machine = [], [], []
    for seed in range(args.seeds):
        cfg = load_config(REPO / mode["config"], [*space_overrides(mode), *search_overrides(mode, seed, args.set)])
        runs, span = replay(curves, cfg)
        pick, slot_time = outcome(curves, runs)
        regrets.append(regret_of({"arch": pick[0], "lr": pick[1]}, truth, noise))
        ratios.append(slot_time / grid_cpu)
        machine.append(span / grid_machine)   # both x CONCURRENT slots
    within = sum(r < 1 for r in regrets)
    met = sum(r < 1 and c <= 1 / 3 for r, c in zip(regrets, ratios))
    print(f"\n{len(truth)} configs, seed noise {noise:.4f}, grid at one seed {grid_cpu:.0f} CPU-s; "
          f"search overrides {args.set or 'none'}\n")
    print(f"{'search seeds':>12} {'regret < 1':>10} {'mean regret':>11} {'mean CPU ratio':>14} "
          f"{'max CPU ratio':>13} {'mean machine ratio':>18} {'both (target)':>13}")
    print(f"{args.seeds:>12} {within:>10} {statistics.fmean(regrets):>11.2f} {statistics.fmean(ratios):>14.3f} "
          f"{max(ratios):>13.3f} {statistics.fmean(machine):>18.3f} {met:>13}")
    if args.json:
        print_json({"bench": "regret_replay", "smoke": args.smoke, "overrides": args.set, "seeds": args.seeds,
                    "seed_noise": noise, "grid_cpu_s": grid_cpu, "within_noise": within, "target_met": met,
                    "regret_by_seed": regrets, "cpu_ratio_by_seed": ratios, "machine_ratio_by_seed": machine,
                    "load_start": load_start})


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()

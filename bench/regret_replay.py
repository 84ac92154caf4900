"""Benchmark: the search of bench/regret.py replayed over many search seeds, no training.

bench/regret.py runs the search for real, a few minutes per search seed, so it can afford
4 seeds: too few to tell two settings apart. But a search trial of config c is the same
run as the one-seed grid's trial of c, in the ground truth's "truth" sweep (the same
train.seed and data order; their val_loss agrees at every epoch to the last digit). So
the search can be replayed from that sweep's recorded epochs: the sweep's real searcher
and scheduler (`search.build_searcher`, `search.build_scheduler`, built from the same
config as regret.py's search, --set included) are driven by those epochs, with 2 trials
at once as regret.py runs them. A trial reports epoch e at its start plus the grid's
`time_total_s` at e; its slot time is that at its last epoch. A trial the scheduler pauses
(sweep.scheduler=promotion) resumes when the scheduler chooses it, and pays a launch again:
its first epoch's time less a later epoch's. Its machine time is 2 slots
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
from typing import Any, NamedTuple

import pyarrow.parquet as pq

from bench_output import print_json, print_load
from regret import CONCURRENT, FULL, REPO, SMOKE, arch, ground_truth, read_truth, regret_of, search_overrides, space_overrides, truth_name

# (arch, lr) -> [(val_loss, time_total_s) at the end of each epoch] of the first copy.
Curves = dict[tuple[str, float], list[tuple[float, float]]]


class Run(NamedTuple):
    """One replayed trial: its config, the epochs it ran and its slot time."""
    key: tuple[str, float]
    epochs: int
    slot_s: float


class ReplayedTrial:
    """What Tune's scheduler reads of a trial."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id
        self.status = "PENDING"
        self.last_result: dict = {}

    def __repr__(self) -> str:
        return self.trial_id


class ReplayedController:
    """What a scheduler reads of Tune's controller: the trials, the search algorithm (whose
    concurrency limit a pause frees and a resume takes back) and stop_trial."""

    def __init__(self, searcher: Any, num_samples: int) -> None:
        self.trials: list[ReplayedTrial] = []
        self.searcher, self.num_samples = searcher, num_samples
        self.search_alg = self
        self.live: set[str] = set()        # running or pending, as Tune's concurrency limit counts

    def get_trials(self) -> list[ReplayedTrial]:
        return self.trials

    def is_finished(self) -> bool:
        return len(self.trials) >= self.num_samples

    def on_pause(self, trial_id: str) -> None:
        self.live.discard(trial_id)

    def on_unpause(self, trial_id: str) -> None:
        self.live.add(trial_id)

    def stop_trial(self, trial: ReplayedTrial) -> None:
        trial.status = "TERMINATED"
        self.live.discard(trial.trial_id)
        self.searcher.on_trial_complete(trial.trial_id, trial.last_result)


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


def launch_s(curve: list[tuple[float, float]]) -> float:
    """A trial's start, from its first epoch's time less a later epoch's (what a resume
    pays again)."""
    return curve[0][1] - (curve[1][1] - curve[0][1]) if len(curve) > 1 else 0.0


def replay(curves: Curves, cfg: Any) -> tuple[list[Run], float]:
    """One search: (config, epochs it ran, its slot time) of each trial, in launch order,
    and the time its last trial ended (the first ones launch at 0). A trial the scheduler
    pauses (promotion-based ASHA) resumes, when chosen, after a launch again."""
    from ray.tune.schedulers import TrialScheduler

    from hlbd_ray.search import build_scheduler, build_searcher, param_space

    sweep, epochs = cfg.sweep, cfg.train.epochs
    searcher = build_searcher(sweep, CONCURRENT)
    searcher.set_search_properties(sweep.metric, sweep.mode.value, param_space(sweep))
    scheduler = build_scheduler(sweep, epochs, CONCURRENT)
    scheduler.set_search_properties(sweep.metric, sweep.mode.value)
    ctl = ReplayedController(searcher, sweep.num_samples)
    events: list[tuple] = []      # (time, order, trial index, epoch)
    order = itertools.count()
    keys: list[tuple[str, float]] = []
    done = [0] * sweep.num_samples
    slot_s = [0.0] * sweep.num_samples

    def start(index: int, now: float) -> None:
        """Run trial `index` from the epoch it has done to its next one."""
        curve, trial = curves[keys[index]], ctl.trials[index]
        e = done[index]
        seconds = curve[0][1] if e == 0 else launch_s(curve) + curve[e][1] - curve[e - 1][1]
        slot_s[index] += seconds
        trial.status = "RUNNING"
        heapq.heappush(events, (now + seconds, next(order), index, e + 1))

    def fill(now: float) -> None:
        """The free slots to the scheduler's choice, new trials created as Tune does."""
        while sum(t.status == "RUNNING" for t in ctl.trials) < CONCURRENT:
            if len(ctl.trials) < sweep.num_samples and len(ctl.live) < CONCURRENT:
                trial = ReplayedTrial(f"t{len(ctl.trials)}")
                params = searcher.suggest(trial.trial_id)
                keys.append((params["arch"], round(params["lr"], 12)))
                ctl.trials.append(trial)
                ctl.live.add(trial.trial_id)
                scheduler.on_trial_add(ctl, trial)
            chosen = scheduler.choose_trial_to_run(ctl)
            if chosen is None:
                return
            start(ctl.trials.index(chosen), now)

    now = 0.0
    fill(now)
    while events:
        now, _, index, epoch = heapq.heappop(events)
        trial, key = ctl.trials[index], keys[index]
        done[index] = epoch
        result = {sweep.metric: curves[key][epoch - 1][0], "epochs_done": epoch, "training_iteration": epoch}
        trial.last_result = result
        searcher.on_trial_result(trial.trial_id, result)
        decision = scheduler.on_trial_result(ctl, trial, result) if epoch < epochs else TrialScheduler.STOP
        if decision == TrialScheduler.CONTINUE:
            seconds = curves[key][epoch][1] - curves[key][epoch - 1][1]
            slot_s[index] += seconds
            heapq.heappush(events, (now + seconds, next(order), index, epoch + 1))
            continue
        if decision == TrialScheduler.PAUSE:
            trial.status = "PAUSED"
        else:
            ctl.stop_trial(trial)
            scheduler.on_trial_complete(ctl, trial, result)
        fill(now)
    return [Run(key, done[i], slot_s[i]) for i, key in enumerate(keys)], now


def grid_span(curves: Curves) -> float:
    """The one-seed grid replayed as a search is: its trials in the order recorded,
    CONCURRENT at once, each for its time_total_s; the time the last one ends."""
    slots = [0.0] * CONCURRENT
    for curve in curves.values():
        heapq.heapreplace(slots, slots[0] + curve[-1][1])
    return max(slots)


def outcome(curves: Curves, runs: list[Run]) -> tuple[tuple[str, float], float]:
    """The search's pick (its trial with the best val_loss at any epoch, as best.json's
    search_best) and its slot time."""
    pick = min(runs, key=lambda run: min(loss for loss, _ in curves[run.key][:run.epochs])).key
    return pick, sum(run.slot_s for run in runs)


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

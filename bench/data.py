"""Benchmark: the data path: load + tokenize the real HLBD files, then hand them to trials.

- load: `prepare_data` on both real files (HLBD Full V2 + Hardcore V2, 10,042 pairs):
  read, parse, dedup, split, build the vocabulary, encode. Timed `--repeats` times in
  this process; the first run is shown apart (cold file cache, first-call costs).
- per trial, the way the sweep does it: the driver `ray.put`s the PreparedData once and
  each trial's worker `ray.get`s it (a reference nested in the config, as
  `train_loop_per_worker` receives it), against each trial re-reading and re-tokenizing
  the files itself. Each "trial" is a fresh actor process (its start-up is not timed; the
  modules the data needs are imported before timing), and the two ways alternate which
  goes first.

    python bench/data.py
    python bench/data.py --smoke --json
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import time
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from bench_output import print_json, print_load  # noqa: E402
from hlbd_ray import hlbd_data  # noqa: E402
from hlbd_ray.config import DataConfig  # noqa: E402
from hlbd_ray.data import PreparedData, prepare_data  # noqa: E402

DATA = ["hlbd:full", "hlbd:hardcore"]  # the shipped HLBD Full V2 and Hardcore V2 files
MAX_LEN = 256  # above the longest sequence of both files (232): nothing is cut


def load(paths: list[str]) -> tuple[float, PreparedData]:
    start = time.perf_counter()
    data = prepare_data(DataConfig(paths=paths), MAX_LEN)
    return time.perf_counter() - start, data


def per_trial(data: PreparedData, paths: list[str], trials: int) -> dict[str, list[float]]:
    import ray

    class Trial:
        def __init__(self) -> None:
            import hlbd_ray.data  # noqa: F401  (what unpickling the data needs)

        def get_ms(self, refs: list[Any]) -> float:
            start = time.perf_counter()
            got = ray.get(refs[0])
            assert len(got.train) > 0
            return (time.perf_counter() - start) * 1e3

        def reread_s(self, paths: list[str]) -> float:
            return load(paths)[0]

    # Applied as a call: type checkers ignore what a class decorator returns (an ActorClass).
    trial_actor = ray.remote(num_cpus=1)(Trial)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        start = time.perf_counter()
        ref = ray.put(data)
        put_ms = (time.perf_counter() - start) * 1e3
        out: dict[str, list[float]] = {"get_ms": [], "reread_s": [], "put_ms": [put_ms]}
        for i in range(trials):
            # Any: Ray types a handle as ActorHandle[Trial] | type[Trial], whose methods have
            # no `.remote` unless declared with @ray.method, and without __ray_ready__.
            trial: Any = trial_actor.remote()
            ray.get(trial.__ray_ready__.remote())
            if i % 2 == 0:
                out["get_ms"].append(ray.get(trial.get_ms.remote([ref])))
                out["reread_s"].append(ray.get(trial.reread_s.remote(paths)))
            else:
                out["reread_s"].append(ray.get(trial.reread_s.remote(paths)))
                out["get_ms"].append(ray.get(trial.get_ms.remote([ref])))
            ray.kill(trial)
        return out
    finally:
        ray.shutdown()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="HLBD load time and per-trial data hand-over")
    parser.add_argument("--data", nargs="+", default=DATA, help="data.paths entries (files or hlbd: names)")
    parser.add_argument("--repeats", type=int, default=3, help="loads timed in this process")
    parser.add_argument("--trials", type=int, default=8, help="trial actors")
    parser.add_argument("--smoke", action="store_true", help="one load, two trials")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.smoke:
        args.repeats, args.trials = 1, 2
    return args


def main() -> None:
    args = parse_args()
    load_start = print_load("start")
    paths = args.data
    runs = [load(paths) for _ in range(args.repeats)]
    loads, data = [seconds for seconds, _ in runs], runs[-1][1]
    stats = data.dataset_stats
    size_mb = len(pickle.dumps(data, protocol=5)) / 2 ** 20
    trials = per_trial(data, paths, args.trials)
    r = {"load_s": statistics.median(loads), "load_first_s": loads[0],
         "files": [hlbd_data.resolve(p) for p in paths], "pairs": stats["total"]["pairs"], "train_pairs": stats["train_pairs"],
         "vocab_size": stats["vocab_size"],
         "pickled_mb": size_mb, "put_ms": trials["put_ms"][0],
         "per_trial_get_ms": statistics.median(trials["get_ms"]), "per_trial_get_ms_max": max(trials["get_ms"]),
         "per_trial_reread_s": statistics.median(trials["reread_s"]), "trials": args.trials,
         "loadavg_start": load_start}
    r["reread_vs_get"] = r["per_trial_reread_s"] * 1e3 / r["per_trial_get_ms"]
    print(f"\nHLBD data: {r['pairs']} pairs ({r['train_pairs']} train), vocab {r['vocab_size']}, "
          f"max_len {MAX_LEN}, {r['pickled_mb']:.1f} MiB pickled")
    print(f"load + tokenize in this process: {r['load_s']:.2f} s (median of {args.repeats}; "
          f"first {r['load_first_s']:.2f} s)")
    print(f"ray.put once: {r['put_ms']:.1f} ms")
    print(f"per trial ({args.trials} fresh actors): ray.get {r['per_trial_get_ms']:.2f} ms "
          f"(max {r['per_trial_get_ms_max']:.2f}), re-read {r['per_trial_reread_s']:.2f} s "
          f"-> {r['reread_vs_get']:.0f}x")
    r["loadavg_end"] = print_load("end")
    if args.json:
        print_json(r)


if __name__ == "__main__":
    main()

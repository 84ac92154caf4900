"""Benchmark: does the default search find the right answer, and at what cost?

On a small finite space (widths x head counts x learning rates, `sweep.space.lr_values`)
two sweeps run through `jobs/sweep.py`, the real job:

- ground truth: every config at the full budget, FIFO, 2 seeds each (grid, repeats 2).
  A config's true score is the mean of its seeds' final val_loss; the seed noise is the
  pooled within-config standard deviation of the final val_loss.
- the default search: Optuna + ASHA with half as many trials as the space has configs,
  then the confirmation stage. The search's own pick ("search only": its best trial)
  and the confirmed winner ("with confirmation") come from the same run: best.json holds
  both, and the search-only cost counts the search trials alone.

    regret    = true score of the chosen config - true score of the best config, in
                units of the seed noise (0: the best config; < 1: within the noise)
    CPU ratio = trial slot time of the strategy / slot time of the exhaustive grid at
                one seed (the first copy of each ground-truth config); a trial holds one
                CPU, so slot time is CPU time reserved (Tune's time_total_s summed)

Target (issue 11): regret within the seed noise at no more than 1/3 of the grid's CPU time.

    python bench/regret.py                # ~15 minutes on 2 cores, +3-4 per search seed (BENCHMARKS.md section 9)
    python bench/regret.py --out DIR --search-seeds 4   # the ground truth in DIR reused
    python bench/regret.py --out DIR2 --set sweep.rung_min_peers=2   # DIR2/truth: a link to DIR's
    python bench/regret.py --smoke --json # under a minute: a 2-config micro space

bench/regret_replay.py replays the search over hundreds of seeds from the ground truth's
recorded epochs, without training: 4 real search seeds cannot tell two settings apart.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from bench_output import print_json, print_load

REPO = Path(__file__).resolve().parent.parent

# conf/sweep.yaml's model and data (2,000 pairs): the budget a default sweep's trials get.
FULL: dict[str, Any] = {"config": "conf/sweep.yaml", "base": [], "widths": [128, 192], "heads": [2, 4, 8],
                        "lrs": [3e-4, 1e-3, 3e-3], "top_k": 2, "seeds": 2}
SMOKE: dict[str, Any] = {"config": "conf/smoke.yaml", "base": ["data.generated_per_module=20", "train.epochs=1"],
                         "widths": [32], "heads": [2, 4], "lrs": [3e-3], "top_k": 2, "seeds": 1}
# Both sweeps run 2 trials at once on 2 CPUs (bench/regret_replay.py replays that).
CONCURRENT = 2
TRUTH = ["sweep.search=grid", "sweep.num_samples=null", "sweep.repeats=2", "sweep.scheduler=fifo",
         "sweep.confirm.top_k=0"]


def configs_in(mode: dict[str, Any]) -> int:
    return len(mode["widths"]) * len(mode["heads"]) * len(mode["lrs"])   # all divide here


def space_overrides(mode: dict[str, Any]) -> list[str]:
    return [*mode["base"], f"sweep.space.d_model=[{','.join(map(str, mode['widths']))}]",
            f"sweep.space.num_heads=[{','.join(map(str, mode['heads']))}]",
            f"sweep.space.lr_values=[{','.join(map(str, mode['lrs']))}]"]


def search_overrides(mode: dict[str, Any], seed: int, extra: list[str]) -> list[str]:
    """The default search with half as many trials as the space has configs, then its
    confirmation; `extra` (--set) last."""
    return ["sweep.search=optuna", "sweep.scheduler=asha", f"sweep.num_samples={max(1, configs_in(mode) // 2)}",
            f"sweep.confirm.top_k={mode['top_k']}", f"sweep.confirm.seeds={mode['seeds']}",
            f"sweep.seed={seed}", *extra]


def sweep(out: Path, name: str, mode: dict[str, Any], *overrides: str) -> tuple[list[dict], dict]:
    args = [sys.executable, str(REPO / "jobs" / "sweep.py"), "--config", mode["config"], *space_overrides(mode),
            f"output_dir={out}", f"sweep.name={name}", "cluster.num_cpus=2",
            f"sweep.max_concurrent_trials={CONCURRENT}", *overrides]
    start = time.monotonic()
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{name} sweep failed ({done.returncode}): {done.stderr[-2000:]}")
    print(f"{name}: {time.monotonic() - start:.0f} s wall", flush=True)
    exp = out / name
    trials = pq.read_table(open(exp / "report" / "trials.parquet", "rb")).to_pylist()
    return trials, json.loads((exp / "best.json").read_text())


def arch(trial: dict[str, Any]) -> str:
    return f"{trial['d_model']}x{trial['num_heads']}"


def ground_truth(trials: list[dict]) -> tuple[dict[tuple[str, float], float], float, float]:
    """True score per config, the pooled seed noise, and the one-seed grid's slot time."""
    finals: dict[tuple[str, float], list[float]] = defaultdict(list)
    for t in trials:
        if t["last_val_loss"] is not None:
            finals[(arch(t), round(t["lr"], 12))].append(t["last_val_loss"])
    truth = {key: statistics.fmean(v) for key, v in finals.items()}
    variances = [statistics.variance(v) for v in finals.values() if len(v) > 1]
    noise = math.sqrt(statistics.fmean(variances)) if variances else float("nan")
    return truth, noise, sum(t["last_time_total_s"] or 0.0 for t in trials if is_first_copy(t))


def is_first_copy(trial: dict[str, Any]) -> bool:
    """The ground truth's copy 0 of a config: the run a search trial of it repeats."""
    return json.loads(trial["config_json"]).get("__trial_index__", 0) == 0


def regret_of(pick: dict[str, Any], truth: dict, noise: float) -> float:
    key = (pick["arch"], round(pick["lr"], 12))
    gap = truth[key] - min(truth.values())
    return gap / noise if noise > 0 else (0.0 if gap == 0 else float("inf"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a 2-config micro space, under a minute")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--out", help="keep the sweeps here (default: a temporary folder); a finished "
                                      "sweep found there is reused as it is")
    parser.add_argument("--search-seeds", type=int, default=1,
                        help="run the search with sweep.seed 0..N-1 against the one ground truth")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the search (not the ground truth); repeatable")
    args = parser.parse_args()
    mode = SMOKE if args.smoke else FULL
    configs = configs_in(mode)
    load_start = print_load("start")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        grid, _ = sweep(out, "truth", mode, *TRUTH)
        searches = [sweep(out, "search" if seed == 0 else f"search-seed{seed}", mode,
                          *search_overrides(mode, seed, args.set))
                    for seed in range(args.search_seeds)]
    truth, noise, grid_cpu = ground_truth(grid)
    best_key = min(truth, key=truth.__getitem__)
    print(f"\n{configs} configs; best {best_key[0]} lr {best_key[1]:.0e} (true val_loss "
          f"{truth[best_key]:.4f}); seed noise (pooled sd of the final val_loss) {noise:.4f}; "
          f"exhaustive grid at one seed: {grid_cpu:.0f} CPU-s\n")
    print(f"{'seed':>4} {'strategy':<26} {'chosen':<16} {'true val_loss':>13} {'regret (noise)':>15} "
          f"{'CPU-s':>7} {'CPU ratio':>9}")
    result: dict[str, Any] = {"bench": "regret", "smoke": args.smoke, "overrides": args.set, "configs": configs,
                              "seed_noise": noise, "grid_cpu_s": grid_cpu, "load_start": load_start}
    for seed, (searched, best) in enumerate(searches):
        for key, label, pick, cpu in strategies(searched, best):
            regret = regret_of(pick, truth, noise)
            chosen = f"{pick['arch']} lr {pick['lr']:.0e}"
            print(f"{seed:>4} {label:<26} {chosen:<16} {truth[(pick['arch'], round(pick['lr'], 12))]:>13.4f} "
                  f"{regret:>15.2f} {cpu:>7.0f} {cpu / grid_cpu:>9.2f}")
            if seed == 0:
                result.update({f"{key}_choice": chosen, f"{key}_regret": regret, f"{key}_cpu_ratio": cpu / grid_cpu})
            result.setdefault(f"{key}_regret_by_seed", []).append(regret)
            result.setdefault(f"{key}_cpu_ratio_by_seed", []).append(cpu / grid_cpu)
    for key in ("search", "confirmed"):
        within = sum(r < 1 for r in result[f"{key}_regret_by_seed"])
        result[f"{key}_within_noise"] = within
        print(f"{key}: within the seed noise in {within} of {len(searches)} search seeds")
    result["load_end"] = print_load("end")
    if args.json:
        print_json(result)


def strategies(searched: list[dict], best: dict[str, Any]) -> list[tuple[str, str, dict, float]]:
    """(JSON key, label, chosen config, CPU-s) of the search alone and with its confirmation;
    the search-only cost counts the search trials alone."""
    search_cpu = sum(t["last_time_total_s"] or 0.0 for t in searched if not _confirm(t))
    all_cpu = sum(t["last_time_total_s"] or 0.0 for t in searched)
    return [("search", "search only (best trial)", best["search_best"], search_cpu),
            ("confirmed", "with confirmation", {"arch": best["arch"], "lr": best["lr"]}, all_cpu)]


def _confirm(trial: dict[str, Any]) -> bool:
    return json.loads(trial["config_json"]).get("stage") == "confirm"


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()

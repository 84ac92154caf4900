"""Benchmark: does the default search find the right answer, and at what cost?

On a small finite space (widths x head counts x learning rates, `sweep.space.lr_values`)
sweeps run through `jobs/sweep.py`, the real job:

- ground truth: every config at the full budget, FIFO, at 2 seeds: the exhaustive grid
  once per train.seed, each its own sweep ("truth", then "truth-seed1" at train.seed + 1,
  as sweep.repeats' copy 1). So "truth" is exactly the one-seed grid a user would run.
  (As one sweep with sweep.repeats=2, Tune ran each config's two copies side by side.)
  A config's true score is the mean of its seeds' final val_loss; the seed noise is the
  pooled within-config standard deviation of the final val_loss.
- the default search: Optuna and the config's scheduler (conf/sweep.yaml: promotion-based
  ASHA) with half as many trials as the space has configs,
  then the confirmation stage. The search's own pick ("search only": its best trial)
  and the confirmed winner ("with confirmation") come from the same run: best.json holds
  both, and the search-only cost counts the search trials alone.

    regret        = true score of the chosen config - true score of the best config, in
                    units of the seed noise (0: the best config; < 1: within the noise)
    CPU ratio     = trial slot time of the strategy / slot time of the one-seed grid; a
                    trial holds one CPU, so slot time is CPU time reserved (Tune's
                    time_total_s summed)
    machine ratio = the same with the whole machine charged: 2 slots x the wall time from
                    the first trial's start to the last one's end, for both. A slot the
                    search leaves idle counts, and so does the speed a trial gains from it.

Target (issue 11): regret within the seed noise at no more than 1/3 of the grid's CPU time.

Every sweep is jobs/sweep.py attached to one local cluster of 2 CPUs that the bench starts
(bench_cluster.py), so Ray starts once, not once per sweep; the trials' times begin after it.

    python bench/regret.py                # ~15 minutes on 2 cores, +4-5 per search seed (BENCHMARKS.md section 9)
    python bench/regret.py --out DIR --search-seeds 4   # the ground truth in DIR reused
    python bench/regret.py --out DIR2 --set sweep.rung_min_peers=2   # DIR2/truth*: links to DIR's
    python bench/regret.py --smoke --json # a 2-config micro space: 3 sweeps, 4 rounds of trials, ~1 min

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

from bench_cluster import local_cluster
from bench_output import print_json, print_load

REPO = Path(__file__).resolve().parent.parent

# conf/sweep.yaml's model and data (2,000 pairs): the budget a default sweep's trials get.
FULL: dict[str, Any] = {"config": "conf/sweep.yaml", "base": [], "widths": [128, 192], "heads": [2, 4, 8],
                        "lrs": [3e-4, 1e-3, 3e-3], "top_k": 2, "seeds": 2}
# The smoke renders its live page at conf/sweep.yaml's pace (10 s), not smoke.yaml's 2 s.
SMOKE: dict[str, Any] = {"config": "conf/smoke.yaml", "base": ["data.generated_per_module=20", "train.epochs=1", "report.every_s=10"],
                         "widths": [32], "heads": [2, 4], "lrs": [3e-3], "top_k": 2, "seeds": 1}
# Both sweeps run 2 trials at once on 2 CPUs (bench/regret_replay.py replays that).
CONCURRENT = 2
TRUTH = ["sweep.search=grid", "sweep.num_samples=null", "sweep.scheduler=fifo", "sweep.confirm.top_k=0"]
TRUTH_SEEDS = 2


def configs_in(mode: dict[str, Any]) -> int:
    return len(mode["widths"]) * len(mode["heads"]) * len(mode["lrs"])   # all divide here


def space_overrides(mode: dict[str, Any]) -> list[str]:
    return [*mode["base"], f"sweep.space.d_model=[{','.join(map(str, mode['widths']))}]",
            f"sweep.space.num_heads=[{','.join(map(str, mode['heads']))}]",
            f"sweep.space.lr_values=[{','.join(map(str, mode['lrs']))}]"]


def search_overrides(mode: dict[str, Any], seed: int, extra: list[str]) -> list[str]:
    """The default search with half as many trials as the space has configs, then its
    confirmation; `extra` (--set) last."""
    return ["sweep.search=optuna", f"sweep.num_samples={max(1, configs_in(mode) // 2)}",
            f"sweep.confirm.top_k={mode['top_k']}", f"sweep.confirm.seeds={mode['seeds']}",
            f"sweep.seed={seed}", *extra]


def sweep(address: str, out: Path, name: str, mode: dict[str, Any], *overrides: str) -> tuple[list[dict], dict]:
    """jobs/sweep.py as a user runs it, attached to the bench's cluster at `address`."""
    args = [sys.executable, str(REPO / "jobs" / "sweep.py"), "--config", mode["config"], *space_overrides(mode),
            f"output_dir={out}", f"sweep.name={name}", f"cluster.address={address}",
            f"sweep.max_concurrent_trials={CONCURRENT}", *overrides]
    start = time.monotonic()
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{name} sweep failed ({done.returncode}): {done.stderr[-2000:]}")
    print(f"{name}: {time.monotonic() - start:.0f} s wall", flush=True)
    return read_trials(out / name), json.loads((out / name / "best.json").read_text())


def read_trials(exp: Path) -> list[dict]:
    return pq.read_table(open(exp / "report" / "trials.parquet", "rb")).to_pylist()


def truth_name(copy: int) -> str:
    return "truth" if copy == 0 else f"truth-seed{copy}"


def run_truth(address: str, out: Path, mode: dict[str, Any]) -> list[list[dict]]:
    """The exhaustive grid at train.seed + c for each copy c, one sweep each."""
    from hlbd_ray.config import load_config

    seed = load_config(REPO / mode["config"], mode["base"]).train.seed
    copies = [sweep(address, out, truth_name(c), mode, *TRUTH, f"train.seed={seed + c}")[0] for c in range(TRUTH_SEEDS)]
    return one_seed_each(out, copies)


def read_truth(out: Path) -> list[list[dict]]:
    """run_truth's sweeps as they are in `out`."""
    missing = [truth_name(c) for c in range(TRUTH_SEEDS) if not (out / truth_name(c) / "report").is_dir()]
    if missing:
        raise SystemExit(f"{out}: no ground truth sweep {', '.join(missing)}; run bench/regret.py --out {out}")
    return one_seed_each(out, [read_trials(out / truth_name(c)) for c in range(TRUTH_SEEDS)])


def one_seed_each(out: Path, copies: list[list[dict]]) -> list[list[dict]]:
    """Refuses a ground truth that ran both seeds in one sweep (bench/regret.py before
    these were separate sweeps): its grid is not the one-seed grid the ratios divide by."""
    if not all(is_first_copy(t) for trials in copies for t in trials):
        raise SystemExit(f"{out / truth_name(0)} ran several copies per config in one sweep (sweep.repeats); "
                         "run the ground truth again in a new --out")
    return copies


def arch(trial: dict[str, Any]) -> str:
    return f"{trial['d_model']}x{trial['num_heads']}"


def ground_truth(copies: list[list[dict]]) -> tuple[dict[tuple[str, float], float], float, float]:
    """True score per config, the pooled seed noise, and the one-seed grid's slot time;
    copies[c] is the grid at train.seed + c."""
    finals: dict[tuple[str, float], list[float]] = defaultdict(list)
    for t in (t for trials in copies for t in trials):
        if t["last_val_loss"] is not None:
            finals[(arch(t), round(t["lr"], 12))].append(t["last_val_loss"])
    truth = {key: statistics.fmean(v) for key, v in finals.items()}
    variances = [statistics.variance(v) for v in finals.values() if len(v) > 1]
    noise = math.sqrt(statistics.fmean(variances)) if variances else float("nan")
    return truth, noise, sum(t["last_time_total_s"] or 0.0 for t in copies[0])


def trial_spans(exp: Path) -> dict[str, tuple[float, float]]:
    """(start, end) wall time of each trial under `exp`, from its Tune result.json. A
    result's timestamp is in whole seconds and its time_total_s is not, so a trial's start
    is the median of timestamp - time_total_s over its results, plus half a second."""
    spans = {}
    for path in exp.rglob("result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            start = statistics.median(r["timestamp"] - r["time_total_s"] for r in rows) + 0.5
            spans[rows[0]["trial_id"]] = (start, start + rows[-1]["time_total_s"])
    return spans


def machine_s(spans: dict[str, tuple[float, float]], trial_ids: set[str]) -> float:
    """CONCURRENT slots x the wall time from the first of these trials' start to the last
    one's end (`spans` from trial_spans)."""
    found = [spans[i] for i in trial_ids if i in spans]
    if len(found) != len(trial_ids):
        raise SystemExit(f"Tune's result.json found for {len(found)} of {len(trial_ids)} trials "
                         f"(missing: {', '.join(sorted(trial_ids - spans.keys()))})")
    return CONCURRENT * (max(end for _, end in found) - min(start for start, _ in found))


def is_first_copy(trial: dict[str, Any]) -> bool:
    """The ground truth's copy 0 of a config: the run a search trial of it repeats."""
    return json.loads(trial["config_json"]).get("__trial_index__", 0) == 0


def regret_of(pick: dict[str, Any], truth: dict, noise: float) -> float:
    key = (pick["arch"], round(pick["lr"], 12))
    gap = truth[key] - min(truth.values())
    return gap / noise if noise > 0 else (0.0 if gap == 0 else float("inf"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a 2-config micro space")
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
    # One cluster of CONCURRENT CPUs for every sweep: Ray starts once, not once per sweep.
    with tempfile.TemporaryDirectory() as tmp, local_cluster(CONCURRENT) as cluster:
        out, address = Path(args.out or tmp), cluster.address
        copies = run_truth(address, out, mode)
        grid_machine = machine_s(trial_spans(out / truth_name(0)), {t["trial_id"] for t in copies[0]})
        searches = []
        for seed in range(args.search_seeds):
            name = "search" if seed == 0 else f"search-seed{seed}"
            searched, best = sweep(address, out, name, mode, *search_overrides(mode, seed, args.set))
            searches.append(strategies(out / name, searched, best))
    truth, noise, grid_cpu = ground_truth(copies)
    best_key = min(truth, key=truth.__getitem__)
    print(f"\n{configs} configs; best {best_key[0]} lr {best_key[1]:.0e} (true val_loss "
          f"{truth[best_key]:.4f}); seed noise (pooled sd of the final val_loss) {noise:.4f}; "
          f"exhaustive grid at one seed: {grid_cpu:.0f} CPU-s, {grid_machine:.0f} machine-s\n")
    print(f"{'seed':>4} {'strategy':<26} {'chosen':<16} {'true val_loss':>13} {'regret (noise)':>15} "
          f"{'CPU-s':>7} {'CPU ratio':>9} {'machine ratio':>13}")
    result: dict[str, Any] = {"bench": "regret", "smoke": args.smoke, "overrides": args.set, "configs": configs,
                              "seed_noise": noise, "grid_cpu_s": grid_cpu, "grid_machine_s": grid_machine,
                              "load_start": load_start}
    for seed, rows in enumerate(searches):
        for key, label, pick, cpu, machine in rows:
            regret = regret_of(pick, truth, noise)
            chosen = f"{pick['arch']} lr {pick['lr']:.0e}"
            print(f"{seed:>4} {label:<26} {chosen:<16} {truth[(pick['arch'], round(pick['lr'], 12))]:>13.4f} "
                  f"{regret:>15.2f} {cpu:>7.0f} {cpu / grid_cpu:>9.2f} {machine / grid_machine:>13.2f}")
            if seed == 0:
                result.update({f"{key}_choice": chosen, f"{key}_regret": regret, f"{key}_cpu_ratio": cpu / grid_cpu})
            result.setdefault(f"{key}_regret_by_seed", []).append(regret)
            result.setdefault(f"{key}_cpu_ratio_by_seed", []).append(cpu / grid_cpu)
            result.setdefault(f"{key}_machine_ratio_by_seed", []).append(machine / grid_machine)
    for key in ("search", "confirmed"):
        within = sum(r < 1 for r in result[f"{key}_regret_by_seed"])
        result[f"{key}_within_noise"] = within
        print(f"{key}: within the seed noise in {within} of {len(searches)} search seeds")
    result["load_end"] = print_load("end")
    if args.json:
        print_json(result)


def strategies(exp: Path, searched: list[dict], best: dict[str, Any]) -> list[tuple[str, str, dict, float, float]]:
    """(JSON key, label, chosen config, CPU-s, machine-s) of the search alone and with its
    confirmation; the search-only cost counts the search trials alone."""
    search = [t for t in searched if not _confirm(t)]
    search_cpu = sum(t["last_time_total_s"] or 0.0 for t in search)
    all_cpu = sum(t["last_time_total_s"] or 0.0 for t in searched)
    spans = trial_spans(exp)
    return [("search", "search only (best trial)", best["search_best"], search_cpu,
             machine_s(spans, {t["trial_id"] for t in search})),
            ("confirmed", "with confirmation", {"arch": best["arch"], "lr": best["lr"]}, all_cpu,
             machine_s(spans, {t["trial_id"] for t in searched}))]


def _confirm(trial: dict[str, Any]) -> bool:
    return json.loads(trial["config_json"]).get("stage") == "confirm"


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()

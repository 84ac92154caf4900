#!/usr/bin/env python
"""Many short trials: does the sweep finish, do the reports hold every trial, and does the
driver's memory stay bounded as the trial count grows?

Each sweep runs in its own process (a fresh local Ray) that samples its own resident
memory (VmRSS) every 0.2 s; the driver's peak is compared across trial counts, side by
side in one run. Usage: python bench/load.py [--trials 8 32] [--smoke] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_output import print_json, print_load

REPO = Path(__file__).resolve().parents[1]
MICRO = ["--config", str(REPO / "conf/smoke.yaml"), "train.epochs=2", "sweep.scheduler=fifo",
         "report.every_s=1", "cluster.num_cpus=2", "sweep.max_concurrent_trials=2"]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(trials: int, out: str) -> None:
    """Run one sweep in this process and print its driver-memory profile as JSON."""
    from hlbd_ray.cli import parse_job_args
    from hlbd_ray.sweep import run_sweep_job

    samples, stop = [], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(rss_mb())
            time.sleep(0.2)

    cfg = parse_job_args([*MICRO[2:], f"sweep.num_samples={trials}", f"output_dir={out}"],
                         "smoke.yaml", "")
    thread = threading.Thread(target=sample, daemon=True)
    start = time.monotonic()
    thread.start()
    code = run_sweep_job(cfg)
    stop.set()
    thread.join()
    import pyarrow.parquet as pq

    rows = pq.read_table(Path(out) / "smoke/report/trials.parquet").num_rows
    print(json.dumps({"trials": trials, "exit": code, "report_rows": rows,
                      "wall_s": time.monotonic() - start, "peak_rss_mb": max(samples),
                      "final_rss_mb": samples[-1]}))


def run(trials: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="hlbd-load-") as out:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        proc = subprocess.run([sys.executable, __file__, "--child", str(trials), out], env=env,
                              capture_output=True, text=True, cwd=REPO, timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"sweep with {trials} trials failed:\n{proc.stderr[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--smoke", action="store_true", help="2 and 4 trials")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1])
        return
    counts = [2, 4] if args.smoke else args.trials
    print_load("start")
    results = [run(n) for n in counts]
    print(f"{'trials':>7} {'exit':>5} {'rows':>5} {'wall_s':>8} {'peak_rss_mb':>12} {'final_rss_mb':>13}")
    for r in results:
        print(f"{r['trials']:>7} {r['exit']:>5} {r['report_rows']:>5} {r['wall_s']:>8.1f} "
              f"{r['peak_rss_mb']:>12.0f} {r['final_rss_mb']:>13.0f}")
    small, large = results[0], results[-1]
    growth = (large["peak_rss_mb"] - small["peak_rss_mb"]) / max(large["trials"] - small["trials"], 1)
    print(f"driver peak memory growth per extra trial: {growth:.2f} MB "
          f"({large['peak_rss_mb'] / small['peak_rss_mb']:.2f}x for "
          f"{large['trials'] / small['trials']:.0f}x the trials)")
    print_load("end")
    summary = {"trials": counts, "all_rows": all(r["report_rows"] == r["trials"] for r in results),
               "peak_rss_mb": [r["peak_rss_mb"] for r in results],
               "rss_growth_mb_per_trial": growth, "wall_s": [r["wall_s"] for r in results]}
    if args.json:
        print_json(summary)


if __name__ == "__main__":
    main()

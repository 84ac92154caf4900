"""Benchmark: the same sweep on one node of 2 CPUs and on two nodes of 1 CPU each.

The check of the scaling model in BENCHMARKS.md section 12 ("Scaling past one machine"):
the model has no term for how the CPUs are split into machines, so the same total CPUs
should give the same wall time and the same best val_loss. Two Ray clusters on this host
(`ray.cluster_utils.Cluster`, as tests/test_multinode.py starts them), each a head with
no CPUs for trials plus worker nodes, raylets of their own:

- 1 node x 2 CPUs: one worker node with both CPUs;
- 2 nodes x 1 CPU: two worker nodes, so every trial runs on a node of its own.

On each, `jobs/sweep.py` attaches with `cluster.address` and runs the same sweep as
`bench/time_to_quality.py --smoke` (the same seed, space and trials; confirmation off).
Wall time is the job's, from start to exit, the cluster already up; the best val_loss and
its curve come from Tune's result.json, read as time_to_quality.py reads them. Both nodes
share this host's 2 cores, so this checks Ray's placement and per-node costs, not a
network: on real machines each node would bring its own cores.

    python bench/two_nodes.py --json            # ~2-3 minutes on 2 cores
    python bench/two_nodes.py --write           # ... and write its part of BENCHMARKS.md section 12
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import time_to_quality as ttq  # noqa: E402

from bench_cluster import local_cluster  # noqa: E402
from bench_output import print_json, print_load  # noqa: E402

LAYOUTS = {"1x2": [2], "2x1": [1, 1]}   # CPUs of each worker node


def run_layout(nodes: list[int], job: list[str], out: Path) -> dict[str, Any]:
    with local_cluster(0, nodes) as cluster:
        run = ttq.run_ours(job, out, [f"cluster.address={cluster.address}"])
    return {**ttq.summarize(run), "nodes": nodes}


def markdown(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    a, b = results["1x2"], results["2x1"]
    rows = [("wall time, job start to exit (s)", "wall_s", ".1f"), ("best val_loss", "best_val_loss", ".4f"),
            ("best val_exact", "best_val_exact", ".3f"), ("step_share", "step_share", ".3f")]
    lines = [
        "### Simulated two-node check — `bench/two_nodes.py`", "",
        f"One run, {meta['date']} UTC, {meta['cpu']}; 1-minute load {meta['load_start']:.2f} at the start, "
        f"{meta['load_end']:.2f} at the end. The smoke sweep of `bench/time_to_quality.py` ({a['trials']} "
        "trials, Optuna + ASHA, micro model) attached to a Ray cluster on this host: a head with 0 CPUs "
        "plus one worker node of 2 CPUs, or two worker nodes of 1 CPU (the same total). The model above "
        "predicts the same wall time and the same answer for both.", "",
        "| | 1 node x 2 CPUs | 2 nodes x 1 CPU |", "|---|---:|---:|",
        *[f"| {label} | {format(a[k], fmt)} | {format(b[k], fmt)} |" for label, k, fmt in rows],
        f"| epochs per trial | {' '.join(map(str, a['epochs_per_trial']))} | "
        f"{' '.join(map(str, b['epochs_per_trial']))} |",
        f"| configs (same both) | {len(a['configs'])} | {sorted(a['configs']) == sorted(b['configs'])} |", "",
        f"Wall time ratio (2 nodes / 1 node): {b['wall_s'] / a['wall_s']:.2f}; best val_loss difference "
        f"{abs(a['best_val_loss'] - b['best_val_loss']):.2g}. Both nodes share the same 2 cores here; what "
        "the split adds is a second raylet and its per-node processes.", ""]
    return "\n".join(lines)


def write_part(text: str, path: Path = ttq.REPO / "BENCHMARKS.md") -> None:
    old = path.read_text()
    block = f"{ttq.NODES_START}\n{text}\n{ttq.NODES_END}"
    if ttq.NODES_START in old:
        head, rest = old.split(ttq.NODES_START, 1)
        new = head + block + rest.split(ttq.NODES_END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    ttq.atomic_write(path, new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--write", action="store_true", help="write its part of BENCHMARKS.md section 12")
    args = parser.parse_args()
    load_start = print_load("start")
    date = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-nodes-") as tmp:
        for name, nodes in LAYOUTS.items():
            results[name] = run_layout(nodes, ttq.SMOKE_JOB, Path(tmp) / name)
            print(f"{name}: {results[name]['wall_s']:.1f} s, best val_loss {results[name]['best_val_loss']:.4f}",
                  flush=True)
    print(f"\n{'':24}{'1 node x 2 CPUs':>17}{'2 nodes x 1 CPU':>17}")
    for label, key in (("wall (s)", "wall_s"), ("best val_loss", "best_val_loss"), ("best val_exact", "best_val_exact"),
                       ("step_share", "step_share")):
        print(f"{label:24}{results['1x2'][key]:>17.4g}{results['2x1'][key]:>17.4g}")
    load_end = print_load("end")
    if args.write:
        meta = {"date": date, "cpu": ttq.cpu_model(), "load_start": load_start, "load_end": load_end}
        write_part(markdown(results, meta))
        print("wrote the two-node part of BENCHMARKS.md section 12")
    if args.json:
        a, b = results["1x2"], results["2x1"]
        print_json({"bench": "two_nodes", "wall_ratio_2x1_over_1x2": b["wall_s"] / a["wall_s"],
                    "best_val_loss_diff": abs(a["best_val_loss"] - b["best_val_loss"]),
                    "same_configs": sorted(a["configs"]) == sorted(b["configs"]),
                    "loadavg_start": load_start, "loadavg_end": load_end, **results})


if __name__ == "__main__":
    main()

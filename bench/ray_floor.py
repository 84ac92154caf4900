"""Benchmark: what one trial costs in Ray itself, with nothing to train (issue 14).

Each variant runs N trials whose body does no work (it reports once and returns), 2 at
a time, on a fresh local Ray cluster of 2 CPUs started the way the sweep starts one
(the same env vars), each variant in a child process of its own:

    tune_function    a plain Tune function trial that reports once: the least a Tune
                     trial can be (no Ray Train)
    train_in_tune    stock Ray 2.60: the trial runs a TorchTrainer with one worker whose
                     loop reports once, relayed to Tune by TuneReportCallback (the pattern
                     Ray documents for Train inside Tune, and the one the sweep uses)
    lean             the same through the sweep's own trainer class with
                     `sweep.lean_train_actors`: no DatasetManager and no
                     PlacementGroupCleaner actor per run
    lean_in_process  lean, and Train's controller in the trial's own process
                     (`sweep.controller_in_trial`; both switches on: the sweep's default)

Per variant: a trial's launch (Tune starts it -> the first line of its body, median),
its life (start -> end, median), the CPU seconds of the whole process tree per trial
(the driver's Tune loop, the cluster's daemons, every Ray process), the new processes
per trial, and the trials per minute on the 2 CPUs. None of it is training: this is
the floor under issue 14's targets (launch <= 3 s, CPU outside steps <= 5 s per trial).
Every Train variant ends as the sweep's trials do, waiting until Tune has taken Train's
last report (hlbd_ray.trial.relay_drained, up to 0.5 s of a trial's life).

    python bench/ray_floor.py [--trials 8] [--json]
    python bench/ray_floor.py --smoke --json   # 2 trials of the two stock variants
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_output import print_json, print_load

VARIANTS = ("tune_function", "train_in_tune", "lean", "lean_in_process")
TRAINER = {"train_in_tune": None, "lean": (False, True), "lean_in_process": (True, True)}
CHILD_TIMEOUT_S = 600


def report_body_start(config: dict[str, Any]) -> None:
    """The body of every trial: say when it started, then return."""
    import ray.train

    ray.train.report({"t_body": time.time()})


def tune_body(config: dict[str, Any]) -> None:
    from ray import tune

    tune.report({"t_body": time.time()})


def train_trial(config: dict[str, Any], variant: str, storage: str, worker_cpu: float) -> None:
    """A Tune trial that drives one Ray Train run of `report_body_start`."""
    from ray import tune
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from hlbd_ray.trainer import trainer_class
    from hlbd_ray.trial import relay_drained, tune_stop_event

    switches = TRAINER[variant]
    relay, stop = TuneReportCallback(), tune_stop_event()
    callbacks: list[Any] = [relay]   # a Train callback (mypy sees Train V1's RunConfig)
    cls = TorchTrainer if switches is None else trainer_class(*switches)
    trainer = cls(report_body_start,
                  scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": worker_cpu}),
                  run_config=RunConfig(name=tune.get_context().get_trial_id(), storage_path=storage,
                                       failure_config=FailureConfig(max_failures=0), callbacks=callbacks))
    trainer.fit()
    # Without this wait Ray 2.60 can deadlock here (a trial of this bench's lean_in_process
    # variant did: Tune's thread stuck in Queue.put); see hlbd_ray.trial.relay_drained.
    relay_drained(relay._training_actor_item_queue, stop)


def run_variant(variant: str, trials: int, out: Path) -> dict[str, Any]:
    """One variant on its own fresh local cluster (in this process: run as a child)."""
    import ray
    from ray import tune
    from sweep import TreeCPU

    from hlbd_ray.cluster import ray_env_vars
    from hlbd_ray.config import ClusterConfig
    from hlbd_ray.console import TUNE_CONSOLE_ENV
    from hlbd_ray.sweep import DRIVER_CPU

    env = {**ray_env_vars(ClusterConfig()), **TUNE_CONSOLE_ENV}
    os.environ.update(env)
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env},
             log_to_driver=False)
    starts: dict[str, float] = {}
    ends: dict[str, float] = {}
    bodies: dict[str, float] = {}
    cpu = TreeCPU()

    class Stamps(tune.Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            starts[trial.trial_id] = time.time()

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            bodies.setdefault(trial.trial_id, result["t_body"])

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            ends[trial.trial_id] = time.time()

        on_trial_error = on_trial_complete

    body = tune_body if variant == "tune_function" else tune.with_parameters(
        train_trial, variant=variant, storage=str(out / "train"), worker_cpu=1 - DRIVER_CPU)   # a sweep's split
    tuner = tune.Tuner(tune.with_resources(body, {"cpu": DRIVER_CPU}),
                       tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=2),
                       run_config=tune.RunConfig(name=variant, storage_path=str(out), verbose=0, callbacks=[Stamps()]))
    cpu.start()
    t0 = time.time()
    results = tuner.fit()
    wall = time.time() - t0
    cpu.stop()
    ray.shutdown()
    started = [key for key in cpu.last if key not in cpu.first]
    by_kind = cpu.by_kind()
    return {"variant": variant, "trials": trials, "errors": results.num_errors, "wall_s": wall,
            "launch_s": [bodies[t] - starts[t] for t in starts if t in bodies],
            "life_s": [ends[t] - starts[t] for t in starts if t in ends],
            "cpu_s_per_trial": sum(by_kind.values()) / trials, "cpu_by_kind": by_kind,
            "processes_per_trial": len(started) / trials}


def child(variant: str, trials: int) -> dict[str, Any]:
    """Run one variant in a fresh interpreter, bounded; its last line is its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, __file__, "--child", variant, "--trials", str(trials), "--out", tmp]
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"{variant}: no result within {CHILD_TIMEOUT_S} s") from None
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(r: dict[str, Any]) -> dict[str, Any]:
    return {"variant": r["variant"], "trials": r["trials"], "errors": r["errors"],
            "launch_s": statistics.median(r["launch_s"]), "life_s": statistics.median(r["life_s"]),
            "cpu_s_per_trial": r["cpu_s_per_trial"], "processes_per_trial": r["processes_per_trial"],
            "trials_per_min": 60 * r["trials"] / r["wall_s"], "wall_s": r["wall_s"],
            "cpu_by_kind": {k: round(v, 2) for k, v in sorted(r["cpu_by_kind"].items(), key=lambda kv: -kv[1])}}


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'variant':<16} {'trials':>6} {'errors':>6} {'launch s':>9} {'life s':>7} {'CPU s/trial':>11} "
          f"{'procs/trial':>11} {'trials/min':>10}")
    for r in rows:
        print(f"{r['variant']:<16} {r['trials']:>6} {r['errors']:>6} {r['launch_s']:>9.2f} {r['life_s']:>7.2f} "
              f"{r['cpu_s_per_trial']:>11.2f} {r['processes_per_trial']:>11.2f} {r['trials_per_min']:>10.1f}")
    for r in rows:
        top = ", ".join(f"{k} {v:.1f}" for k, v in list(r["cpu_by_kind"].items())[:6])
        print(f"  {r['variant']}: CPU s by process: {top}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8, help="trials per variant (2 at a time)")
    parser.add_argument("--smoke", action="store_true", help="2 trials of the two stock variants")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args.trials, Path(args.out))))
        return
    if args.trials < 2:
        parser.error("--trials must be at least 2 (two run at a time)")
    variants, trials = (VARIANTS[:2], 2) if args.smoke else (VARIANTS, args.trials)
    load_start = print_load("start")
    rows = [summarise(child(v, trials)) for v in variants]
    print_table(rows)
    result = {"bench": "ray_floor", "smoke": args.smoke, "load_start": load_start,
              "variants": {r["variant"]: r for r in rows}, "load_end": print_load("end")}
    if args.json:
        print_json(result)


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()

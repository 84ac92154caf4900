"""Benchmark: time to a good answer, our Ray sweep against an in-process Optuna study.

Both sides get the same config, search space, seed and number of trials, and each runs in
a subprocess of its own, so each pays its own start-up and imports, as a user would:

- ours: `python jobs/sweep.py --config <conf> sweep.confirm.top_k=0 output_dir=<tmp> ...`,
  the real job, on the fresh local Ray cluster it starts itself. The confirmation stage is
  off so that both sides run exactly the search's trials.
- peer (the yardstick; it lives here only): one Optuna study in one process,
  `TPESampler(seed=sweep.seed, n_startup_trials=sweep.startup_trials)` and
  `SuccessiveHalvingPruner(min_resource=grace_period, reduction_factor=...)` with the epoch
  as the step, over the same categorical of valid "DxH" pairs and the same lr distribution
  as `hlbd_ray.search.param_space` (tests/test_bench.py checks the two agree), one trial
  at a time with all cores (`train.cpus_per_worker` = the core count, which `TrainRun`
  hands to `torch.set_num_threads`). It drives the same `TrainRun` on the same prepared data
  (`hlbd_ray.trainer.preflight`) through an in-process session (`LocalSession`, which also
  copies every epoch's checkpoint, as Ray Train persists them), and reports each epoch's
  val_loss to the Optuna trial; the trial stops when the pruner says so (never at the
  last epoch, as ASHA's rungs stop below max_t).

For their first `sweep.startup_trials` trials (random draws; Optuna's default is 10) both
samplers draw the same configs in the same order (checked and printed); after that, each
TPE models its own results, so the configs can part (`conf/sweep.yaml` starts TPE at the
4th trial).

Measured, per side:
- wall: from starting the subprocess until it exits (interpreter, imports, Ray's start).
- best-so-far curve: every epoch-end val_loss, against seconds since the subprocess
  started. Ours from each trial's Tune `result.json` lines: Tune stamps `timestamp` in
  whole seconds, so each trial's start is solved from all its lines' (timestamp,
  time_total_s) pairs (the intersection of [ts - total, ts + 1 - total)) and a result's
  time is start + time_total_s. The peer stamps its reports with the wall clock.
- time to quality: when the curve first reaches the peer's final best val_loss (within
  0.1%: one config's loss at 1 and at 2 threads differs in the last digits); a side
  that never does shows when it reached its own best (the closest it got), flagged.
  `ttq_ratio` = peer's time to its final best / ours to the same loss (> 1: we are
  faster; 0 when ours never got there). `ttq_ratio_common` does the same at the worse of
  the two final bests, a loss both sides reach.
- CPU: the process tree's CPU seconds (psutil: the subprocess and all its descendants,
  raylet, GCS and workers included, sampled every 0.5 s, the largest user+system seen
  per process, summed; a process that dies between samples loses its last < 0.5 s).
  The kernel's count of reaped descendants (RUSAGE_CHILDREN) is shown beside it.
- training-step time, estimated from the reports: (fw_ms + bw_ms) x micro-batches of
  each report window (the optimizer step is not in it). Step CPU = that x threads per
  trial (1 in our trials, the core count in the peer's).
      overhead_cpu_s_per_trial = (tree CPU - step CPU) / trials
      step_share               = step time / (wall x concurrent trial slots)
  Validation, checkpoints and the optimizer count as overhead on both sides, so the
  difference between the two sides' figures is what the sweep machinery costs. The tree's
  CPU is also split by process role (Ray names a worker process `ray::<actor class>`).
- launch: a trial's start to its first training step, i.e. its first report's time less
  that window's fw+bw time (its optimizer steps and batching stay in).
- scaling: the model of BENCHMARKS.md section 12 ("Scaling past one machine"), fed with
  this run's start-up, trial lives and slot efficiency (`scaling_model`).

    python bench/time_to_quality.py                   # conf/sweep.yaml: ~4 minutes on 2 cores
    python bench/time_to_quality.py --write --out DIR # ... and write BENCHMARKS.md section 12 (DIR/raw.json kept)
    python bench/time_to_quality.py --again DIR/raw.json --write   # the report again, nothing run
    python bench/time_to_quality.py --smoke --json    # micro model, 4 tiny trials, about a minute
    python bench/time_to_quality.py --set sweep.reduction_factor=3   # an override on both sides
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SMOKE_JOB = ["--config", "conf/smoke.yaml", "sweep.search=optuna", "sweep.num_samples=4", "train.epochs=2",
             "data.generated_per_module=40"]
FULL_JOB = ["--config", "conf/sweep.yaml"]
COMMON = ["sweep.confirm.top_k=0", "sweep.name=ttq"]
SAMPLE_S = 0.5
# "The same loss": 1 and 2 threads sum in different orders, so the same config ends a few
# units in the 8th digit (fp32) or more (bf16) apart; 0.1% is far below the seed noise
# (BENCHMARKS.md section 11: a standard error of 0.3% of the winner's val_loss).
SAME_LOSS_REL = 1e-3
MARK_START, MARK_END = "<!-- ttq:start -->", "<!-- ttq:end -->"
NODES_START, NODES_END = "<!-- ttq-nodes:start -->", "<!-- ttq-nodes:end -->"


# --- the peer: one Optuna study in this process (run as `--peer OUT job-args...`) -----------


def peer_space(sweep: Any) -> dict[str, Any]:
    """The Optuna distributions Ray's OptunaSearch builds from `hlbd_ray.search.param_space`
    (built here without importing Ray, which the peer must not pay for)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from hlbd_ray.config import space_pairs

    s = sweep.space
    pairs = [f"{d}x{h}" for d, h in space_pairs(s)]
    lr = (CategoricalDistribution([float(v) for v in s.lr_values]) if s.lr_values
          else FloatDistribution(s.lr_min, s.lr_max, log=True))
    return {"arch": CategoricalDistribution(pairs), "lr": lr}


def peer_trial_config(base: Any, params: dict[str, Any], threads: int) -> Any:
    """`hlbd_ray.sweep.trial_config` (first copy) with all cores for the one trial."""
    from dataclasses import replace

    from hlbd_ray.config import check_heads

    d_model, num_heads = (int(x) for x in params["arch"].split("x"))
    check_heads(d_model, num_heads)
    return replace(base, model=replace(base.model, d_model=d_model, num_heads=num_heads),
                   train=replace(base.train, lr=float(params["lr"]), cpus_per_worker=threads))


def run_peer(out: Path, job_argv: list[str]) -> None:
    import optuna
    import torch

    from hlbd_ray.cli import parse_job_args
    from hlbd_ray.config import sampled_configs, validate
    from hlbd_ray.session import LocalSession
    from hlbd_ray.train import TrainRun
    from hlbd_ray.trainer import preflight

    cfg = parse_job_args(job_argv, "sweep.yaml", "peer")
    validate(cfg, sweep=True)
    cfg, data = preflight(cfg, cfg.sweep.name)
    s, threads = cfg.sweep, os.cpu_count() or 1
    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="minimize" if str(s.mode) == "min" else "maximize",
        sampler=optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.startup_trials),
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=s.grace_period, reduction_factor=s.reduction_factor))

    class PrunedSession(LocalSession):
        """Each epoch's metric goes to the Optuna trial; a prune ends the run from here."""

        def __init__(self, trial: Any, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.trial = trial
            self.stamped: list[dict[str, Any]] = []

        def report(self, metrics: dict[str, Any], checkpoint_dir: Any = None) -> None:
            super().report(metrics, checkpoint_dir)
            self.stamped.append({"t": time.time(), **{k: metrics.get(k) for k in REPORT_KEYS}})
            value = metrics.get(s.metric)
            if not metrics["epoch_end"] or value is None:
                return
            self.trial.report(value, metrics["epochs_done"])
            if metrics["epochs_done"] < cfg.train.epochs and self.trial.should_prune():
                raise optuna.TrialPruned()

    space, trials = peer_space(s), []
    for n in range(sampled_configs(s)):
        trial = study.ask(fixed_distributions=space)
        session, started = PrunedSession(trial, out / "trials" / str(n), run_name=f"peer_{n}"), time.time()
        try:
            TrainRun(peer_trial_config(cfg, trial.params, threads), data, session).fit()
            values = [r[s.metric] for r in session.stamped if r["epoch_end"] and r[s.metric] is not None]
            study.tell(trial, values[-1] if values else None,
                       state=None if values else optuna.trial.TrialState.FAIL)
            state = "complete"
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            state = "pruned"
        trials.append({"params": trial.params, "state": state, "start": started, "reports": session.stamped})
    (out / "peer.json").write_text(json.dumps({"threads": threads, "trials": trials}))


REPORT_KEYS = ("epoch_end", "epochs_done", "val_loss", "val_exact", "fw_ms", "bw_ms", "batches", "batch_start")


# --- running a side in a subprocess, its process tree's CPU measured ----------------------


class TreeCPU:
    """The largest user+system CPU seen per process of a tree, by (pid, start time), and
    each process's role (Ray names its worker processes `ray::<actor class>`)."""

    def __init__(self, pid: int):
        import psutil

        self.psutil, self.root = psutil, psutil.Process(pid)
        self.seen: dict[tuple[int, float], float] = {}
        self.roles: dict[tuple[int, float], str] = {}

    def sample(self) -> None:
        ps = self.psutil
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except ps.Error:
            return
        for p in procs:
            try:
                times, key = p.cpu_times(), (p.pid, p.create_time())
                # A Ray worker starts as setup_worker.py, then takes the title ray::IDLE, then
                # its actor's: look again until it names an actor.
                if self.roles.get(key, "ray::IDLE") in ("ray::IDLE", "setup_worker.py", "default_worker.py"):
                    self.roles[key] = role(p.cmdline() or [p.name()])
            except ps.Error:
                continue
            self.seen[key] = max(self.seen.get(key, 0.0), times.user + times.system)

    def total(self) -> float:
        return sum(self.seen.values())

    def by_role(self) -> dict[str, list[float]]:
        """role -> [CPU seconds, processes], largest CPU first."""
        out: dict[str, list[float]] = {}
        for key, cpu in self.seen.items():
            entry = out.setdefault(self.roles.get(key, "?"), [0.0, 0])
            entry[0] += cpu
            entry[1] += 1
        return dict(sorted(out.items(), key=lambda item: -item[1][0]))


def role(cmdline: list[str]) -> str:
    """`ray::TrainController` (method suffix dropped), else the program or Python script."""
    first = cmdline[0]
    if first.startswith("ray::"):
        return first.split()[0].split(".")[0]
    if "python" in Path(first).name and len(cmdline) > 1:
        args = cmdline[1:]
        target = args[args.index("-m") + 1] if "-m" in args[:-1] else next((a for a in args if a.endswith(".py")), args[0])
        return Path(target).name
    return Path(first).name


def run_measured(args: list[str], log: Path) -> dict[str, Any]:
    """Run `args` from the repository root; wall, tree CPU and the output (kept in `log`)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    with open(log, "w") as handle:
        proc = subprocess.Popen(args, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, text=True)
        tree, peak = TreeCPU(proc.pid), 0
        while proc.poll() is None:
            tree.sample()
            peak = max(peak, len(tree.seen))
            time.sleep(SAMPLE_S)
    end = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    output = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"{args[1]} failed ({proc.returncode}); its output: {log}\n{output[-3000:]}")
    reaped = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"start": start, "wall_s": end - start, "tree_cpu_s": tree.total(), "rusage_children_cpu_s": reaped,
            "processes_seen": len(tree.seen), "cpu_by_role": tree.by_role(), "output": output}


def run_ours(job: list[str], out: Path, extra: list[str] | None = None) -> dict[str, Any]:
    args = [sys.executable, "jobs/sweep.py", *job, *COMMON, f"output_dir={out}", *(extra or [])]
    run = run_measured(args, out.parent / f"{out.name}.log")
    slots = re.search(r"up to (\d+) trials at once", run["output"])
    trials = read_tune_trials(out / "ttq", run["start"])
    return {**run, "slots": int(slots.group(1)) if slots else 1, "threads": 1, "trials": trials}


def read_tune_trials(experiment: Path, t0: float) -> list[dict[str, Any]]:
    """Every trial's results from Tune's result.json, times in seconds since `t0`."""
    trials = []
    for path in sorted(experiment.glob("*/result.json")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            continue
        # timestamp = int(time.time()) where time_total_s is taken: start lies in every
        # [ts - total, ts + 1 - total); their intersection pins it well below a second.
        low = max(r["timestamp"] - r["time_total_s"] for r in lines)
        high = min(r["timestamp"] + 1 - r["time_total_s"] for r in lines)
        start = (low + high) / 2 if high > low else low
        reports = [{"t": start + r["time_total_s"] - t0, **{k: r.get(k) for k in REPORT_KEYS}} for r in lines]
        trials.append({"params": {"arch": lines[0]["config"]["arch"], "lr": lines[0]["config"]["lr"]},
                       "start": start - t0, "reports": reports})
    return sorted(trials, key=lambda t: t["start"])


def run_peer_side(job: list[str], out: Path) -> dict[str, Any]:
    out.mkdir(parents=True)
    args = [sys.executable, str(Path(__file__).resolve()), "--peer", str(out), *job, *COMMON, f"output_dir={out}"]
    run = run_measured(args, out.parent / f"{out.name}.log")
    peer = json.loads((out / "peer.json").read_text())
    for trial in peer["trials"]:
        trial["start"] -= run["start"]
        for r in trial["reports"]:
            r["t"] -= run["start"]
    return {**run, "slots": 1, "threads": peer["threads"], "trials": peer["trials"]}


# --- the comparison ----------------------------------------------------------------------


def curve(trials: list[dict[str, Any]]) -> list[tuple[float, float, float | None]]:
    """(seconds, best val_loss so far, its val_exact) at each improvement."""
    points = sorted((r["t"], r["val_loss"], r["val_exact"]) for t in trials for r in t["reports"]
                    if r["epoch_end"] and r["val_loss"] is not None and math.isfinite(r["val_loss"]))
    best: list[tuple[float, float, float | None]] = []
    for t, loss, exact in points:
        if not best or loss < best[-1][1]:
            best.append((t, loss, exact))
    return best


def time_to(best: list[tuple[float, float, Any]], target: float) -> float | None:
    """When the curve first reaches `target`, within SAME_LOSS_REL."""
    return next((t for t, loss, _ in best if loss <= target * (1 + SAME_LOSS_REL)), None)


def at(best: list[tuple[float, float, Any]], t: float) -> float | None:
    reached = [loss for s, loss, _ in best if s <= t]
    return reached[-1] if reached else None


def summarize(side: dict[str, Any]) -> dict[str, Any]:
    trials, best = side["trials"], curve(side["trials"])
    step_s = sum((r["fw_ms"] + r["bw_ms"]) * (r["batches"] - r["batch_start"]) / 1e3
                 for t in trials for r in t["reports"] if r["fw_ms"] is not None)
    exacts = [r["val_exact"] for t in trials for r in t["reports"] if r["epoch_end"] and r["val_exact"] is not None]
    epochs = [max((r["epochs_done"] or 0 for r in t["reports"]), default=0) for t in trials]
    n = max(len(trials), 1)
    launches = sorted(launch_s(t) for t in trials if t["reports"] and "start" in t)
    return {"wall_s": side["wall_s"], "trials": len(trials), "slots": side["slots"], "threads": side["threads"],
            "tree_cpu_s": side["tree_cpu_s"], "rusage_children_cpu_s": side["rusage_children_cpu_s"],
            "processes_seen": side["processes_seen"], "step_s": step_s,
            "overhead_cpu_s_per_trial": (side["tree_cpu_s"] - step_s * side["threads"]) / n,
            "step_share": step_s / (side["wall_s"] * side["slots"]),
            "best_val_loss": best[-1][1] if best else None, "val_exact_at_best": best[-1][2] if best else None,
            "best_val_exact": max(exacts) if exacts else None, "epochs_per_trial": epochs,
            "configs": [f"{t['params']['arch']} lr {t['params']['lr']:.3e}" for t in trials],
            "first_trial_start_s": min((t["start"] for t in trials if "start" in t), default=None),
            "launch_s": launches, "launch_s_median": launches[len(launches) // 2] if launches else None,
            "cpu_by_role": side.get("cpu_by_role", {}),
            "curve": [[round(t, 2), loss, exact] for t, loss, exact in best]}


def launch_s(trial: dict[str, Any]) -> float:
    """Trial start to its first training step: the first report's time, less its window's
    fw+bw time (the window's optimizer steps and batching stay in, a few % of it)."""
    first = min(trial["reports"], key=lambda r: r["t"])
    steps = (first["fw_ms"] or 0.0) + (first["bw_ms"] or 0.0)
    return first["t"] - trial["start"] - steps * (first["batches"] - first["batch_start"]) / 1e3


def compare(ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any]:
    co, cp = [tuple(p) for p in ours["curve"]], [tuple(p) for p in peer["curve"]]
    target = peer["best_val_loss"]
    peer_t, ours_t = time_to(cp, target), time_to(co, target)
    common = max(target, ours["best_val_loss"])
    peer_c, ours_c = time_to(cp, common), time_to(co, common)
    # Each side reaches its own final best, so the peer its target and both the worse best.
    assert peer_t is not None and peer_c is not None and ours_c is not None
    return {"target_val_loss": target, "peer_time_to_target_s": peer_t,
            "ours_reached_target": ours_t is not None,
            # Never reached: the time ours reached its own best, the closest it got.
            "ours_time_to_target_s": ours_t if ours_t is not None else co[-1][0],
            "ttq_ratio": peer_t / ours_t if ours_t else 0.0,
            "common_val_loss": common, "ttq_ratio_common": peer_c / ours_c,
            "peer_time_to_common_s": peer_c, "ours_time_to_common_s": ours_c,
            "wall_ratio": peer["wall_s"] / ours["wall_s"],
            "same_configs": sorted(ours["configs"]) == sorted(peer["configs"]),
            "common_configs": len(set(ours["configs"]) & set(peer["configs"]))}


def print_report(ours: dict[str, Any], peer: dict[str, Any], c: dict[str, Any]) -> None:
    print(f"\n{'':34}{'ours (Ray sweep)':>18}{'peer (Optuna)':>16}")
    rows = [("trials", "trials", "d"), ("concurrent slots x threads", None, ""), ("wall (s)", "wall_s", ".1f"),
            ("best val_loss", "best_val_loss", ".4f"), ("best val_exact", "best_val_exact", ".3f"),
            ("tree CPU (s)", "tree_cpu_s", ".1f"), ("  reaped children CPU (s)", "rusage_children_cpu_s", ".1f"),
            ("training steps (s, fw+bw)", "step_s", ".1f"), ("CPU outside steps / trial (s)", "overhead_cpu_s_per_trial",
                                                             ".1f"),
            ("step_share", "step_share", ".3f"), ("launch, median (s)", "launch_s_median", ".1f")]
    for label, key, fmt in rows:
        if key is None:
            a, b = f"{ours['slots']} x {ours['threads']}", f"{peer['slots']} x {peer['threads']}"
        else:
            a, b = (format(x[key], fmt) if x[key] is not None else "n/a" for x in (ours, peer))
        print(f"{label:34}{a:>18}{b:>16}")
    reach = "" if c["ours_reached_target"] else " (never reached: time of its own best)"
    print(f"{'time to ' + format(c['target_val_loss'], '.4f') + ' (s)':34}{c['ours_time_to_target_s']:>18.1f}"
          f"{c['peer_time_to_target_s']:>16.1f}{reach}")
    print(f"\nttq_ratio {c['ttq_ratio']:.2f} (peer's time to its best {c['target_val_loss']:.4f} / ours); "
          f"at the worse final best {c['common_val_loss']:.4f}: {c['ttq_ratio_common']:.2f}; "
          f"wall_ratio {c['wall_ratio']:.2f}")
    print(f"configs tried, ours: {', '.join(ours['configs'])}\nconfigs tried, peer: {', '.join(peer['configs'])}"
          f"\nthe same configs on both sides: {c['same_configs']}")
    print(f"epochs per trial, ours {ours['epochs_per_trial']}, peer {peer['epochs_per_trial']}")
    print(f"launch per trial (s), ours {fmt_list(ours['launch_s'])}, peer {fmt_list(peer['launch_s'])}")
    print("ours, process-tree CPU by process role (s, processes): " + roles_line(ours["cpu_by_role"]))
    print("\nbest val_loss so far (s since start)")
    for t, loss in curve_table(ours, peer):
        print(f"  {t:7.1f}  ours {loss[0]:>8}  peer {loss[1]:>8}")


def fmt_list(values: list[float]) -> str:
    return " ".join(f"{v:.1f}" for v in values)


# A Ray worker process before it takes its actor's title (all of them, in runs made before
# TreeCPU looked again: run 2 of BENCHMARKS.md section 12).
UNNAMED_WORKER = {"setup_worker.py": "Ray workers, actor unnamed", "default_worker.py": "Ray workers, actor unnamed"}


def roles_line(roles: dict[str, list[float]], top: int = 12) -> str:
    merged: dict[str, list[float]] = {}
    for name, (cpu, n) in roles.items():
        entry = merged.setdefault(UNNAMED_WORKER.get(name, name), [0.0, 0])
        entry[0] += cpu
        entry[1] += n
    ranked = sorted(merged.items(), key=lambda item: -item[1][0])[:top]
    return ", ".join(f"{name} {cpu:.1f} ({int(n)})" for name, (cpu, n) in ranked)


def curve_table(ours: dict[str, Any], peer: dict[str, Any]) -> list[tuple[float, tuple[str, str]]]:
    """Best-so-far of both sides at a handful of times, up to the longer wall time."""
    end = max(ours["wall_s"], peer["wall_s"])
    rows = []
    for t in (0.1 * end, 0.25 * end, 0.5 * end, 0.75 * end, end):
        a, b = ("-" if v is None else f"{v:.4f}" for v in (at([tuple(p) for p in s["curve"]], t)
                                                          for s in (ours, peer)))
        rows.append((t, (a, b)))
    return rows


# --- the scaling model (BENCHMARKS.md, "Scaling past one machine") -------------------------


def scaling_model(ours: dict[str, Any], trials: list[dict[str, Any]], cores: int) -> dict[str, Any]:
    """Predicted wall time of the same sweep on N machines of `cores` CPUs (1 trial per CPU).

    T(N) = S + max(sum of trial lives / (N x cores x eta), longest trial life) + tail
    S: start until the first trial starts; a trial's life: its start to its last result
    (launch, training, validation, checkpoints, contention on its node all included);
    eta: how busy the trial slots are kept. ASHA's own efficiency is near 1 (Li et al. 2020
    report near-linear scaling for their benchmarks); `eta_measured` is what this machine
    achieved (slot time in trial lives / slot time between S and the tail), carried to N.
    """
    lives = [max(r["t"] for r in t["reports"]) - t["start"] for t in trials]
    start = ours["first_trial_start_s"] or 0.0
    tail = ours["wall_s"] - max(max(r["t"] for r in t["reports"]) for t in trials)
    busy = sum(lives) / (cores * max(ours["wall_s"] - start - tail, 1e-9))
    eta = min(1.0, busy)

    def wall(n: int, e: float) -> float:
        return start + max(sum(lives) / (n * cores * e), max(lives)) + tail

    return {"cores": cores, "start_s": start, "tail_s": tail, "lives_s": lives, "sum_lives_s": sum(lives),
            "eta_measured": eta, "predicted_wall_eta1_s": {n: wall(n, 1.0) for n in (1, 2, 4, 8)},
            "longest_life_s": max(lives), "predicted_wall_s": {n: wall(n, eta) for n in (1, 2, 4, 8)}}


# --- BENCHMARKS.md -----------------------------------------------------------------------


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0] if names else 'unknown CPU'}, {os.cpu_count()} vCPUs"


def plot(ours: dict[str, Any], peer: dict[str, Any], target: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, side in (("ours (Ray sweep, 2 x 1 thread)", ours), ("peer (Optuna, 1 x all cores)", peer)):
        xs = [p[0] for p in side["curve"]] + [side["wall_s"]]
        ys = [p[1] for p in side["curve"]] + [side["curve"][-1][1]]
        ax.step(xs, ys, where="post", label=label)
        ax.axvline(side["wall_s"], linestyle=":", color=ax.lines[-1].get_color())
    ax.set_xlabel("seconds since the process started")
    ax.set_ylabel("best val_loss so far")
    ax.legend()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    os.replace(tmp, target)
    return True


def markdown(ours: dict[str, Any], peer: dict[str, Any], c: dict[str, Any], scale: dict[str, Any],
             meta: dict[str, Any], figure: bool) -> str:
    cores = scale["cores"]
    def f(x: Any, fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    reach = "" if c["ours_reached_target"] else " (never reached; time of its own best)"
    lines = [
        "## 12. Time to quality — `bench/time_to_quality.py`", "",
        f"One run, {meta['date']} UTC{', commit `' + meta['commit'] + '`' if meta.get('commit') else ''}, "
        f"{meta['cpu']}; 1-minute load {meta['load_start']:.2f} at the start, "
        f"{meta['load_end']:.2f} at the end. `{meta['command']}`: `conf/sweep.yaml` with the confirmation "
        "stage off, the same seed, space and trial count on both sides: ours is `jobs/sweep.py` (its own "
        "local Ray cluster), the peer one in-process Optuna study (TPE + SuccessiveHalvingPruner at the same "
        "rungs, one trial at a time with all cores). Method: the module docstring.", "",
        "| | ours (Ray sweep) | peer (Optuna) |", "|---|---:|---:|",
        f"| trials (slots x threads) | {ours['trials']} ({ours['slots']} x {ours['threads']}) | "
        f"{peer['trials']} ({peer['slots']} x {peer['threads']}) |",
        f"| wall time (s) | {ours['wall_s']:.1f} | {peer['wall_s']:.1f} |",
        f"| best val_loss | {ours['best_val_loss']:.4f} | {peer['best_val_loss']:.4f} |",
        f"| best val_exact | {f(ours['best_val_exact'], '.3f')} | {f(peer['best_val_exact'], '.3f')} |",
        f"| time to {c['target_val_loss']:.4f} (peer's best), s | {c['ours_time_to_target_s']:.1f}{reach} | "
        f"{c['peer_time_to_target_s']:.1f} |",
        f"| process-tree CPU (s) | {ours['tree_cpu_s']:.0f} | {peer['tree_cpu_s']:.0f} |",
        f"| training steps, fw+bw (s) | {ours['step_s']:.0f} | {peer['step_s']:.0f} |",
        f"| CPU outside training steps per trial (s) | {ours['overhead_cpu_s_per_trial']:.1f} | "
        f"{peer['overhead_cpu_s_per_trial']:.1f} |",
        f"| step_share | {ours['step_share']:.3f} | {peer['step_share']:.3f} |",
        f"| epochs per trial | {' '.join(map(str, ours['epochs_per_trial']))} | "
        f"{' '.join(map(str, peer['epochs_per_trial']))} |",
        f"| launch: trial start to first step, median (s) | {f(ours['launch_s_median'], '.1f')} | "
        f"{f(peer['launch_s_median'], '.1f')} |", "",
        f"Configs tried by both sides: {c['common_configs']} of {ours['trials']}. "
        f"Ours, the process tree's CPU by role (seconds, processes): {roles_line(ours['cpu_by_role'])}.", "",
        f"Against the issue's targets: `ttq_ratio` {c['ttq_ratio']:.2f} (target >= 1.2), `wall_ratio` "
        f"{c['wall_ratio']:.2f} (>= 1.0), `overhead_cpu_s_per_trial` {ours['overhead_cpu_s_per_trial']:.1f} "
        f"(<= 5). At the worse of the two final bests ({c['common_val_loss']:.4f}) the time ratio is "
        f"{c['ttq_ratio_common']:.2f}.", "",
        "Best val_loss so far, seconds since each process started:", "",
        "| s | ours | peer |", "|---:|---:|---:|",
        *[f"| {t:.0f} | {a} | {b} |" for t, (a, b) in curve_table(ours, peer)], ""]
    if figure:
        lines += ["![best val_loss so far against time](bench/figures/time_to_quality.png)", ""]
    p, p1 = scale["predicted_wall_s"], scale["predicted_wall_eta1_s"]
    lines += [
        "### Scaling past one machine", "",
        "A model of the sweep's wall time on N machines of C cores (one trial per core, as here), "
        "from this run's measured costs:", "",
        "    T(N) = S + max(sum of trial lives / (N x C x eta), longest trial life) + tail", "",
        f"S = {scale['start_s']:.1f} s (process start to the first trial: imports, Ray's start, data); a trial's "
        f"life (its start to its last result: launch, training, validation, checkpoints) summed over the "
        f"trials = {scale['sum_lives_s']:.0f} s, the longest {scale['longest_life_s']:.0f} s (the trial ASHA "
        f"runs to the end, a floor no number of machines removes); tail {scale['tail_s']:.1f} s (shutdown). "
        "eta is how busy the trial slots are kept. ASHA itself promotes asynchronously and leaves no slot "
        "waiting on a rung: Li et al., \"A System for Massively Parallel Hyperparameter Tuning\" (MLSys "
        "2020), report near-linear scaling in the number of workers for their benchmarks (eta = 1). This run "
        f"kept its slots busy {scale['eta_measured']:.0%} of the time between S and the tail (launch gaps); "
        "that measured eta is carried to every N. The same trials are assumed, so the same best val_loss; a trial's life is taken as "
        "measured, since each machine carries the same per-core load (C trials and their Ray processes).", "",
        f"| machines (C = {cores}) | 1 | 2 | 4 | 8 |", "|---|---:|---:|---:|---:|",
        f"| predicted wall, eta = 1 (s) | {p1[1]:.0f} | {p1[2]:.0f} | {p1[4]:.0f} | {p1[8]:.0f} |",
        f"| predicted wall, measured eta (s) | {p[1]:.0f} | {p[2]:.0f} | {p[4]:.0f} | {p[8]:.0f} |",
        f"| peer wall / predicted (wall_ratio) | {peer['wall_s'] / p[1]:.2f} | {peer['wall_s'] / p[2]:.2f} | "
        f"{peer['wall_s'] / p[4]:.2f} | {peer['wall_s'] / p[8]:.2f} |",
        f"| measured wall (s) | {ours['wall_s']:.0f} | | | |", "",
        f"With {ours['trials']} trials the longest trial is reached at N = "
        f"{math.ceil(scale['sum_lives_s'] / (cores * scale['longest_life_s']))}: beyond that, more machines only "
        "pay off with more trials (num_samples), where ASHA keeps them busy. The peer cannot use a second "
        "machine at all (one process; Optuna needs a shared database and several processes for that).", ""]
    return "\n".join(lines)


def write_section(text: str, path: Path = REPO / "BENCHMARKS.md") -> None:
    """Replace (or append) the block between the markers; temp file + rename."""
    old = path.read_text()
    block = f"{MARK_START}\n{text}\n{MARK_END}"
    if MARK_START in old:
        head, rest = old.split(MARK_START, 1)
        new = head + block + rest.split(MARK_END, 1)[1]
    elif NODES_START in old:     # bench/two_nodes.py wrote its part first
        head, rest = old.split(NODES_START, 1)
        new = head.rstrip("\n") + "\n\n" + block + "\n\n" + NODES_START + rest
    else:
        nodes = f"{NODES_START}\n_The two-node check (`bench/two_nodes.py`) has not run yet._\n{NODES_END}"
        new = old.rstrip("\n") + "\n\n" + block + "\n\n" + nodes + "\n"
    atomic_write(path, new)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- main --------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="micro model, 4 tiny trials, about a minute")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--write", action="store_true", help="write section 12 of BENCHMARKS.md and its figure")
    parser.add_argument("--out", help="keep both runs' folders and raw.json here (default: a temporary folder)")
    parser.add_argument("--again", metavar="RAW_JSON", help="report (and --write) a saved run's raw.json, running nothing")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for both sides, after the benchmark's own (e.g. sweep.reduction_factor=3)")
    args = parser.parse_args()
    if args.smoke and args.write:
        parser.exit(2, "time_to_quality.py: --write records the full run only, not --smoke\n")
    return args


def measure(args: argparse.Namespace, print_load: Any) -> dict[str, Any]:
    """Both runs; what they measured is also saved as raw.json in --out (for --again)."""
    job = [*(SMOKE_JOB if args.smoke else FULL_JOB), *args.set]
    saved = {"load_start": print_load("start"), "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
             "commit": git_commit(), "overrides": args.set}
    with tempfile.TemporaryDirectory(prefix="bench-ttq-") as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        saved["ours"] = run_ours(job, out / "ours")
        print(f"ours: {saved['ours']['wall_s']:.1f} s", flush=True)
        print_load("between")
        saved["peer"] = run_peer_side(job, out / "peer")
        print(f"peer: {saved['peer']['wall_s']:.1f} s", flush=True)
        saved["load_end"] = print_load("end")
        atomic_write(out / "raw.json", json.dumps(saved))
    return saved


def git_commit() -> str | None:
    """The checkout's commit, `+` when tracked files differ from it (what was measured)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+" if dirty else "")


def main() -> None:
    args = parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from bench_output import print_json, print_load

    if args.again:
        saved = json.loads(Path(args.again).read_text())
    else:
        saved = measure(args, print_load)
    raw_ours, raw_peer, load_start = saved["ours"], saved["peer"], saved["load_start"]
    ours, peer = summarize(raw_ours), summarize(raw_peer)
    c = compare(ours, peer)
    scale = scaling_model(ours, raw_ours["trials"], os.cpu_count() or 1)
    print_report(ours, peer, c)
    load_end = saved.get("load_end") or print_load("end")
    if args.write:
        sets = "".join(f" --set {o}" for o in saved.get("overrides", []))
        meta = {"date": saved["date"], "commit": saved.get("commit"), "cpu": cpu_model(), "load_start": load_start, "load_end": load_end,
                "command": f"python bench/time_to_quality.py --write{sets}"}
        figure = plot(ours, peer, REPO / "bench" / "figures" / "time_to_quality.png")
        write_section(markdown(ours, peer, c, scale, meta, figure))
        print("wrote BENCHMARKS.md section 12" + (" and bench/figures/time_to_quality.png" if figure else ""))
    if args.json:
        print_json({"bench": "time_to_quality", "smoke": args.smoke, "overrides": saved.get("overrides", []), **c,
                    "overhead_cpu_s_per_trial": ours["overhead_cpu_s_per_trial"], "step_share": ours["step_share"],
                    "ours": ours, "peer": peer, "scaling": scale, "loadavg_start": load_start, "loadavg_end": load_end})


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--peer":
        run_peer(Path(sys.argv[2]), sys.argv[3:])
    else:
        main()

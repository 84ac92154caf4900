"""Benchmark: where the wall time of a small sweep goes.

An 8-trial sweep of short trials on a 2-CPU local cluster, run by the sweep's own
`hlbd_ray.sweep.run_sweep` (the cluster is always a new one on a free dashboard port, as
other clusters may run on the machine), with its hooks: a Tune callback recording trial
lifetimes and a worker setup hook that wraps
`TrainRun`'s methods in every Ray worker process and appends one line per call (run
name, what, start, end; wall clock) to a file per process. Nothing in the package is
changed; the hook only times calls.

    step share = sum over trials of time inside accumulate + optimizer_step
                 / (sweep wall time x concurrent trial slots)

The sweep wall time is `tuner.fit()` (the cluster is already up; its start-up is shown
apart). The rest of the slot time is split into trial start-up (launch: trial start seen
by the driver -> its Train worker imports the training module; import; pre-build:
config and data; build: `TrainRun.__init__`), validation, epoch-end checkpoint +
report, periodic reports, other loop work (batching, metrics), teardown (last loop event
-> trial end seen by the driver) and idle slots (no trial running). A report-derived
estimate (fw_ms + bw_ms x batches, which leaves out the optimizer) is printed beside the
measured step time as a cross-check.

CPU: the whole process tree's CPU seconds during `fit()` are read from /proc (cluster
daemons, every Ray worker, the driver), per process kind; "CPU outside steps per trial"
is that total less the CPU of the step calls, over the trials. The hook also records
which processes import torch.

    python bench/sweep.py                 # ~4-5 minutes on 2 cores (8 trials, up to ~50 s of steps each)
    python bench/sweep.py --smoke --json
    python bench/sweep.py --trials 4 --epochs 1 --set sweep.controller_in_trial=false   # a lever off
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from bench_cluster import free_port  # noqa: E402
from bench_output import print_json, print_load  # noqa: E402
from hlbd_ray.config import Config, load_config, validate  # noqa: E402

TIMELINE_ENV = "BENCH_TIMELINE_DIR"
TIMED = ("__init__", "fit", "accumulate", "optimizer_step", "evaluate", "end_epoch", "report")


# --- the instrumentation, run in every Ray worker process ----------------------------------


def install_timers() -> None:
    """Worker setup hook: wrap TrainRun's methods when (and if) hlbd_ray.train is imported.

    Importing it here would load torch into every Ray worker (trial drivers, controllers)
    and slow their start; a finder patches the module right after its first import.
    """
    import importlib.abc
    import importlib.util
    import sys

    from hlbd_ray.console import quiet_expected_events

    quiet_expected_events()   # what the sweep's own setup hook does, replaced by this one

    class PatchOnImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
            if name != "hlbd_ray.train":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            assert spec is not None and spec.loader is not None  # the installed package, from source
            loader = spec.loader
            load = loader.exec_module

            def exec_module(module: Any) -> None:
                start = time.time()
                load(module)
                log = wrap_methods(module.TrainRun)
                # A Train worker imports the module when it receives the train function.
                log.write(json.dumps({"run": None, "what": "import", "start": start, "end": time.time()}) + "\n")

            setattr(loader, "exec_module", exec_module)  # noqa: B010 (patching one instance's method, on purpose)
            return spec

    sys.meta_path.insert(0, PatchOnImport())
    sys.meta_path.insert(0, LogTorchImport())


class LogTorchImport:
    """Meta path finder that records which Ray process imports torch, and from where (the
    innermost frames of Ray and of this package): torch costs ~1-2 s of CPU per process."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        import sys
        import traceback

        if name != "torch":
            return None
        sys.meta_path.remove(self)
        frames = [f"{Path(f.filename).name}:{f.lineno}" for f in traceback.extract_stack()
                  if "/ray/" in f.filename or "hlbd_ray" in f.filename][-4:]
        title = Path("/proc/self/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        with open(Path(os.environ[TIMELINE_ENV]) / f"torch-{os.getpid()}.json", "w") as out:
            json.dump({"pid": os.getpid(), "title": title, "frames": frames}, out)
        return None


def wrap_methods(cls: type) -> Any:
    import functools

    log = open(Path(os.environ[TIMELINE_ENV]) / f"{os.getpid()}.jsonl", "a", buffering=1)

    def wrap(name: str) -> None:
        original = getattr(cls, name)

        @functools.wraps(original)
        def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
            start, cpu = time.time(), time.process_time()
            try:
                return original(self, *args, **kwargs)
            finally:
                run = getattr(getattr(self, "session", None), "run_name", "?")
                # One write per line, line-buffered: a killed worker loses nothing written.
                # cpu: the process's CPU seconds in the call (all its threads).
                log.write(json.dumps({"run": run, "what": name, "start": start, "end": time.time(),
                                      "cpu": time.process_time() - cpu}) + "\n")

        setattr(cls, name, timed)

    for name in TIMED:
        wrap(name)
    return log


# --- CPU of the process tree --------------------------------------------------------------


class TreeCPU:
    """CPU seconds of this process and all its descendants (the local cluster's GCS, raylet,
    dashboard and every Ray worker), read from /proc every `every_s` seconds while the
    sweep runs (psutil is not a dependency; this is Linux-only, like the machine).

    Each process is keyed by (pid, start time) and keeps its last reading and its last
    title other than an idle worker's ("ray::TrainController.run" -> TrainController).
    A process that exits loses at most its CPU of the last interval; the ones alive at
    start count from their reading then.
    """

    def __init__(self, every_s: float = 0.25) -> None:
        import threading

        self.every_s, self.root = every_s, os.getpid()
        self.first: dict[tuple[int, int], float] = {}
        self.last: dict[tuple[int, int], float] = {}
        self.title: dict[tuple[int, int], str] = {}
        self.tick = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks (this sampler is in one) into the experiment state; a
        # copy needs no thread.
        return {k: v for k, v in self.__dict__.items() if k not in ("_stop", "_thread")}

    def start(self) -> None:
        self._sample(initial=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def _sample(self, initial: bool = False) -> None:
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    raw = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue  # exited meanwhile
                # Fields after the parenthesised command: state ppid ... utime(14) stime(15) ... starttime(22).
                fields = raw[raw.rindex(")") + 2:].split()
                stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / self.tick, int(fields[19]))
        mine, frontier = {self.root}, [self.root]
        children: dict[int, list[int]] = defaultdict(list)
        for pid, (ppid, _, _) in stats.items():
            children[ppid].append(pid)
        while frontier:
            for child in children[frontier.pop()]:
                mine.add(child)
                frontier.append(child)
        for pid in mine:
            _, cpu, started = stats[pid]
            key = (pid, started)
            if initial:
                self.first[key] = cpu
            self.last[key] = cpu
            title = self._title(pid)
            if title and title != "IDLE":
                self.title[key] = title
            else:
                self.title.setdefault(key, title or "?")

    @staticmethod
    def _title(pid: int) -> str | None:
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            return None
        if argv0.startswith("ray::"):  # a Ray worker's title: ray::Class.method or ray::IDLE
            return argv0[5:].split(".")[0].split(" ")[0]
        return Path(argv0.split(" ")[0]).name

    def by_kind(self) -> dict[str, float]:
        """CPU seconds used during the measurement, summed per process title; the root
        process (the sweep driver: Tune, the callbacks, this sampler) is "driver"."""
        kinds: dict[str, float] = defaultdict(float)
        for key, cpu in self.last.items():
            kind = "driver" if key[0] == self.root else self.title.get(key, "?")
            kinds[kind] += cpu - self.first.get(key, 0.0)
        return dict(kinds)

    def title_of(self, pid: int) -> str:
        return next((title for key, title in self.title.items() if key[0] == pid), "?")

    def count(self, kind: str) -> int:
        return sum(title == kind for key, title in self.title.items() if key[0] != self.root)


# --- the sweep ----------------------------------------------------------------------------


def bench_config(args: argparse.Namespace, out: Path) -> Config:
    return load_config(None, [
        f"model.d_model={args.d_model}", f"model.num_layers={args.layers}", f"model.d_ff={4 * args.d_model}",
        "model.dropout=0.1", f"data.generated_per_module={args.per_module}", "train.max_len=96",
        f"train.epochs={args.epochs}", "train.batch_size=16", "train.grad_accum=1",
        "train.report_every_steps=10", "train.precision=fp32", "train.cpus_per_worker=1",
        "train.progress_bar=false", f"train.warmup_steps={2 if args.smoke else 10}", f"output_dir={out}",
        "sweep.name=bench", f"sweep.num_samples={args.trials}", f"sweep.scheduler={args.scheduler}",
        "sweep.search=random", f"sweep.space.d_model=[{args.d_model}]", "sweep.space.num_heads=[2,4,8]",
        "sweep.confirm.top_k=0", "report.every_s=5", "cluster.num_cpus=2", *args.set])


def run_sweep(cfg: Config, timeline: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The sweep as `run_sweep_job` runs it (`hlbd_ray.sweep.run_sweep`), with the timing
    hook in every Ray worker, the trials' lifetimes recorded, on a new local cluster."""
    from ray import tune

    from hlbd_ray.lifecycle import Interrupt
    from hlbd_ray.sweep import SweepHooks, plan_resources
    from hlbd_ray.sweep import run_sweep as sweep
    from hlbd_ray.trainer import preflight

    lives: dict[str, dict[str, Any]] = defaultdict(dict)
    fit: dict[str, float] = {}
    cpu = TreeCPU()

    class Lifetimes(tune.Callback):
        """Trial start and end as the driver sees them, the report-derived fw+bw time, and
        `tuner.fit()`'s span (Tune sets its callbacks up when fit starts)."""

        def setup(self, stop: tune.Stopper | None = None, num_samples: int | None = None,
                  total_num_samples: int | None = None, **info: Any) -> None:
            fit["start"] = time.time()
            cpu.start()

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            lives[trial.trial_id]["start"] = time.time()

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            batches = result["batches"] - result["batch_start"]
            life = lives[trial.trial_id]
            life["fw_bw_s"] = life.get("fw_bw_s", 0.0) + (result["fw_ms"] + result["bw_ms"]) * batches / 1e3

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            lives[trial.trial_id]["end"] = time.time()

        on_trial_error = on_trial_complete

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            fit["end"] = time.time()
            cpu.stop()

    validate(cfg, sweep=True)
    t0 = time.time()
    cfg, data = preflight(cfg, cfg.sweep.name)
    t1 = time.time()
    hooks = SweepHooks(callbacks=[Lifetimes()], env={TIMELINE_ENV: str(timeline), **(env or {})},
                       worker_setup=install_timers, dashboard_port=free_port())
    sweep(cfg, data, Path(cfg.output_dir) / cfg.sweep.name, Interrupt(), hooks)
    assert cfg.cluster.num_cpus is not None  # bench_config sets it
    slots = plan_resources(cfg, {"CPU": float(cfg.cluster.num_cpus)}).max_concurrent
    # Cluster start: from the data being ready to fit() (includes building the Tuner).
    return {"trials": dict(lives), "start": fit["start"], "end": fit["end"], "slots": slots,
            "data_s": t1 - t0, "cluster_s": fit["start"] - t1, "cpu": cpu.by_kind(),
            "processes": {kind: cpu.count(kind) for kind in cpu.by_kind()},
            "torch_imports": torch_imports(timeline, cpu)}


def torch_imports(timeline: Path, cpu: TreeCPU) -> dict[str, int]:
    """How many processes of each kind imported torch (see LogTorchImport)."""
    kinds: dict[str, int] = defaultdict(int)
    for file in timeline.glob("torch-*.json"):
        record = json.loads(file.read_text())
        kinds[cpu.title_of(record["pid"])] += 1
    return dict(kinds)


# --- accounting --------------------------------------------------------------------------


def read_timeline(timeline: Path) -> dict[str, list[dict[str, Any]]]:
    """Events per run; a process's import event goes to the run its TrainRun served
    (files of processes that never ran a TrainRun, like trial drivers, are skipped)."""
    events: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for file in timeline.glob("*.jsonl"):
        mine = [json.loads(line) for line in file.read_text().splitlines()]
        runs = {e["run"] for e in mine if e["run"]}
        for run in runs:
            events[run].extend(e for e in mine if e["run"] in (run, None))
    return events


def account(sweep: dict[str, Any], events: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Seconds of slot time per category, summed over trials, plus idle slot time."""
    parts: dict[str, float] = defaultdict(float)
    rows, est_fw_bw, step_cpu = [], 0.0, 0.0
    for tid, life in sorted(sweep["trials"].items(), key=lambda item: item[1]["start"]):
        mine = events.get(tid, [])
        took: dict[str, float] = defaultdict(float)
        for e in mine:
            took[e["what"]] += e["end"] - e["start"]
            if e["what"] in ("accumulate", "optimizer_step"):
                step_cpu += e.get("cpu", 0.0)
        end_of_trial = life.get("end", sweep["end"])
        loop = [e for e in mine if e["what"] != "import"]
        if not loop:  # never reached the training loop
            parts["launch"] += end_of_trial - life["start"]
            continue
        imported = min((e["start"] for e in mine if e["what"] == "import"), default=None)
        first = min(e["start"] for e in loop)  # TrainRun.__init__ begins
        last = max(e["end"] for e in loop)
        periodic_reports = took["report"] - sum(  # reports made inside end_epoch are counted there
            e["end"] - e["start"] for e in loop if e["what"] == "report" and _inside(e, loop, "end_epoch"))
        row = {
            "trial": tid, "start": life["start"] - sweep["start"], "end": end_of_trial - sweep["start"],
            # Trial start -> the worker imports the training module: trial actor, Train
            # controller, placement group (waiting for a free CPU), worker actor.
            "launch": (imported if imported is not None else first) - life["start"],
            "import": took["import"],
            # Import done -> TrainRun built: config, data from the object store, context.
            "pre_build": first - (imported + took["import"] if imported is not None else first),
            "build": took["__init__"],
            "step": took["accumulate"] + took["optimizer_step"],
            "validate": took["evaluate"],
            "checkpoint_report": took["end_epoch"] - took["evaluate"],
            "report": periodic_reports,
            "teardown": end_of_trial - last,
            "epochs": sum(e["what"] == "end_epoch" for e in loop),
        }
        row["other_loop"] = (last - first - took["__init__"]) - (
            row["step"] + took["end_epoch"] + periodic_reports)
        for key in PARTS:
            if key != "idle_slots":
                parts[key] += row[key]
        rows.append(row)
        est_fw_bw += life.get("fw_bw_s", 0.0)
    wall = sweep["end"] - sweep["start"]
    slot_time = wall * sweep["slots"]
    parts["idle_slots"] = slot_time - sum(parts.values())
    lives = sweep["trials"].values()
    # Idle time at the ends: fit() until the first trial starts, last trial end until fit() returns.
    lead_in = min((life["start"] for life in lives), default=sweep["end"]) - sweep["start"]
    tail = sweep["end"] - max((life.get("end", sweep["end"]) for life in lives), default=sweep["end"])
    # CPU outside training steps: every process of the tree (cluster daemons and the driver
    # included) less the step calls' own CPU, per trial.
    total_cpu = sum(sweep["cpu"].values())
    trials = max(len(sweep["trials"]), 1)
    return {"wall_s": wall, "slots": sweep["slots"], "parts": dict(parts), "report_fw_bw_s": est_fw_bw,
            "cpu_s": total_cpu, "step_cpu_s": step_cpu, "overhead_cpu_s_per_trial": (total_cpu - step_cpu) / trials,
            "launch_per_trial_s": parts["launch"] / trials,
            "step_share": parts["step"] / slot_time, "lead_in_s": lead_in, "tail_s": tail, "rows": rows}


def _inside(event: dict[str, Any], events: list[dict[str, Any]], what: str) -> bool:
    return any(o["what"] == what and o["start"] <= event["start"] and event["end"] <= o["end"] for o in events)


PARTS = ("step", "launch", "import", "pre_build", "build", "validate", "checkpoint_report", "report",
         "other_loop", "teardown", "idle_slots")


def print_table(args: argparse.Namespace, sweep: dict[str, Any], r: dict[str, Any]) -> None:
    slot_time = r["wall_s"] * r["slots"]
    print(f"\n{len(sweep['trials'])} trials ({args.scheduler}), d_model {args.d_model}, {args.layers} layers, "
          f"{args.epochs} epochs of {args.per_module * 5} generated pairs; {r['slots']} slots; "
          f"sweep wall {r['wall_s']:.1f} s (cluster start {sweep['cluster_s']:.1f} s and data "
          f"{sweep['data_s']:.2f} s before it){'; ' + ' '.join(args.set + args.env) if args.set or args.env else ''}")
    print(f"{'trial':12}{'start':>7}{'launch':>8}{'import':>8}{'pre':>6}{'build':>7}{'steps':>8}"
          f"{'val':>6}{'ckpt':>6}{'epochs':>7}{'end':>7}   (s; start/end from fit())")
    for row in r["rows"]:
        print(f"{row['trial']:12}{row['start']:7.1f}{row['launch']:8.1f}{row['import']:8.1f}{row['pre_build']:6.1f}"
              f"{row['build']:7.1f}{row['step']:8.1f}{row['validate']:6.1f}{row['checkpoint_report']:6.1f}"
              f"{row['epochs']:7d}{row['end']:7.1f}")
    print(f"\n{'where the slot time goes':28}{'s':>9}{'share':>8}")
    for key in PARTS:
        value = r["parts"].get(key, 0.0)
        print(f"{key:28}{value:9.1f}{value / slot_time:8.1%}")
    print(f"{'total (wall x slots)':28}{slot_time:9.1f}")
    print(f"idle at the ends: {r['lead_in_s']:.1f} s from fit() to the first trial start, "
          f"{r['tail_s']:.1f} s from the last trial end to fit() returning (x {r['slots']} slots)")
    print(f"step share {r['step_share']:.3f}; report-derived fw+bw (no optimizer) "
          f"{r['report_fw_bw_s']:.1f} s vs measured step {r['parts'].get('step', 0.0):.1f} s")
    trials = max(len(sweep["trials"]), 1)
    print(f"\nCPU of the process tree during fit(): {r['cpu_s']:.1f} s, of which steps {r['step_cpu_s']:.1f} s; "
          f"outside steps {r['overhead_cpu_s_per_trial']:.2f} s per trial; launch {r['launch_per_trial_s']:.2f} s per trial")
    print(f"{'process kind':28}{'count':>6}{'CPU s':>9}{'per trial':>10}{'torch':>6}")
    for kind, seconds in sorted(sweep["cpu"].items(), key=lambda item: -item[1]):
        print(f"{kind[:27]:28}{sweep['processes'].get(kind, 0):6d}{seconds:9.1f}{seconds / trials:10.2f}"
              f"{sweep['torch_imports'].get(kind, 0):6d}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="where a small sweep's wall time goes")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--per-module", type=int, default=800, help="generated pairs per module (5 modules)")
    parser.add_argument("--scheduler", default="asha", choices=("asha", "fifo"))
    parser.add_argument("--smoke", action="store_true", help="2 tiny trials")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override after the benchmark's own (e.g. sweep.reuse_actors=true)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an env var for the driver and every Ray process (e.g. RAY_num_workers_soft_limit=8)")
    args = parser.parse_args()
    for item in args.env:
        if "=" not in item:
            parser.error(f"--env wants NAME=VALUE, got {item!r}")
    if args.smoke:
        args.trials, args.d_model, args.layers, args.epochs, args.per_module = 2, 32, 1, 1, 30
    return args


def main() -> None:
    args = parse_args()
    load_start = print_load("start")
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as folder:
        out = Path(folder)
        timeline = out / "timeline"
        timeline.mkdir()
        cfg = bench_config(args, out / "runs")
        sweep = run_sweep(cfg, timeline, dict(item.split("=", 1) for item in args.env))
        result = account(sweep, read_timeline(timeline))
    print_table(args, sweep, result)
    load_end = print_load("end")
    if args.json:
        flat = {"step_share": result["step_share"], "wall_s": result["wall_s"], "slots": result["slots"],
                "trials": len(sweep["trials"]), "report_fw_bw_s": result["report_fw_bw_s"],
                "lead_in_s": result["lead_in_s"], "tail_s": result["tail_s"],
                "startup_per_trial_s": sum(result["parts"].get(k, 0.0) for k in ("launch", "import", "pre_build",
                                                                                 "build")) / len(sweep["trials"]),
                "cluster_start_s": sweep["cluster_s"], "loadavg_start": load_start,
                "overhead_cpu_s_per_trial": result["overhead_cpu_s_per_trial"],
                "launch_per_trial_s": result["launch_per_trial_s"], "cpu_s": result["cpu_s"],
                "step_cpu_s": result["step_cpu_s"], "cpu_by_process": sweep["cpu"],
                "torch_imports": sweep["torch_imports"], "set": args.set, "env": args.env,
                "loadavg_end": load_end,
                **{f"{k}_s": v for k, v in result["parts"].items()}}
        print_json(flat)


if __name__ == "__main__":
    main()

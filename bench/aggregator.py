"""Benchmark: the streaming report aggregator against rebuilding the report from every batch.

The same deterministic stream of reports (trials x epochs x batches, ~20 batch losses per
report, trials interleaved as Tune delivers them) is fed to

- ours: `ReportAggregator` (bounded buckets, each write serialised afresh, atomic writes
  of the parquet tables, the sweep JSON and one JSON per trial), and
- rebuild: the reference's approach: keep every batch loss ever seen and, on each write,
  rebuild each changed trial's `experiment_report.json` from all of them (epoch means,
  100 uniformly sampled points per epoch) and json-dump it in place.

Two comparisons, each into its own temporary folder:

- as deployed (`cpu_ratio_vs_rebuild`): each side with its own write policy. The rebuild
  rewrites a trial's file at each of its reports (the reference wrote every 10 batches;
  a report carries 20); ours writes every `report.every_s` (10 s) of real time and at each
  experiment's end, as in a sweep (trial ends wait for the throttle). The stream arrives as fast as the aggregator takes it, so
  this measures the designs: the rebuild's cost grows with every batch ever seen, ours
  with the batches plus a bounded number of writes per unit of time. With results
  arriving slowly (a real sweep), ours writes more often and the gap narrows toward the
  same-schedule figure below.
- same schedule (`cpu_ratio_same_schedule`): both write every `--write-every` reports
  (default: one round, so each trial's file is refreshed each time it reports): what
  one write costs each side. `--deployed-only` skips it (at full size ours then writes
  4,000 times, each serialising the whole sweep afresh: a long run).

Measured: CPU time (time.process_time) of each whole run, write latency of each (wall
clock, one write = everything written at that point), and peak memory in a second pass
under tracemalloc (ours adds the Arrow buffers, which tracemalloc does not see).

    python bench/aggregator.py            # full size: 8 x 50 x 1,600 (~10 min, 2 cores)
    python bench/aggregator.py --smoke --json

What to expect: folding batches into buckets is cheap (under 1 s for 640,000 batches);
on the same schedule both sides spend most of their time serialising and writing what
they output. The aggregator writes more per write (four parquet tables, the sweep
document and one document per trial, with min/max/count per point, all serialised afresh
each time), so on one schedule it loses to the rebuild; the throttle is what makes it
cheap. Its memory per epoch depends on `--points`, not on the batches per epoch, while
the rebuild's grows with every batch kept.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
import tracemalloc
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from bench_output import print_json
from hlbd_ray.config import ReportConfig
from hlbd_ray.contract import Report
from hlbd_ray.report import ReportAggregator

DEPLOYED_EVERY_S = ReportConfig().every_s
VAL_MODULES = {m: {"loss": 2.5, "exact": 0.1}
               for m in ("geometry", "arithmetic", "zodiac", "physics", "reverse_english")}


@dataclass
class StandInTrial:
    """The attributes of a Tune Trial that the aggregator reads."""

    trial_id: str
    config: dict[str, Any] = field(default_factory=dict)
    status: str = "RUNNING"


def make_losses(trials: int, epochs: int, batches: int, seed: int = 0) -> list[array]:
    """A decaying noisy loss per trial with rare spikes and rare non-finite batches
    (stored as NaN here; reports carry them as None)."""
    rng = random.Random(seed)
    out = []
    for t in range(trials):
        losses = array("d")
        for i in range(epochs * batches):
            x = 2.0 + 6.0 * math.exp(-i / (batches * (1 + t))) + rng.gauss(0, 0.15)
            if rng.random() < 0.001:
                x *= 5
            losses.append(math.nan if rng.random() < 0.0005 else x)
        out.append(losses)
    return out


def reports(losses: list[array], epochs: int, batches: int, per_report: int) -> Iterator[tuple[int, dict]]:
    """(trial index, report dict) in round-robin order, following the report contract."""
    cursors = [0] * len(losses)
    total = epochs * batches
    while any(c < total for c in cursors):
        for t, series in enumerate(losses):
            start = cursors[t]
            if start >= total:
                continue
            epoch = start // batches
            end = min(start + per_report, (epoch + 1) * batches)
            window = [None if x != x else x for x in series[start:end]]
            finite = [x for x in window if x is not None]
            epoch_end = end == (epoch + 1) * batches
            cursors[t] = end
            yield t, {**Report(
                epoch=epoch, epochs_done=epoch + int(epoch_end), step=end // 2,
                batches=end, batch_start=start, batch_losses=window,
                epoch_batches=batches, epoch_end=epoch_end,
                epoch_loss=sum(finite) / len(finite) if finite else None,
                loss=finite[-1] if finite else None, ppl=None, acc=0.5,
                lr=3e-4, grad_norm=1.0, fw_ms=10.0, bw_ms=20.0,
                tokens_per_s=1500.0, skipped_steps=0,
                val_loss=2.5 if epoch_end else None, val_ppl=12.2 if epoch_end else None,
                val_acc=0.4, val_exact=0.1, val_step=end // 2, val_modules=VAL_MODULES,
                d_model=256, num_heads=8, head_dim=32, precision="fp32", stop_reason="", seed=0,
                checkpoint_score=2.5 if epoch_end else 1e300,
            ).to_dict(), "training_iteration": end // per_report, "time_total_s": end * 1.0,
                "checkpoint_path": f"bucket/train/t{t}/checkpoint_{epoch}" if epoch_end else None}


class RebuildReference:
    """The reference's report: all batch losses kept, the whole report rebuilt per write."""

    def __init__(self, out_dir: Path, points: int, dataset_stats: dict) -> None:
        self.out_dir, self.points, self.dataset_stats = out_dir, points, dataset_stats
        self.losses: dict[str, list[list[float | None]]] = {}
        self.epoch: dict[str, int] = {}
        self.dirty: set[str] = set()

    def add(self, trial_id: str, report: dict) -> None:
        epochs = self.losses.setdefault(trial_id, [])
        while len(epochs) <= report["epoch"]:
            epochs.append([])
        epochs[report["epoch"]].extend(report["batch_losses"])
        self.epoch[trial_id] = report["epoch"]
        self.dirty.add(trial_id)

    def write(self) -> None:
        for trial_id in sorted(self.dirty):
            path = self.out_dir / trial_id / "experiment_report.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:  # in place, as the reference did
                json.dump(self.rebuild(trial_id), f, indent=2)
        self.dirty.clear()

    def rebuild(self, trial_id: str) -> dict:
        control, points = [], []
        for batch_losses in self.losses[trial_id]:
            finite = [x for x in batch_losses if x is not None]
            control.append(sum(finite) / len(finite) if finite else None)
            stride = max(1, len(batch_losses) // self.points)
            points.extend(batch_losses[::stride][: self.points])
        return {"control_losses": control, "batch_losses": points,
                "current_epoch": self.epoch[trial_id],
                "total_batches": sum(len(e) for e in self.losses[trial_id]),
                "dataset_stats": self.dataset_stats,
                "timestamp": time.strftime("%Y-%m-%d %H:%M:%S")}


def run_ours(stream: Iterator[tuple[int, dict]], trials: list[StandInTrial], out: Path,
             points: int, write_every: int, stats: dict, total: int) -> list[float]:
    """The aggregator on the rebuild's schedule: a simulated clock ticks once per report."""
    ticks = [0.0]
    agg = ReportAggregator(out, points, every_s=write_every, dataset_stats=stats,
                           clock=lambda: ticks[0])
    return _feed(agg, stream, trials, total, ticks)


def run_ours_deployed(stream: Iterator[tuple[int, dict]], trials: list[StandInTrial], out: Path,
                      points: int, write_every: int, stats: dict, total: int) -> list[float]:
    """The aggregator as a sweep runs it: the real clock and the default 10 s interval
    (plus every trial end and the experiment end), however fast the results come."""
    agg = ReportAggregator(out, points, every_s=DEPLOYED_EVERY_S, dataset_stats=stats)
    return _feed(agg, stream, trials, total, None)


def _feed(agg: ReportAggregator, stream: Iterator[tuple[int, dict]], trials: list[StandInTrial],
          total: int, ticks: list[float] | None) -> list[float]:
    durations = _timed(agg, "flush")
    for t, report in stream:
        if ticks is not None:
            ticks[0] += 1.0   # one tick per report: a write every `write_every` reports
        agg.on_trial_result(0, trials, trials[t], report)
        if report["batches"] == total:
            agg.on_trial_complete(0, trials, trials[t])
    agg.on_experiment_end(trials)
    assert agg.failed_writes == 0, "the aggregator failed to write during the benchmark"
    return durations


def run_rebuild(stream: Iterator[tuple[int, dict]], trials: list[StandInTrial], out: Path,
                points: int, write_every: int, stats: dict, total: int) -> list[float]:
    ref = RebuildReference(out, points, stats)
    durations = _timed(ref, "write")
    for n, (t, report) in enumerate(stream, 1):
        ref.add(trials[t].trial_id, report)
        if n % write_every == 0 or report["batches"] == total:
            ref.write()
    ref.write()
    return durations


def _timed(obj: Any, name: str) -> list[float]:
    """Wrap obj.<name> so each call's wall time lands in the returned list."""
    durations: list[float] = []
    inner = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            durations.append(time.perf_counter() - t0)
    setattr(obj, name, timed)
    return durations


def measure(runner: Callable, args: argparse.Namespace, losses: list[array],
            memory: bool) -> dict[str, float]:
    trials = [StandInTrial(f"bench_{i:05d}", {"lr": 3e-4, "pair": "256x8"})
              for i in range(args.trials)]
    stats = {"train_pairs": 9000, "val_pairs": 1000}
    total = args.epochs * args.batches
    with tempfile.TemporaryDirectory() as tmp:
        stream = reports(losses, args.epochs, args.batches, args.report_batches)
        if memory:
            tracemalloc.start()
            arrow_peak = [pa.total_allocated_bytes()]
            pool = _timed_arrow_probe(arrow_peak)
            runner(_probe(stream, pool), trials, Path(tmp), args.points, args.write_every,
                   stats, total)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            # Arrow bytes above what was allocated before this pass began.
            return {"peak_mb": (peak + max(arrow_peak) - arrow_peak[0]) / 2**20}
        cpu0 = time.process_time()
        durations = runner(stream, trials, Path(tmp), args.points, args.write_every, stats,
                           total)
        cpu = time.process_time() - cpu0
    ms = sorted(d * 1000 for d in durations)
    return {"cpu_s": cpu, "writes": len(ms), "p50": statistics.median(ms),
            "p95": ms[min(len(ms) - 1, int(0.95 * len(ms)))]}


def _timed_arrow_probe(peak: list[int]) -> Callable[[], None]:
    def probe() -> None:
        peak.append(pa.total_allocated_bytes())
    return probe


def _probe(stream: Iterator, probe: Callable[[], None], every: int = 50) -> Iterator:
    # Arrow buffers live outside Python's allocator; sample them as the stream goes.
    for n, item in enumerate(stream):
        if n % every == 0:
            probe()
        yield item


def main() -> None:
    parser = argparse.ArgumentParser(description="report aggregator vs full rebuild")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batches", type=int, default=1600, help="micro-batches per epoch")
    parser.add_argument("--report-batches", type=int, default=20)
    parser.add_argument("--write-every", type=int, default=0,
                        help="reports between writes (0: one round, = --trials)")
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc pass")
    parser.add_argument("--deployed-only", action="store_true",
                        help="only the as-deployed comparison (ours as deployed vs the rebuild)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    if args.smoke:
        args.trials, args.epochs, args.batches = 2, 3, 400
    args.write_every = args.write_every or args.trials
    losses = make_losses(args.trials, args.epochs, args.batches)
    deployed = measure(run_ours_deployed, args, losses, memory=False)
    ref = measure(run_rebuild, args, losses, memory=False)
    skipped = {"cpu_s": math.nan, "writes": 0, "p50": math.nan, "p95": math.nan}
    ours = skipped if args.deployed_only else measure(run_ours, args, losses, memory=False)
    mem_ours = mem_ref = {"peak_mb": math.nan}
    if not (args.no_memory or args.deployed_only):
        mem_ours = measure(run_ours, args, losses, memory=True)
        mem_ref = measure(run_rebuild, args, losses, memory=True)
    result = {
        "trials": args.trials, "epochs": args.epochs, "batches_per_epoch": args.batches,
        "report_batches": args.report_batches, "write_every_reports": args.write_every,
        # Each side as designed: ours every 10 s of real time, the rebuild at every report.
        "cpu_s_ours_deployed": deployed["cpu_s"], "writes_ours_deployed": deployed["writes"],
        "cpu_ratio_vs_rebuild": ref["cpu_s"] / deployed["cpu_s"],
        # Both on the rebuild's schedule: what one write costs each side.
        "cpu_s_ours": ours["cpu_s"], "cpu_s_rebuild": ref["cpu_s"],
        "cpu_ratio_same_schedule": ref["cpu_s"] / ours["cpu_s"],
        "peak_mem_ours_mb": mem_ours["peak_mb"], "peak_mem_rebuild_mb": mem_ref["peak_mb"],
        "writes_ours": ours["writes"], "writes_rebuild": ref["writes"],
        "write_ms_p50": ours["p50"], "write_ms_p95": ours["p95"],
        "rebuild_write_ms_p50": ref["p50"], "rebuild_write_ms_p95": ref["p95"],
    }
    print_table(result)
    if args.json:
        print_json(result)


def print_table(r: dict[str, Any]) -> None:
    print(f"{r['trials']} trials x {r['epochs']} epochs x {r['batches_per_epoch']} batches, "
          f"{r['report_batches']} batches per report, a write every {r['write_every_reports']} reports")
    print(f"as deployed (ours: a write every {DEPLOYED_EVERY_S:g} s of real time and at the "
          f"experiment end; rebuild: at every report): ours {r['cpu_s_ours_deployed']:.3f} CPU s in "
          f"{r['writes_ours_deployed']} writes, rebuild {r['cpu_s_rebuild']:.3f} CPU s -> "
          f"{r['cpu_ratio_vs_rebuild']:.1f}x")
    print("on the same schedule (a write every round of reports, both sides):")
    print(f"{'':22}{'ours':>12}{'rebuild':>12}{'ratio':>10}")
    rows = (("CPU s", "cpu_s_ours", "cpu_s_rebuild"),
            ("peak memory MiB", "peak_mem_ours_mb", "peak_mem_rebuild_mb"),
            ("writes", "writes_ours", "writes_rebuild"),
            ("write ms p50", "write_ms_p50", "rebuild_write_ms_p50"),
            ("write ms p95", "write_ms_p95", "rebuild_write_ms_p95"))
    for label, a, b in rows:
        x, y = r[a], r[b]
        ratio = y / x if x else math.nan
        print(f"{label:22}{x:12.3f}{y:12.3f}{ratio:10.1f}x")


if __name__ == "__main__":
    main()

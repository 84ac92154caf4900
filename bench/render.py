"""Benchmark: what the live report page costs a sweep, and what the sweep's loop pays for it.

A sweep's report files (trials x epochs, `--points` buckets per epoch, varied num_heads
and lr) are built once with the aggregator; then, in one run:

- render: `render_report` on them, the whole page (answer plots, overview plots, one
  loss plot per trial, index.html): wall and CPU seconds, median of `--repeats`;
- render as the live page does it: the same files, but two trials advanced by one epoch
  since the last render, which drew the rest (`drawn`); only the plots whose inputs
  changed are drawn again;
- poke: what the aggregator's write pays on Tune's callback thread to start a
  background render (`PageRenderer.poke`), median over the renders;
- ingest, alone and beside renders: the aggregator folding the same reports with no
  render running, and again while renders run back to back (the worst case; a sweep
  waits between renders); the ratio is the slowdown of the callback path that the
  shared GIL and core cost while a render runs;
- the bound: with `report.every_s` (default 10 s), a render starts at most every
  max(every_s, render / max_share) seconds, so it takes at most this share of one core.

    python bench/render.py                 # the default sweep's size: 24 trials x 10 epochs
    python bench/render.py --smoke --json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from aggregator import StandInTrial, make_losses, reports  # noqa: E402

from bench_output import print_json, print_load  # noqa: E402
from hlbd_ray.config import ReportConfig  # noqa: E402
from hlbd_ray.render import PageRenderer, render_report  # noqa: E402
from hlbd_ray.report import ReportAggregator  # noqa: E402


def sweep_stream(trials: int, epochs: int, batches: int) -> list[tuple[int, dict]]:
    """The aggregator benchmark's reports, with each trial's own heads, lr and val_loss."""
    heads, out = (2, 4, 8), []
    for t, r in reports(make_losses(trials, epochs, batches), epochs, batches, per_report=20):
        lr = 10 ** (-4 + 2 * t / max(1, trials - 1))
        val = None if r["val_loss"] is None else 2.0 + abs(t - trials / 2) / trials + 1 / (1 + r["epoch"])
        out.append((t, {**r, "num_heads": heads[t % 3], "head_dim": 256 // heads[t % 3],
                        "lr": lr, "val_loss": val}))
    return out


def fold(out: Path, stream: list[tuple[int, dict]], trials: list[StandInTrial],
         points: int) -> ReportAggregator:
    agg = ReportAggregator(out, points_per_epoch=points, every_s=1e9)
    for t, r in stream:
        agg.add_result(trials[t], r)
    return agg


def ingest_rate(out: Path, stream: list[tuple[int, dict]], trials: list[StandInTrial],
                points: int, span_s: float) -> float:
    """Reports folded per second (no writes) over at least `span_s`, fresh aggregators."""
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < span_s:
        fold(out, stream, trials, points)
        done += len(stream)
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batches", type=int, default=280, help="batches per epoch")
    parser.add_argument("--points", type=int, default=100, help="report.points_per_epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="4 trials x 3 epochs, seconds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.trials, args.epochs, args.batches, args.points, args.repeats = 4, 3, 40, 20, 1
    every_s = ReportConfig().every_s
    load_start = print_load("start")
    stream = sweep_stream(args.trials, args.epochs, args.batches)
    trials = [StandInTrial(f"t{t:03d}", {"lr": 1e-3}) for t in range(args.trials)]
    # The last epoch of trials 0 and 1 arrives after the live page's previous render.
    late = [(t, r) for t, r in stream if t < 2 and r["epoch"] == args.epochs - 1]
    with tempfile.TemporaryDirectory(prefix="bench-render-") as tmp:
        out = Path(tmp)
        agg = fold(out, [(t, r) for t, r in stream if (t, r) not in late], trials, args.points)
        agg._mark_all()
        assert agg.flush()
        drawn: dict[str, str] = {}
        render_report(out, refresh_s=every_s, drawn=drawn)
        for t, r in late:
            agg.add_result(trials[t], r)
        agg._mark_all()
        assert agg.flush()
        w, c = time.perf_counter(), time.process_time()
        render_report(out, refresh_s=every_s, drawn=drawn)
        live_s, live_cpu_s = time.perf_counter() - w, time.process_time() - c
        walls, cpus = [], []
        for _ in range(args.repeats):
            w, c = time.perf_counter(), time.process_time()
            render_report(out, refresh_s=every_s)
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
        render_s, render_cpu_s = statistics.median(walls), statistics.median(cpus)

        # The callback path: folding reports, alone, then beside renders at their cap.
        span = 1.0 if args.smoke else max(2.0, 2 * render_s)
        alone = ingest_rate(out / "alone", stream, trials, args.points, span)
        # The worst case: a render always running (no wait between renders).
        page, pokes, stop = PageRenderer(out, every_s=0, max_share=1.0), [], threading.Event()

        def keep_rendering() -> None:
            while not stop.is_set():
                t = time.perf_counter()
                if page.poke():
                    pokes.append(time.perf_counter() - t)
                time.sleep(0.01)

        looper = threading.Thread(target=keep_rendering, daemon=True)
        looper.start()
        beside = ingest_rate(out / "beside", stream, trials, args.points, span)
        stop.set()
        looper.join()
        if page._thread is not None:
            page._thread.join()
    max_share = PageRenderer(".", every_s).max_share     # what a sweep runs with
    interval = max(every_s, render_s / max_share)
    result = {
        "trials": args.trials, "epochs": args.epochs, "points_per_epoch": args.points,
        "render_s": render_s, "render_cpu_s": render_cpu_s,
        "render_two_advanced_s": live_s, "render_two_advanced_cpu_s": live_cpu_s,
        "poke_ms": statistics.median(pokes) * 1e3 if pokes else float("nan"),
        "renders_beside": page.renders, "ingest_alone_per_s": alone,
        "ingest_beside_per_s": beside, "ingest_slowdown_ratio": alone / beside,
        "every_s": every_s, "max_share": max_share, "render_interval_s": interval,
        "core_share": render_s / interval, "load_start": load_start,
        "load_end": print_load("end"),
    }
    print(f"page of {args.trials} trials x {args.epochs} epochs ({args.points} points/epoch)")
    print(f"  render (whole page)        {render_s:8.2f} s wall  {render_cpu_s:8.2f} s CPU")
    print(f"  render, 2 trials advanced  {live_s:8.2f} s wall  {live_cpu_s:8.2f} s CPU "
          "(the other plots kept from the previous render)")
    print(f"  poke on the callback path  {result['poke_ms']:8.3f} ms (median of {len(pokes)})")
    print(f"  ingest alone               {alone:8.0f} reports/s")
    print(f"  ingest beside renders      {beside:8.0f} reports/s  "
          f"({result['ingest_slowdown_ratio']:.2f}x slower, {page.renders} renders meanwhile)")
    print(f"  bound at every_s={every_s:g}: a render at most every {interval:.1f} s, "
          f"{100 * result['core_share']:.0f}% of one core")
    if args.json:
        print_json(result)


if __name__ == "__main__":
    main()

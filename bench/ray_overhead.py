"""Benchmark: what Ray Train and Ray Tune add to the same training run.

One run of N optimizer steps (a small model, tens of ms per step, reporting every
`--report-every` steps, one epoch ending in validation and a checkpoint) is run

- direct: `TrainRun(cfg, data, LocalSession).fit()` in this process, as `train_locally`
  does, with no Ray running;
- train:  `build_trainer(...).fit()`, one Ray Train worker, on a fresh local cluster with
  `hlbd_ray.cluster.start_ray`'s settings (the single-run job's cluster);
- tune:   a one-trial sweep through `hlbd_ray.sweep.build_tuner` (grid search over one
  architecture and one learning rate, FIFO), i.e. the sweep's own trial driver running
  the same TorchTrainer;
- tune_fn: not a path the package has: the same `TrainRun` run directly inside a plain
  Tune function trainable (a small session adapter written here), to show what a
  one-worker trial would cost without the TorchTrainer layer.

All four train the same model from the same seed on the same batches. Each report is
stamped with the wall clock where it lands (the session, a Train callback in the
controller, a Tune callback in the driver). Steady-state throughput is the tokens of the
batches between the second and the last periodic report over the time between their
stamps, so the cost of the reports themselves counts; the reports' own `tokens_per_s`
(which excludes the time spent inside `report`) is shown beside it. Start-up is the
time from `fit()` to the first report, minus the direct run's own time to its first
report (model build and the first window of steps), shown both ways. Teardown is the
time from the last report (validation and checkpoint done) until `fit()` returns.

Repeats alternate the order (direct, train, tune, tune_fn / tune_fn, tune, train, direct) and Ray is
started and stopped around the Ray variants of each repeat.

    python bench/ray_overhead.py              # ~5 minutes on 2 cores
    python bench/ray_overhead.py --smoke --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from bench_cluster import free_port  # noqa: E402
from bench_output import print_json, print_load  # noqa: E402
from hlbd_ray.config import Config, from_dict, load_config, to_dict  # noqa: E402
from hlbd_ray.data import PreparedData, iter_batches, num_batches, prepare_data  # noqa: E402
from hlbd_ray.session import LocalSession  # noqa: E402
from hlbd_ray.train import TrainRun  # noqa: E402

VARIANTS = ("direct", "train", "tune", "tune_fn")
Stamped = list[tuple[float, dict[str, Any]]]  # (wall clock at arrival, report)
Timed = tuple[float, Stamped, float]  # (fit() called, stamped reports, fit() returned)


def bench_config(args: argparse.Namespace, out: Path) -> Config:
    # Enough generated pairs that the N steps fit in one epoch (no epoch end mid-run); the
    # generator has ~1,200 distinct zodiac prompts, so N x batch stays under ~5,000.
    per_module = math.ceil(args.steps * args.batch / 5 / 0.88) + 10
    return load_config(None, [
        f"model.d_model={args.d_model}", "model.num_heads=4", f"model.num_layers={args.layers}",
        f"model.d_ff={4 * args.d_model}", "model.dropout=0.1",
        f"data.generated_per_module={per_module}", "train.max_len=96",
        f"train.batch_size={args.batch}", "train.grad_accum=1", "train.epochs=1",
        f"train.max_steps={args.steps}", f"train.report_every_steps={args.report_every}",
        "train.precision=fp32", f"train.cpus_per_worker={args.threads}", "train.max_failures=0",
        "train.progress_bar=false", f"output_dir={out}",
        "sweep.search=grid", "sweep.scheduler=fifo", "sweep.num_samples=null",
        f"sweep.space.d_model=[{args.d_model}]", "sweep.space.num_heads=[4]",
        "sweep.space.lr_min=3e-4", "sweep.space.lr_max=3e-4", "sweep.space.lr_grid_points=1",
        "cluster.num_cpus=2"])


# --- the three ways to run it -----------------------------------------------------------


class StampedSession(LocalSession):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.stamped: Stamped = []

    def report(self, metrics: dict[str, Any], checkpoint_dir: Any = None) -> None:
        self.stamped.append((time.time(), dict(metrics)))
        super().report(metrics, checkpoint_dir)


def run_direct(cfg: Config, data: PreparedData, out: Path) -> Timed:
    start = time.time()
    session = StampedSession(out / "direct", run_name=cfg.name)
    TrainRun(cfg, data, session).fit()  # the body of train_locally
    return start, session.stamped, time.time()


def stamp_callback(path: Path) -> Any:
    """A Train callback (it runs in the run's controller) appending stamped reports."""
    from ray.train import UserCallback

    class StampFile(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"t": time.time(), "m": metrics[0]}) + "\n")

    return StampFile()


def run_train(cfg: Config, data_ref: Any, out: Path, name: str) -> Timed:
    from hlbd_ray.trainer import build_trainer

    path = out / f"{name}.jsonl"
    trainer = build_trainer(cfg, data_ref, str(out / "train"), name, [stamp_callback(path)])
    start = time.time()
    trainer.fit()
    end = time.time()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return start, [(line["t"], line["m"]) for line in lines], end


def stamp_tune_callback(stamped: Stamped) -> Any:
    """A Tune callback (it runs in this driver) stamping every trial result."""
    from ray import tune

    class Stamp(tune.Callback):
        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            stamped.append((time.time(), dict(result)))

    return Stamp()


def fit_tuner(tuner: Any, stamped: Stamped) -> Timed:
    start = time.time()
    results = tuner.fit()
    end = time.time()
    if results.errors:
        raise RuntimeError(f"the tune trial failed: {results.errors[0]}")
    return start, stamped, end


def run_tune(cfg: Config, data_ref: Any, out: Path, name: str) -> Timed:
    import ray

    from hlbd_ray.sweep import build_tuner, plan_resources

    stamped: Stamped = []
    cfg = replace(cfg, storage_path=str(out), sweep=replace(cfg.sweep, name=name))
    resources = plan_resources(cfg, ray.cluster_resources())
    return fit_tuner(build_tuner(cfg, data_ref, resources, [stamp_tune_callback(stamped)]), stamped)


class TuneSession:
    """The session interface on Tune's function API: one worker, on the CPU."""

    rank, world_size = 0, 1

    def __init__(self) -> None:
        import torch
        from ray import tune

        self.tune, self.device = tune, torch.device("cpu")
        self.run_name = tune.get_context().get_trial_id()

    def restore(self, load: Any) -> Any:
        checkpoint = self.tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return load(Path(folder))

    def prepare_model(self, model: Any) -> Any:
        return model

    def report(self, metrics: dict[str, Any], checkpoint_dir: Any = None) -> None:
        checkpoint = self.tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        self.tune.report(metrics, checkpoint=checkpoint)


def tune_function(params: dict[str, Any], cfg: dict[str, Any], data: list[Any]) -> None:
    import ray

    TrainRun(from_dict(cfg), ray.get(data[0]), TuneSession()).fit()


def run_tune_fn(cfg: Config, data_ref: Any, out: Path, name: str) -> Timed:
    from ray import tune

    stamped: Stamped = []
    trainable = tune.with_resources(tune.with_parameters(tune_function, cfg=to_dict(cfg), data=[data_ref]),
                                    {"cpu": cfg.train.cpus_per_worker})
    tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(num_samples=1), run_config=tune.RunConfig(
        name=name, storage_path=str(out), verbose=0, callbacks=[stamp_tune_callback(stamped)]))
    return fit_tuner(tuner, stamped)


# --- measures ----------------------------------------------------------------------------


def batch_tokens(cfg: Config, data: PreparedData) -> list[int]:
    """Real (non-padding) input tokens of each batch of epoch 0, in the order runs see them."""
    pad = data.build_tokenizer().pad_id
    return [int((batch.inputs != pad).sum()) for batch in iter_batches(
        data.train, cfg.train.batch_size, seed=cfg.train.seed, epoch=0, shuffle=True,
        loss_on=cfg.train.loss_on)]


def measure(start: float, stamped: Stamped, end: float, tokens: list[int], skip: int) -> dict[str, float]:
    periodic = [(t, m) for t, m in stamped if not m.get("epoch_end")]
    first, last = periodic[min(skip, len(periodic) - 2)], periodic[-1]
    window_tokens = sum(tokens[first[1]["batches"]:last[1]["batches"]])
    return {
        "startup_s": stamped[0][0] - start,
        "tokens_per_s": window_tokens / (last[0] - first[0]),
        "reported_tokens_per_s": statistics.median(m["tokens_per_s"] for _, m in periodic[skip:]),
        "total_s": end - start,
        # From the last report (validation and checkpoint done) until fit() returns.
        "teardown_s": end - stamped[-1][0],
        "steps": stamped[-1][1]["step"],
    }


def run_all(args: argparse.Namespace, out: Path) -> dict[str, list[dict[str, float]]]:
    cfg = bench_config(args, out)
    data = prepare_data(cfg.data, cfg.train.max_len)
    assert num_batches(data.train, cfg.train.batch_size) > args.steps, "data too small for one epoch"
    tokens = batch_tokens(cfg, data)
    found: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}

    def record(repeat: int, variant: str, start: float, stamped: Stamped, end: float) -> None:
        found[variant].append(measure(start, stamped, end, tokens, args.skip_reports))
        print(f"repeat {repeat} {variant:6}: " + ", ".join(
            f"{k} {v:.2f}" for k, v in found[variant][-1].items()), flush=True)

    for repeat in range(args.repeats):
        reverse = repeat % 2 == 1  # direct, train, tune; then tune, train, direct
        if not reverse:
            record(repeat, "direct", *run_direct(cfg, data, out / f"direct-{repeat}"))
        ray_variants = VARIANTS[1:]
        run_on_ray(cfg, data, out, repeat, ray_variants[::-1] if reverse else ray_variants, record)
        if reverse:
            record(repeat, "direct", *run_direct(cfg, data, out / f"direct-{repeat}"))
    return found


def run_on_ray(cfg: Config, data: PreparedData, out: Path, repeat: int, order: tuple[str, ...],
               record: Any) -> None:
    """The Ray variants on a fresh local cluster, stopped after. The settings are
    start_ray's (dashboard on, the health-check interval in every process), but the
    cluster is always a new one with its own dashboard port: plain ray.init() attaches
    to any cluster already running on the machine, and someone else's would distort
    the figures."""
    import ray

    from hlbd_ray.cluster import ray_env_vars

    env = ray_env_vars(cfg.cluster)
    os.environ.update(env)
    ray.init(address="local", num_cpus=cfg.cluster.num_cpus, include_dashboard=True,
             dashboard_host=cfg.cluster.dashboard_host, dashboard_port=free_port(),
             runtime_env={"env_vars": env} if env else None)
    try:
        data_ref = ray.put(data)
        runners = {"train": run_train, "tune": run_tune, "tune_fn": run_tune_fn}
        for variant in order:
            record(repeat, variant, *runners[variant](cfg, data_ref, out, f"{variant}-{repeat}"))
    finally:
        ray.shutdown()


def summarise(found: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    def med(variant: str, key: str) -> float:
        return statistics.median(m[key] for m in found[variant])

    def paired(variant: str, key: str) -> float:
        return statistics.median(v[key] / d[key] for v, d in zip(found[variant], found["direct"]))

    direct_first = med("direct", "startup_s")
    r: dict[str, Any] = {"repeats": len(found["direct"])}
    for v in VARIANTS:
        for key in ("tokens_per_s", "reported_tokens_per_s", "startup_s", "teardown_s", "total_s"):
            r[f"{v}_{key}"] = med(v, key)
    for v in VARIANTS[1:]:
        r[f"{v}_overhead_ratio"] = paired(v, "tokens_per_s")
        r[f"{v}_reported_ratio"] = paired(v, "reported_tokens_per_s")
    # Per trial: the Tune trial's fit() to first report, raw and net of the work the
    # direct run also does before its first report.
    r["startup_s"] = r["tune_startup_s"]
    r["startup_net_s"] = r["tune_startup_s"] - direct_first
    r["train_startup_net_s"] = r["train_startup_s"] - direct_first
    r["tune_fn_startup_net_s"] = r["tune_fn_startup_s"] - direct_first
    return r


def print_table(args: argparse.Namespace, r: dict[str, Any]) -> None:
    print(f"\n{args.steps} steps, d_model {args.d_model}, {args.layers} layers, batch {args.batch}, "
          f"{args.threads} threads, report every {args.report_every} steps; medians of {r['repeats']} repeats")
    print(f"{'':8}{'tokens/s':>10}{'ratio':>8}{'reported tok/s':>16}{'ratio':>8}"
          f"{'to 1st report s':>17}{'teardown s':>12}{'total s':>9}")
    for v in VARIANTS:
        ratio = 1.0 if v == "direct" else r[f"{v}_overhead_ratio"]
        rep_ratio = 1.0 if v == "direct" else r[f"{v}_reported_ratio"]
        print(f"{v:8}{r[f'{v}_tokens_per_s']:10.0f}{ratio:8.3f}{r[f'{v}_reported_tokens_per_s']:16.0f}"
              f"{rep_ratio:8.3f}{r[f'{v}_startup_s']:17.2f}{r[f'{v}_teardown_s']:12.2f}{r[f'{v}_total_s']:9.2f}")
    print(f"start-up per trial (tune, fit() to first report): {r['startup_s']:.2f} s raw, "
          f"{r['startup_net_s']:.2f} s beyond the direct run's; train alone {r['train_startup_net_s']:.2f} s, "
          f"a plain Tune function {r['tune_fn_startup_net_s']:.2f} s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Ray Train / Tune overhead over a direct run")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--report-every", type=int, default=10)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="train.cpus_per_worker (= threads)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-reports", type=int, default=1, help="first periodic reports left out")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.report_every, args.d_model, args.layers, args.repeats = 24, 4, 32, 1, 1
    return args


def main() -> None:
    args = parse_args()
    load_start = print_load("start")
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as folder:
        found = run_all(args, Path(folder))
    result = summarise(found)
    print_table(args, result)
    result["loadavg_start"], result["loadavg_end"] = load_start, print_load("end")
    if args.json:
        print_json(result)


if __name__ == "__main__":
    main()

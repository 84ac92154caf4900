"""The sweep: Ray Tune over Ray Train, resumable, sized so trials can never deadlock.

Each Tune trial runs a small driver function that decodes its architecture, then runs
the training function on Ray Train (`TorchTrainer.fit`) with the Train run named after
the trial id, so a restarted trial resumes its own checkpoints.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ray import tune

from hlbd_ray.cli import parse_job_args
from hlbd_ray.cluster import require_state_api, start_ray
from hlbd_ray.config import Config, check_heads, from_dict, to_dict, to_yaml, validate
from hlbd_ray.errors import EXIT_FAILURE, EXIT_OK, UserError
from hlbd_ray.files import atomic_write_json, atomic_write_text
from hlbd_ray.metrics import finite_or_none
from hlbd_ray.run import build_trainer, preflight, storage_join, user_error_in
from hlbd_ray.search import (ARCH_KEY, LR_KEY, build_scheduler, build_searcher, decode_arch,
                             param_space)

# The per-trial driver actor only waits on its Train run; it gets a sliver of a CPU so
# that trials never hold the CPUs their own workers need (the few-CPU deadlock).
DRIVER_CPU = 0.01


@dataclass(frozen=True)
class TrialResources:
    worker_cpu: float        # what each Train worker asks for
    max_concurrent: int


def plan_resources(cfg: Config, cluster: dict[str, float]) -> TrialResources:
    """A trial reserves num_workers x cpus_per_worker CPUs in all, its driver included.

    The driver's sliver comes out of the workers' share, so a trial of one 1-CPU worker
    takes exactly one CPU and two such trials fit on two CPUs.
    """
    t, s = cfg.train, cfg.sweep
    worker_cpu = t.cpus_per_worker - DRIVER_CPU / t.num_workers
    if worker_cpu <= 0:
        raise UserError(f"train.cpus_per_worker={t.cpus_per_worker} is too small for a sweep "
                        f"(each trial's driver needs {DRIVER_CPU} CPU of it)")
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    per_trial_cpu = t.num_workers * t.cpus_per_worker
    per_trial_gpu = t.num_workers * t.gpus_per_worker
    fits = [math.floor(cpus / per_trial_cpu + 1e-9)]
    if per_trial_gpu > 0:
        fits.append(math.floor(gpus / per_trial_gpu + 1e-9))
    capacity = min(fits)
    if capacity < 1:
        raise UserError(
            f"one trial needs {per_trial_cpu:g} CPUs and {per_trial_gpu:g} GPUs "
            f"(train.num_workers x cpus_per_worker / gpus_per_worker) but the cluster has "
            f"{cpus:g} CPUs and {gpus:g} GPUs")
    wanted = s.max_concurrent_trials or capacity
    if wanted > capacity:
        print(f"note: sweep.max_concurrent_trials={wanted} lowered to {capacity}, "
              f"what the cluster can run at once", file=sys.stderr)
    return TrialResources(worker_cpu, min(wanted, capacity))


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The run config of one trial: the base config with its sampled architecture and lr."""
    d_model, num_heads = decode_arch(params[ARCH_KEY])
    check_heads(d_model, num_heads)
    model = replace(base.model, d_model=d_model, num_heads=num_heads)
    return replace(base, model=model, train=replace(base.train, lr=float(params[LR_KEY])))


def run_trial(params: dict[str, Any], base: dict[str, Any], data: list[Any], train_storage: str,
              worker_cpu: float) -> None:
    """Tune function trainable: one trial = one Ray Train run, reported through Tune."""
    from ray.train import TrainingFailedError
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(from_dict(base), params)
    trial_id = tune.get_context().get_trial_id()
    trainer = build_trainer(cfg, data[0], train_storage, trial_id, [TuneReportCallback()],
                            worker_cpu=worker_cpu)
    try:
        trainer.fit()
    except TrainingFailedError as err:
        cause = user_error_in(err)
        if cause is None:
            raise      # Tune records the Train error, whose last line names the cause
        # A user error inside a worker (e.g. a refused checkpoint): its one line is enough.
        raise RuntimeError(str(cause)) from None


class SweepStatus(tune.Callback):
    """One live line on the driver instead of Tune's full table every few seconds."""

    def __init__(self, metric: str, mode: str, every_s: float = 10.0):
        self.metric, self.mode, self.every_s = metric, mode, every_s
        self.best: dict[str, float] = {}      # each trial's best metric so far
        self.last_print = self.started = time.monotonic()

    def setup(self, **info: Any) -> None:
        # Also runs after a restore, where this object comes back from the tuner's pickle.
        self.last_print = self.started = time.monotonic()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        value = result.get(self.metric)
        if value is not None and better(value, self.best.get(trial.trial_id), self.mode):
            self.best[trial.trial_id] = value

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self.last_print >= self.every_s:
            self.print_line(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.print_line(trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.print_line(trials)

    def print_line(self, trials: list) -> None:
        self.last_print = time.monotonic()
        print(status_line(trials, self.best, self.metric, self.mode,
                          time.monotonic() - self.started), flush=True)


def better(value: float, than: float | None, mode: str) -> bool:
    return than is None or (value < than if mode == "min" else value > than)


def status_line(trials: list, best: dict[str, float], metric: str, mode: str,
                elapsed: float) -> str:
    counts = {"TERMINATED": 0, "RUNNING": 0, "PENDING": 0, "ERROR": 0, "PAUSED": 0}
    for trial in trials:
        counts[trial.status] = counts.get(trial.status, 0) + 1
    leader = None
    for trial in trials:
        value = best.get(trial.trial_id)
        if value is not None and (leader is None or better(value, best[leader.trial_id], mode)):
            leader = trial
    summary = "no result yet"
    if leader is not None:
        cfg = leader.config
        summary = (f"best {metric} {best[leader.trial_id]:.4f} "
                   f"({leader.trial_id}: {cfg[ARCH_KEY]}, lr {cfg[LR_KEY]:.2e})")
    minutes, seconds = divmod(int(elapsed), 60)
    return (f"[sweep {minutes:02d}:{seconds:02d}] {counts['TERMINATED']} done, {counts['ERROR']} errored, "
            f"{counts['RUNNING']} running, {counts['PENDING'] + counts['PAUSED']} pending | {summary}")


def build_tuner(cfg: Config, data_ref: Any, resources: TrialResources, callbacks: list[Any]):
    """A new Tuner, or the restored one when the experiment already exists in storage."""
    s = cfg.sweep
    experiment = storage_join(cfg.storage_path, s.name)
    # The data ref travels inside a list so Tune hands the reference, not the data, to
    # every trial: workers fetch it zero-copy from the object store.
    trainable = tune.with_parameters(
        run_trial, base=to_dict(cfg), data=[data_ref],
        train_storage=storage_join(experiment, "train"), worker_cpu=resources.worker_cpu)
    trainable = tune.with_resources(trainable, {"cpu": DRIVER_CPU})
    if tune.Tuner.can_restore(experiment):
        print(f"resuming the sweep in {experiment} (finished trials are kept)", flush=True)
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True,
                                  resume_errored=True, param_space=param_space(s))
    tune_config = tune.TuneConfig(
        metric=s.metric, mode=str(s.mode), num_samples=s.num_samples,
        search_alg=build_searcher(s, resources.max_concurrent), scheduler=build_scheduler(s, cfg.train.epochs),
        # The basic generator enforces the limit itself (see build_searcher).
        max_concurrent_trials=resources.max_concurrent if s.search == "optuna" else None,
        time_budget_s=s.time_budget_s or None,
        trial_dirname_creator=lambda trial: trial.trial_id)
    run_config = tune.RunConfig(
        name=s.name, storage_path=cfg.storage_path, verbose=0, callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=s.trial_max_failures))
    return tune.Tuner(trainable, param_space=param_space(s), tune_config=tune_config,
                      run_config=run_config)


def run_sweep_job(cfg: Config) -> int:
    """Validate everything that can be checked without Ray, then run (or resume) the sweep."""
    validate(cfg, sweep=True)
    cfg, data = preflight(cfg, cfg.sweep.name)
    report_dir = Path(cfg.output_dir) / cfg.sweep.name
    import ray

    from hlbd_ray.report import ReportAggregator

    start_ray(cfg.cluster)
    try:
        require_state_api()
        resources = plan_resources(cfg, ray.cluster_resources())
        print(f"sweep {cfg.sweep.name}: {cfg.sweep.num_samples} samples, {cfg.sweep.search} search, "
              f"{cfg.sweep.scheduler} scheduler, up to {resources.max_concurrent} trials at once; "
              f"reports in {report_dir}", flush=True)
        callbacks = [ReportAggregator(report_dir, cfg.report.points_per_epoch, cfg.report.every_s,
                                      data.dataset_stats),
                     SweepStatus(cfg.sweep.metric, str(cfg.sweep.mode))]
        results = build_tuner(cfg, ray.put(data), resources, callbacks).fit()
        return finish(cfg, results, report_dir)
    finally:
        ray.shutdown()


def main(argv: list[str]) -> int:
    """`jobs/sweep.py`: a num_heads x learning-rate sweep, Ray Tune over Ray Train."""
    return run_sweep_job(parse_job_args(argv, "sweep.yaml", description=main.__doc__ or ""))


def trial_rows(results: Any, metric: str, mode: str) -> list[dict[str, Any]]:
    """One summary row per trial, from Tune's own results (independent of our reports)."""
    rows = []
    for result in results:
        history = result.metrics_dataframe
        last = result.metrics or {}
        row: dict[str, Any] = {
            "trial_id": last.get("trial_id") or Path(result.path).name,
            "arch": result.config.get(ARCH_KEY), "lr": result.config.get(LR_KEY),
            "status": "ERROR" if result.error else "DONE",
            "epochs": last.get("epochs_done", 0), "time_s": last.get("time_total_s"),
            "best_metric": None, "best_val_loss": None, "best_val_ppl": None, "best_val_acc": None,
            "checkpoint": last.get("checkpoint_path"), "note": last.get("stop_reason") or "",
        }
        if result.error:
            row["note"] = str(result.error).strip().splitlines()[-1][:200]
        if history is not None and metric in history and history[metric].notna().any():
            column = history[metric]
            best = history.loc[column.idxmin() if mode == "min" else column.idxmax()]
            row.update(best_metric=finite_or_none(best[metric]),
                       best_val_loss=finite_or_none(best.get("val_loss")),
                       best_val_ppl=finite_or_none(best.get("val_ppl")),
                       best_val_acc=finite_or_none(best.get("val_acc")))
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'trial':<12} {'arch':<8} {'lr':>9} {'status':<6} {'epochs':>6} {'val_loss':>9} " \
             f"{'val_ppl':>9} {'val_acc':>8} {'time_s':>7}  note"
    print("\n" + header)
    for r in rows:
        def num(key: str, spec: str) -> str:
            value = r.get(key)
            return "-" if value is None or value != value else format(value, spec)
        print(f"{r['trial_id']:<12} {r['arch'] or '-':<8} {num('lr', '.2e'):>9} {r['status']:<6} "
              f"{r['epochs']:>6} {num('best_val_loss', '.4f'):>9} {num('best_val_ppl', '.3f'):>9} "
              f"{num('best_val_acc', '.4f'):>8} {num('time_s', '.0f'):>7}  {r['note']}")


def finish(cfg: Config, results: Any, exp_dir: Path) -> int:
    """Print the trials table, save the best config; exit 1 only if every trial failed."""
    s = cfg.sweep
    rows = trial_rows(results, s.metric, s.mode)
    print_table(rows)
    scored = [r for r in rows if r["best_metric"] is not None]
    if scored:
        pick = min if s.mode == "min" else max
        best = pick(scored, key=lambda r: r["best_metric"])
        best_cfg = trial_config(cfg, {ARCH_KEY: best["arch"], LR_KEY: best["lr"]})
        atomic_write_text(exp_dir / "best_config.yaml", to_yaml(best_cfg))
        atomic_write_json(exp_dir / "best.json", {k: best[k] for k in (
            "trial_id", "arch", "lr", "best_metric", "best_val_loss", "best_val_ppl", "best_val_acc",
            "epochs", "checkpoint")})
        print(f"\nbest trial {best['trial_id']}: {best['arch']} lr {best['lr']:.3e} "
              f"{s.metric} {best['best_metric']:.4f}\n  config     {exp_dir / 'best_config.yaml'}\n"
              f"  checkpoint {best['checkpoint']}")
    errored = [r for r in rows if r["status"] == "ERROR"]
    if rows and len(errored) == len(rows):
        print(f"\nevery trial failed ({len(rows)}); first error: {errored[0]['note']}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK

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

from hlbd_ray import live
from hlbd_ray.capacity import check_placeable
from hlbd_ray.cli import parse_job_args
from hlbd_ray.cluster import START_TIMEOUT_ENV, require_state_api, start_ray
from hlbd_ray.config import Config, SweepConfig, check_heads, from_dict, to_dict, validate
from hlbd_ray.console import BUDGET, INTERRUPTED, SweepStatus, driver_log
from hlbd_ray.errors import UserError
from hlbd_ray.lifecycle import (STALL_FLOOR_S, Interrupt, StallWatchdog, SweepInterrupted,
                                resume_hint)
from hlbd_ray.placement import PlacementGroupKeeper, describe, trial_tag
from hlbd_ray.run import build_trainer, preflight, storage_join, user_error_in, with_cluster_precision
from hlbd_ray.summary import finish
from hlbd_ray.search import (ARCH_KEY, LR_KEY, build_scheduler, build_searcher, decode_arch,
                             param_space)

# The per-trial driver actor only waits on its Train run; it gets a sliver of a CPU so
# that trials never hold the CPUs their own workers need (the few-CPU deadlock).
DRIVER_CPU = 0.01


@dataclass(frozen=True)
class TrialResources:
    worker_cpu: float        # what each Train worker asks for
    max_concurrent: int


def plan_resources(cfg: Config, cluster: dict[str, float],
                   nodes: list[dict[str, Any]] | None = None) -> TrialResources:
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
    if nodes is not None:      # ray.nodes(): a trial's workers must fit the nodes as placed
        capacity = min(capacity, check_placeable(nodes, t.num_workers, t.cpus_per_worker, t.gpus_per_worker))
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
    import ray
    from ray.train import TrainingFailedError
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(from_dict(base), params)
    trial_id = tune.get_context().get_trial_id()
    # The mark lets the sweep driver free this trial's placement groups (placement.py).
    mark = trial_tag(trial_id, ray.get_runtime_context().get_actor_id())
    trainer = build_trainer(cfg, data[0], train_storage, trial_id, [TuneReportCallback()],
                            worker_cpu=worker_cpu, label_selector=mark)
    try:
        trainer.fit()
    except TrainingFailedError as err:
        cause = user_error_in(err)
        if cause is None:
            raise      # Tune records the Train error, whose last line names the cause
        # A user error inside a worker (e.g. a refused checkpoint): its one line is enough.
        raise RuntimeError(str(cause)) from None


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
    """Validate everything that can be checked without Ray, then run (or resume) the sweep.

    Exit codes: 0 done, 1 every trial failed, 2 user error, 3 stalled, 130 SIGINT (Ctrl-C),
    143 SIGTERM; after 3, 130 and 143 the same command resumes the sweep.
    """
    validate(cfg, sweep=True)
    cfg, data = preflight(cfg, cfg.sweep.name)
    report_dir = Path(cfg.output_dir) / cfg.sweep.name
    interrupt = Interrupt()
    with interrupt.installed(), driver_log(report_dir / "sweep.log"):
        try:
            return run_sweep(cfg, data, report_dir, interrupt)
        except SweepInterrupted as stop:
            print(resume_hint(stop.reason), file=sys.stderr, flush=True)
            return stop.code


def start_timeout_s(sweep: SweepConfig) -> float:
    """Train's worker-group start timeout in a sweep: a trial whose workers wait for CPUs
    that another trial is about to free is not failing. The stall watchdog, which sees
    the whole sweep, is what ends a real stall; this only keeps a start bounded."""
    return sweep.stall_timeout_s if sweep.stall_timeout_s > 0 else STALL_FLOOR_S


def run_sweep(cfg: Config, data: Any, report_dir: Path, interrupt: Interrupt) -> int:
    import ray

    from hlbd_ray.report import ReportAggregator

    s = cfg.sweep
    start_ray(cfg.cluster, {START_TIMEOUT_ENV: f"{start_timeout_s(s):g}"},
              setup_hook="hlbd_ray.console.quiet_expected_events")
    interrupt.take_signals()
    try:
        require_state_api()
        resources = plan_resources(cfg, ray.cluster_resources(), ray.nodes())
        cfg = with_cluster_precision(cfg)      # one precision for every trial
        print(f"sweep {s.name}: {s.num_samples} samples, {s.search} search, {s.scheduler} scheduler, "
              f"up to {resources.max_concurrent} trials at once; reports in {report_dir}", flush=True)
        status = live.register("status", SweepStatus(s.metric, s.mode, max_epochs=cfg.train.epochs,
                                                     scheduler=s.scheduler))
        keeper = live.register("placements", PlacementGroupKeeper())
        watchdog = live.register("watchdog", StallWatchdog(interrupt, s.stall_timeout_s))
        callbacks = [ReportAggregator(report_dir, cfg.report.points_per_epoch, cfg.report.every_s,
                                      data.dataset_stats), status, keeper, watchdog]
        tuner = build_tuner(cfg, ray.put(data), resources, callbacks)
        with interrupt.tune_fit():
            results = tuner.fit()
        left = keeper.settle()
        for group in left:
            print(f"placement group left after the sweep: {describe(group)}", file=sys.stderr)
        cut_short = INTERRUPTED if interrupt.reason or not s.time_budget_s else BUDGET
        code = finish(cfg, results, report_dir,
                      outcome=lambda tid, errored: status.outcome(tid, errored, cut_short),
                      stopped_by=interrupt.reason, stop_code=interrupt.code,
                      placement=keeper.summary(len(left)))
        if interrupt.reason:
            print(resume_hint(interrupt.reason), file=sys.stderr, flush=True)
        return code
    finally:
        live.clear()
        ray.shutdown()


def main(argv: list[str]) -> int:
    """`jobs/sweep.py`: a num_heads x learning-rate sweep, Ray Tune over Ray Train."""
    return run_sweep_job(parse_job_args(argv, "sweep.yaml", description=main.__doc__ or ""))

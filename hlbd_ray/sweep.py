"""The sweep: Ray Tune over Ray Train, resumable, sized so trials can never deadlock.

Each Tune trial runs a small driver function that decodes its architecture, then runs
the training function on Ray Train (`TorchTrainer.fit`) with the Train run named after
the trial id, so a restarted trial resumes its own checkpoints.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import FIFOScheduler

from hlbd_ray import live
from hlbd_ray.capacity import check_placeable
from hlbd_ray.cli import parse_job_args
from hlbd_ray.cluster import START_TIMEOUT_ENV, require_state_api, start_ray
from hlbd_ray.config import Config, SweepConfig, to_dict, validate
from hlbd_ray.confirm import candidates as confirm_candidates
from hlbd_ray.console import BUDGET, INTERRUPTED, SweepStatus, driver_log
from hlbd_ray.errors import UserError
from hlbd_ray.lifecycle import STALL_FLOOR_S, Interrupt, StallWatchdog, SweepInterrupted, resume_hint
from hlbd_ray.placement import PlacementGroupKeeper, describe
from hlbd_ray.search import (
    build_scheduler,
    build_searcher,
    confirm_space,
    num_trials,
    param_space,
    search_trials,
)
from hlbd_ray.search_restore import RestoredVariantGenerator, restorable_search
from hlbd_ray.summary import finish
from hlbd_ray.trainer import preflight, retained_checkpoints, runs_that_fit, storage_join, with_cluster_precision
from hlbd_ray.trial import run_trial, stoppable_trial, trial_config  # noqa: F401  (trial_config: part of this module's interface)

TRAIN_DIR = "train"       # every trial's Train run (named by its trial id), inside the sweep's folder
CONFIRM_DIR = "confirm"   # the confirmation stage's Tune experiment, inside the sweep's folder

# The per-trial driver actor only waits on its Train run; it gets a sliver of a CPU so
# that trials never hold the CPUs their own workers need (the few-CPU deadlock).
DRIVER_CPU = 0.01

# Tune waits this long at most for one upload of the experiment state to storage (Ray's
# default: 30 min). Tune's last save waits before it frees the trials' actors; once, with
# S3 storage, a sweep hung there (tests/test_s3.py in CI: by the Ray logs, its driver
# stopped after the last trial ended, before Tune's "Wrote the latest version" line).
# A stuck upload now costs at most this, logged as an error, and the sweep ends.
STATE_SYNC_TIMEOUT_S = 120


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
    capacity = runs_that_fit(t, cluster, "one trial")
    if nodes is not None:      # ray.nodes(): a trial's workers must fit the nodes as placed
        capacity = min(capacity, check_placeable(nodes, t.num_workers, t.cpus_per_worker, t.gpus_per_worker))
    wanted = s.max_concurrent_trials or capacity
    if wanted > capacity:
        print(f"note: sweep.max_concurrent_trials={wanted} lowered to {capacity}, "
              f"what the cluster can run at once", file=sys.stderr)
    return TrialResources(worker_cpu, min(wanted, capacity))


def build_tuner(cfg: Config, data_ref: Any, resources: TrialResources, callbacks: list[Any],
                candidates: list[tuple[str, float]] | None = None):
    """A new Tuner, or the restored one when the experiment already exists in storage.

    With `candidates`, the confirmation stage: a second Tune experiment in the sweep's
    folder (`<sweep>/confirm`), every candidate once per fresh seed, FIFO, the same
    trainable, resources and callbacks (so one report and one dashboard show both
    stages). Being its own experiment, it resumes on its own; the candidates are a
    function of the finished search, so a resumed sweep rebuilds the same space.
    """
    s = cfg.sweep
    experiment = experiment_path(cfg)
    # The data ref travels inside a list so Tune hands the reference, not the data, to
    # every trial: workers fetch it zero-copy from the object store.
    trainable = tune.with_parameters(
        run_trial, base=to_dict(cfg), data=[data_ref],
        train_storage=storage_join(experiment, TRAIN_DIR), worker_cpu=resources.worker_cpu)
    trainable = stoppable_trial(tune.with_resources(trainable, {"cpu": DRIVER_CPU}))
    if candidates is None:
        storage, name, space = cfg.resolved_storage_path(), s.name, param_space(s)
        search_alg = restorable_search(build_searcher(s, resources.max_concurrent), resources.max_concurrent)
        scheduler = build_scheduler(s, cfg.train.epochs, resources.max_concurrent)
        num_samples, budget = num_trials(s), s.time_budget_s or None
    else:
        # Its own (storage_path, name) pair rather than a name with a slash: a restored
        # experiment named "sweep/confirm" persisted its new trials nowhere (seen on Ray 2.60).
        storage, name = experiment, CONFIRM_DIR
        space = confirm_space(candidates, first_copy=s.repeats, seeds=s.confirm.seeds)
        search_alg = RestoredVariantGenerator(random_state=s.seed, max_concurrent=resources.max_concurrent)
        scheduler, num_samples, budget = FIFOScheduler(), 1, None
    path = storage_join(storage, name)
    if tune.Tuner.can_restore(path):
        stage = "the sweep" if candidates is None else "the confirmation"
        print(f"resuming {stage} in {path} (finished trials are kept)", flush=True)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True,
                                  resume_errored=True, param_space=space)
    tune_config = tune.TuneConfig(
        metric=s.metric, mode=str(s.mode), num_samples=num_samples, search_alg=search_alg,
        scheduler=scheduler, time_budget_s=budget,
        trial_dirname_creator=lambda trial: trial.trial_id, reuse_actors=s.reuse_actors)
    return tune.Tuner(trainable, param_space=space, tune_config=tune_config,
                      run_config=run_config(s, storage, name, callbacks))


def run_config(s: SweepConfig, storage: str, name: str, callbacks: list[Any]) -> tune.RunConfig:
    """Tune's run config; it is saved with the experiment, so a resumed sweep keeps it."""
    return tune.RunConfig(
        name=name, storage_path=storage, verbose=0, callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=s.trial_max_failures),
        sync_config=tune.SyncConfig(sync_timeout=STATE_SYNC_TIMEOUT_S))


@dataclass
class SweepHooks:
    """What a caller adds to a sweep (bench/sweep.py times one this way): more Tune
    callbacks, env vars and a setup function for every Ray worker process (it replaces
    the default one, `quiet_expected_events`, so it should call that itself), and the
    dashboard port of a local cluster (0: Ray's default)."""

    callbacks: list[Any] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    worker_setup: str | Callable[[], None] = "hlbd_ray.console.quiet_expected_events"
    dashboard_port: int = 0


def run_sweep_job(cfg: Config) -> int:
    """Validate everything that can be checked without Ray, then run (or resume) the sweep.

    Exit codes: 0 done, 1 every trial failed, 2 user error, 3 stalled, 130 SIGINT (Ctrl-C),
    143 SIGTERM; after 3, 130 and 143 the same command resumes the sweep.
    """
    started = time.time()
    validate(cfg, sweep=True)
    cfg, data = preflight(cfg, cfg.sweep.name)
    report_dir = Path(cfg.output_dir) / cfg.sweep.name
    interrupt = Interrupt()
    with interrupt.installed(), driver_log(report_dir / "sweep.log"):
        try:
            return run_sweep(cfg, data, report_dir, interrupt, started=started)
        except SweepInterrupted as stop:
            print(resume_hint(stop.reason), file=sys.stderr, flush=True)
            return stop.code


def start_timeout_s(sweep: SweepConfig) -> float:
    """Train's worker-group start timeout in a sweep: a trial whose workers wait for CPUs
    that another trial is about to free is not failing. The stall watchdog, which sees
    the whole sweep, is what ends a real stall; this only keeps a start bounded."""
    return sweep.stall_timeout_s if sweep.stall_timeout_s > 0 else STALL_FLOOR_S


def experiment_path(cfg: Config) -> str:
    """The sweep's Tune experiment in storage; its trials' Train runs are in TRAIN_DIR."""
    return storage_join(cfg.resolved_storage_path(), cfg.sweep.name)


def tensorboard_dir(cfg: Config) -> str:
    """Where Tune writes each trial's event files: the experiment folder in storage."""
    experiment = experiment_path(cfg)
    return experiment if "://" in experiment else str(Path(experiment).resolve())


def run_sweep(cfg: Config, data: Any, report_dir: Path, interrupt: Interrupt,
              hooks: SweepHooks | None = None, started: float = 0.0) -> int:
    """The sweep on a new local cluster (or the one named in cfg.cluster), then its
    summary; `started` (time.time()) is when the job began, for the driver's wall time."""
    import ray

    from hlbd_ray.report import ReportAggregator
    from hlbd_ray.tables import REPORT_DIR

    s, hooks = cfg.sweep, hooks or SweepHooks()
    start_ray(cfg.cluster, {START_TIMEOUT_ENV: f"{start_timeout_s(s):g}", **hooks.env},
              setup_hook=hooks.worker_setup, dashboard_port=hooks.dashboard_port)
    interrupt.take_signals()
    try:
        require_state_api()
        resources = plan_resources(cfg, ray.cluster_resources(), ray.nodes())
        cfg = with_cluster_precision(cfg)      # one precision for every trial
        confirm = (f", then {s.confirm.top_k} configs x {s.confirm.seeds} seeds confirmed"
                   if s.confirm.top_k else "")
        print(f"sweep {s.name}: {search_trials(s)} trials, {s.search} search, {s.scheduler} scheduler"
              f"{confirm}, up to {resources.max_concurrent} trials at once; reports in {report_dir}",
              flush=True)
        status = live.register("status", SweepStatus(s.metric, s.mode, max_epochs=cfg.train.epochs,
                                                     scheduler=s.scheduler))
        keeper = live.register("placements", PlacementGroupKeeper())
        watchdog = live.register("watchdog", StallWatchdog(interrupt, s.stall_timeout_s))
        callbacks = [ReportAggregator(report_dir, cfg.report.points_per_epoch, cfg.report.every_s,
                                      data.dataset_stats, live_page=True),
                     status, keeper, watchdog, *hooks.callbacks]
        print(f"live report (reloads itself): {(report_dir / 'report' / 'index.html').resolve()}\n"
              f"TensorBoard (pip install '.[tensorboard]'): tensorboard --logdir "
              f"{tensorboard_dir(cfg)}", flush=True)
        data_ref = ray.put(data)
        tuner = build_tuner(cfg, data_ref, resources, callbacks)
        with interrupt.tune_fit():
            results = list(tuner.fit())
        if s.confirm.top_k and not interrupt.reason:
            results += confirm_stage(cfg, results, data_ref, resources, callbacks, interrupt)
        left = keeper.settle()
        for group in left:
            print(f"placement group left after the sweep: {describe(group)}", file=sys.stderr)
        cut_short = INTERRUPTED if interrupt.reason or not s.time_budget_s else BUDGET
        code = finish(cfg, results, report_dir,
                      outcome=lambda tid, errored: status.outcome(tid, errored, cut_short),
                      stopped_by=interrupt.reason, stop_code=interrupt.code,
                      placement=keeper.summary(len(left)), started=started or time.time(),
                      checkpoints=best_checkpoint_record(experiment_path(cfg), report_dir / REPORT_DIR))
        if interrupt.reason:
            print(resume_hint(interrupt.reason), file=sys.stderr, flush=True)
        return code
    finally:
        live.clear()
        ray.shutdown()


def best_checkpoint_record(experiment: str, report_dir: Path) -> dict[tuple[str, int], str]:
    """(trial id, epoch) -> checkpoint, for best.json: Ray Train's record of the checkpoints
    it kept under the `experiment` (they exist), then the report aggregator's (the epochs
    the driver saw). The first covers a trial that finished while the driver was down."""
    from hlbd_ray.tables import epoch_checkpoints

    return {**epoch_checkpoints(report_dir), **retained_checkpoints(storage_join(experiment, TRAIN_DIR))}


def confirm_stage(cfg: Config, search: list[Any], data_ref: Any, resources: TrialResources,
                  callbacks: list[Any], interrupt: Interrupt) -> list[Any]:
    """Retrain the search's top configs over fresh seeds (confirm.py); their results."""
    from hlbd_ray.summary import final_table_rows

    s = cfg.sweep
    picked = confirm_candidates(final_table_rows(search, s.metric, str(s.mode)), s.confirm.top_k, str(s.mode))
    if not picked:
        print("confirmation skipped: no search trial has a validation score", file=sys.stderr)
        return []
    print(f"confirmation: {len(picked)} configs x {s.confirm.seeds} seeds at the full "
          f"{cfg.train.epochs} epochs: " + ", ".join(f"{a} lr {lr:.2e}" for a, lr in picked), flush=True)
    tuner = build_tuner(cfg, data_ref, resources, callbacks, candidates=picked)
    with interrupt.tune_fit():
        return list(tuner.fit())


def main(argv: list[str]) -> int:
    """`jobs/sweep.py`: a num_heads x learning-rate sweep, Ray Tune over Ray Train."""
    return run_sweep_job(parse_job_args(argv, "sweep.yaml", description=main.__doc__ or ""))

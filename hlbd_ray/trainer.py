"""One run on Ray Train, as a library: the checks before Ray starts, whether a run fits
the cluster, and the TorchTrainer. Used by the training job (`hlbd_ray.run`) and, per
trial, by the sweep. The data are prepared once by the caller and handed over as an
object-store reference, so workers (and trials) share one tokenized copy instead of
re-reading the files.
"""

from __future__ import annotations

import math
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hlbd_ray.config import Config, Precision, TrainConfig, to_dict
from hlbd_ray.errors import UserError
from hlbd_ray.files import ensure_writable_dir
from hlbd_ray.storage import storage_join  # noqa: F401  (part of this library's interface)

if TYPE_CHECKING:
    from hlbd_ray.data import PreparedData

# The modules that import torch (data, datareport, model, optim, session, train) are
# imported inside the functions that need them: a sweep trial's process imports this
# module to build its trainer and should not pay for torch (hlbd_ray/trial.py).


def preflight(cfg: Config, folder: str | None = None) -> tuple[Config, PreparedData]:
    """Everything that can be checked without Ray, so user errors surface before it starts.

    Returns the config with absolute local paths (workers and trials run in other
    working directories) and train.max_len resolved to the length the data were cut at,
    and the prepared data. Only once the data passed its checks: the data line and table
    are printed and dataset_report.json is written to output_dir/`folder` (default
    `name`; a sweep passes sweep.name). A bad input leaves no output behind.
    """
    from hlbd_ray.data import prepare_data
    from hlbd_ray.datareport import format_table, write_report
    from hlbd_ray.model import resolve_factory
    from hlbd_ray.optim import run_length

    if cfg.model.factory:
        resolve_factory(cfg.model.factory)
    t = cfg.train
    data = prepare_data(cfg.data, t.max_len, max_len_cap=t.max_len_cap, allow_truncation=t.allow_truncation)
    run_length(t, data.train, t.num_workers)  # refuses a warmup as long as the run
    output_dir = str(ensure_writable_dir(cfg.output_dir))
    storage = cfg.storage_path or output_dir
    if "://" not in storage:
        storage = str(ensure_writable_dir(storage))
    report = write_report(Path(output_dir) / (folder or cfg.name), data.dataset_stats)
    print(f"{describe_data(data.dataset_stats)}\n{format_table(data.dataset_stats)}\n"
          f"data report: {report}", flush=True)
    resolved = replace(cfg, train=replace(t, max_len=data.dataset_stats["max_len"]))
    return replace(resolved, output_dir=output_dir, storage_path=storage), data


def describe_data(stats: dict[str, Any]) -> str:
    """One line on what the run trains on, with how many answers max_len cuts: a cut is never silent."""
    sources = ", ".join(f["source"] for f in stats["files"])
    truncated = stats["truncated_train"] + stats["truncated_val"]
    split = stats["split"]
    return (f"data: {stats['train_pairs']} train / {stats['val_pairs']} validation pairs "
            f"({split['train']['facts']} / {split['val']['facts']} facts, split by fact) from "
            f"{sources}; vocabulary {stats['vocab_size']}; max_len {stats['max_len']} cuts "
            f"{truncated} answers")


def runs_that_fit(t: TrainConfig, cluster: dict[str, float], what: str = "one run") -> int:
    """How many runs of `t` the cluster holds at once; a UserError when not even one
    fits (Ray would wait forever for its workers)."""
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    per_run_cpu = t.num_workers * t.cpus_per_worker
    per_run_gpu = t.num_workers * t.gpus_per_worker
    fits = [math.floor(cpus / per_run_cpu + 1e-9)]
    if per_run_gpu > 0:
        fits.append(math.floor(gpus / per_run_gpu + 1e-9))
    if min(fits) < 1:
        raise UserError(
            f"{what} needs {per_run_cpu:g} CPUs and {per_run_gpu:g} GPUs "
            f"(train.num_workers x cpus_per_worker / gpus_per_worker) but the cluster has "
            f"{cpus:g} CPUs and {gpus:g} GPUs")
    return min(fits)


def build_trainer(cfg: Config, data: Any, storage_path: str, name: str,
                  callbacks: list[Any] | None = None, worker_cpu: float | None = None,
                  label_selector: dict[str, str] | None = None,
                  controller_in_process: bool = False, lean: bool = False):
    """A TorchTrainer for one run; `data` is a PreparedData or its ObjectRef.

    `worker_cpu` overrides what each worker asks for (a sweep trial's driver takes a
    sliver of the trial's CPUs); threads still follow train.cpus_per_worker.
    `label_selector` goes to every worker and every bundle of the run's placement
    groups (a sweep trial marks its groups with it, see placement.py).
    `controller_in_process` and `lean`: see `trainer_class` (sweep trials only).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    from hlbd_ray.train import train_loop_per_worker

    TorchTrainer = trainer_class(controller_in_process, lean)

    # ray.train binds its Train V2 classes (our runtime: V2 is the default) only under
    # `if is_v2_enabled():`, so type checkers see the V1 ScalingConfig/RunConfig, which lack
    # label_selector and logging_config: hence the two `type: ignore[call-arg]` below.
    t = cfg.train
    resources = {"CPU": worker_cpu if worker_cpu is not None else t.cpus_per_worker}
    if t.gpus_per_worker > 0:
        resources["GPU"] = t.gpus_per_worker
    scaling = ScalingConfig(num_workers=t.num_workers, use_gpu=t.gpus_per_worker > 0,
                            resources_per_worker=resources, label_selector=label_selector)  # type: ignore[call-arg]
    run_config = RunConfig(
        name=name, storage_path=storage_path,
        failure_config=FailureConfig(max_failures=t.max_failures),
        # The best `checkpoints_to_keep` by the validation metric; Ray Train also never
        # deletes the newest one, which is what a retry or a resumed trial continues from.
        checkpoint_config=CheckpointConfig(
            num_to_keep=t.checkpoints_to_keep, checkpoint_score_attribute="checkpoint_score",
            checkpoint_score_order=str(cfg.sweep.mode)),
        callbacks=callbacks or [],
        # Ray Train logs every report at INFO; our metrics file and reports hold them.
        logging_config=LoggingConfig(log_level="WARNING"))  # type: ignore[call-arg]
    return TorchTrainer(train_loop_per_worker, scaling_config=scaling, run_config=run_config,
                        train_loop_config={"config": to_dict(cfg), "data": data})


def trainer_class(controller_in_process: bool = False, lean: bool = False) -> type:
    """Ray's TorchTrainer, or a subclass that starts fewer Ray processes per run.

    Ray 2.60 has no public switch for either; both override private TrainTrainer hooks
    (`_initialize_and_run_controller`, `_create_default_callbacks`, data_parallel_trainer.py):
    - controller_in_process: run Train's `TrainController` (an asyncio loop) in the calling
      thread instead of in an actor of its own, as Train's local mode does for its own
      controller. In a sweep the caller is the Tune trial actor, which the controller
      actor was a child of anyway: it lives and dies with the trial either way.
    - lean: leave out the DatasetsCallback when the run has no Ray Data datasets (it
      starts a DatasetManager actor regardless) and the PlacementGroupCleanerCallback (a
      detached actor per run that removes the run's placement group if the controller
      dies; in a sweep the driver's PlacementGroupKeeper does that, see placement.py).
    """
    from ray.train.torch import TorchTrainer

    if not (controller_in_process or lean):
        return TorchTrainer

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
            from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

            callbacks = super()._create_default_callbacks()  # type: ignore[misc]  # V2 hook: mypy sees V1
            if not lean:
                return callbacks
            unused = (PlacementGroupCleanerCallback,) + (() if self.datasets else (DatasetsCallback,))
            return [c for c in callbacks if not isinstance(c, unused)]

        def _initialize_and_run_controller(self, **controller_init_kwargs: Any) -> Any:
            if not controller_in_process:
                return super()._initialize_and_run_controller(**controller_init_kwargs)  # type: ignore[misc]  # V2 hook
            from ray.train.v2._internal.execution.controller import TrainController

            return run_controller_here(TrainController(**controller_init_kwargs))

    return LeanTorchTrainer


# How often the in-process controller's loop looks at Tune's stop request.
STOP_POLL_S = 0.05


def run_controller_here(controller: Any) -> Any:
    """Train's controller loop in the calling thread, ended early when Tune stops the trial.

    When Tune stops a trial (ASHA), it sets its session's stop event and ends the trial's
    actor. Ray's core worker must not shut down under this thread's `ray.wait` (the
    controller polls its workers with it): that was the "free(): double free" SIGABRT of
    BENCHMARKS.md section 3. So the loop is cancelled at its next await once the event is
    set, and the thread ends quietly (SystemExit 0, which Tune's runner thread takes as a
    clean end), while the trial's cleanup waits for it (trial.joined_on_stop)."""
    import asyncio

    from ray.train._internal.session import get_session

    session = get_session()
    stop = session.stop_event if session is not None else threading.Event()

    async def until_done_or_stopped() -> bool:
        run = asyncio.ensure_future(controller.run())
        while not run.done():
            if stop.is_set():
                run.cancel()
                await asyncio.wait({run})
                return False
            await asyncio.wait({run}, timeout=STOP_POLL_S)
        run.result()      # the controller's own error, if it raised one
        return True

    if not asyncio.run(until_done_or_stopped()):
        raise SystemExit(0)
    return controller.get_result()


def user_error_in(err: BaseException) -> UserError | None:
    """The UserError behind a training failure, if a worker raised one (e.g. a bad checkpoint)."""
    failures = list(getattr(err, "worker_failures", {}).values())
    for candidate in [err, *failures]:
        depth = 0
        while candidate is not None and depth < 10:
            if isinstance(candidate, UserError):
                return candidate
            cause = getattr(candidate, "cause", None)
            candidate = cause if isinstance(cause, BaseException) else candidate.__cause__
            depth += 1
    return None


def with_cluster_precision(cfg: Config) -> Config:
    """The config with train.precision resolved once for the workers' hardware (Ray running),
    so every trial of a sweep runs, and is compared, at the same precision."""
    from hlbd_ray.precision import resolve_on_cluster

    t = cfg.train
    precision = resolve_on_cluster(str(t.precision), t.cpus_per_worker, t.gpus_per_worker)
    if t.precision == Precision.auto:
        print(f"precision: auto is {precision} on the workers' hardware", flush=True)
    return replace(cfg, train=replace(t, precision=Precision(precision)))


# Ray Train's record of a run's retained checkpoints, in the run's storage folder.
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def retained_checkpoints(train_storage: str) -> dict[tuple[str, int], str]:
    """(run name, epoch) -> checkpoint path, for every checkpoint Ray Train still keeps
    under `train_storage` (a sweep's trials are runs named by their trial ids).

    Paths are on the storage's filesystem, as Ray reports them. This is the record that
    survives the driver: a trial that finished while the sweep's driver was down reaches
    the resumed driver only through Tune's result log, which can lack the checkpoint."""
    import json

    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(train_storage)
    runs = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    found: dict[tuple[str, int], str] = {}
    for run in (r for r in runs if r.type == pyarrow.fs.FileType.Directory):
        snapshot = f"{run.path}/{SNAPSHOT_FILE}"
        if fs.get_file_info(snapshot).type != pyarrow.fs.FileType.File:
            continue      # a run that has not reported a checkpoint yet
        with fs.open_input_stream(snapshot) as handle:
            text = handle.read()
        try:
            state = json.loads(text)
        except json.JSONDecodeError as err:      # e.g. cut short by a killed run: its report record stands
            print(f"note: Ray Train's checkpoint record {snapshot} is unreadable ({err}); skipped",
                  file=sys.stderr, flush=True)
            continue
        for result in state.get("checkpoint_results", []):
            epoch = (result.get("metrics") or {}).get("epoch")
            if epoch is not None:
                found[(run.base_name, int(epoch))] = f"{run.path}/{result['checkpoint_dir_name']}"
    return found

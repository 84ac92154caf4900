"""One training run on Ray Train: preflight checks, the TorchTrainer, its run folder.

Used directly by `jobs/train.py` and, per trial, by the sweep. The data are prepared once
by the caller and handed over as an object-store reference, so workers (and trials) share
one tokenized copy instead of re-reading the files.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from hlbd_ray.capacity import check_placeable
from hlbd_ray.cli import parse_job_args
from hlbd_ray.cluster import start_ray
from hlbd_ray.config import Config, Precision, TrainConfig, to_dict, to_yaml
from hlbd_ray.data import PreparedData, prepare_data
from hlbd_ray.datareport import format_table, write_report
from hlbd_ray.errors import EXIT_FAILURE, EXIT_OK, UserError
from hlbd_ray.files import atomic_write_json, atomic_write_text, ensure_writable_dir
from hlbd_ray.model import resolve_factory
from hlbd_ray.optim import run_length
from hlbd_ray.session import resolve_on_cluster
from hlbd_ray.storage import storage_join  # noqa: F401  (re-exported: sweep and tests import it here)


def preflight(cfg: Config, folder: str | None = None) -> tuple[Config, PreparedData]:
    """Everything that can be checked without Ray, so user errors surface before it starts.

    Returns the config with absolute local paths (workers and trials run in other
    working directories) and train.max_len resolved to the length the data were cut at,
    and the prepared data. Only once the data passed its checks: the data line and table
    are printed and dataset_report.json is written to output_dir/`folder` (default
    `name`; a sweep passes sweep.name). A bad input leaves no output behind.
    """
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


def make_metrics_callback(queue: Any):
    """A Ray Train callback forwarding each report to the driver through `queue`.

    Ray Train runs callbacks in its controller actor, a process of its own (on the
    driver's node in Ray 2.60, but that is Train's choice, not a contract), so it writes
    no file: the driver's MetricsWriter does. The put returns once the queue holds the
    record, so every report is queued before `fit()` returns.
    """
    from ray.train import UserCallback

    class ForwardReports(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            record = dict(metrics[0])
            record["checkpoint_path"] = checkpoint.path if checkpoint else None
            queue.put(record, timeout=REPORT_PUT_TIMEOUT_S)

    return ForwardReports()


# A queue actor that does not take a report in this long is gone: the run fails loudly.
REPORT_PUT_TIMEOUT_S = 120.0


class MetricsWriter:
    """On the driver: drains the report queue into metrics.jsonl from a background thread.

    One write call per whole line, appended: a reader sees whole lines (it may miss the
    newest), and a resumed run appends after the lines already there.
    """

    def __init__(self, path: Path, queue: Any, poll_s: float = 0.5) -> None:
        import threading

        self.path, self.queue, self.poll_s = path, queue, poll_s
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._drain, name="metrics-writer", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> "MetricsWriter":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        self.thread.join(timeout=60)
        if self.thread.is_alive():
            print(f"warning: {self.path} may miss reports: its writer did not finish in 60 s",
                  file=sys.stderr)
        if self.error is not None:
            if exc[0] is None:
                raise RuntimeError(f"writing {self.path} failed") from self.error
            print(f"writing {self.path} failed too: {self.error!r}", file=sys.stderr)

    def _drain(self) -> None:
        try:
            self._drain_queue()
        except BaseException as err:   # re-raised on the driver's thread by __exit__
            self.error = err

    def _drain_queue(self) -> None:
        from ray.util.queue import Empty

        while True:
            finishing = self.done.is_set()     # read before the get: nothing put is missed
            try:
                record = self.queue.get(timeout=self.poll_s)
            except Empty:
                if finishing:
                    return
                continue
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, allow_nan=False) + "\n")


def build_trainer(cfg: Config, data: Any, storage_path: str, name: str,
                  callbacks: list[Any] | None = None, worker_cpu: float | None = None,
                  label_selector: dict[str, str] | None = None):
    """A TorchTrainer for one run; `data` is a PreparedData or its ObjectRef.

    `worker_cpu` overrides what each worker asks for (a sweep trial's driver takes a
    sliver of the trial's CPUs); threads still follow train.cpus_per_worker.
    `label_selector` goes to every worker and every bundle of the run's placement
    groups (a sweep trial marks its groups with it, see placement.py).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from hlbd_ray.train import train_loop_per_worker

    t = cfg.train
    resources = {"CPU": worker_cpu if worker_cpu is not None else t.cpus_per_worker}
    if t.gpus_per_worker > 0:
        resources["GPU"] = t.gpus_per_worker
    scaling = ScalingConfig(num_workers=t.num_workers, use_gpu=t.gpus_per_worker > 0,
                            resources_per_worker=resources, label_selector=label_selector)
    run_config = RunConfig(
        name=name, storage_path=storage_path,
        failure_config=FailureConfig(max_failures=t.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=t.checkpoints_to_keep),
        callbacks=callbacks or [],
        # Ray Train logs every report at INFO; our metrics file and reports hold them.
        logging_config=LoggingConfig(log_level="WARNING"))
    return TorchTrainer(train_loop_per_worker, scaling_config=scaling, run_config=run_config,
                        train_loop_config={"config": to_dict(cfg), "data": data})


def write_run_files(run_dir: Path, cfg: Config, data: PreparedData) -> None:
    """The resolved config, the vocabulary and the data statistics, next to the metrics."""
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    atomic_write_json(run_dir / "vocab.json", data.tokenizer)
    atomic_write_json(run_dir / "dataset_stats.json", data.dataset_stats)


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


def check_fits(t: TrainConfig, resources: dict[str, float]) -> None:
    """Refuse a run whose workers can never be placed (Ray would wait forever)."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if t.num_workers * t.cpus_per_worker > cpus or t.num_workers * t.gpus_per_worker > gpus:
        raise UserError(
            f"train.num_workers={t.num_workers} x (cpus_per_worker={t.cpus_per_worker}, "
            f"gpus_per_worker={t.gpus_per_worker}) does not fit the cluster "
            f"({cpus:g} CPUs, {gpus:g} GPUs)")


def with_cluster_precision(cfg: Config) -> Config:
    """The config with train.precision resolved once for the workers' hardware (Ray running)."""
    t = cfg.train
    precision = resolve_on_cluster(str(t.precision), t.cpus_per_worker, t.gpus_per_worker)
    if t.precision == Precision.auto:
        print(f"precision: auto is {precision} on the workers' hardware", flush=True)
    return replace(cfg, train=replace(t, precision=Precision(precision)))


def run_training_job(cfg: Config) -> int:
    """Preflight, then one Ray Train run; prints a summary. Re-running resumes the run."""
    cfg, data = preflight(cfg)
    run_dir = Path(cfg.output_dir) / cfg.name
    import ray
    from ray.train import TrainingFailedError

    start_ray(cfg.cluster)
    try:
        check_fits(cfg.train, ray.cluster_resources())
        t = cfg.train
        check_placeable(ray.nodes(), t.num_workers, t.cpus_per_worker, t.gpus_per_worker)
        cfg = with_cluster_precision(cfg)
        write_run_files(run_dir, cfg, data)
        from ray.util.queue import Queue

        reports = Queue(actor_options={"num_cpus": 0})
        trainer = build_trainer(cfg, ray.put(data), cfg.storage_path, cfg.name,
                                [make_metrics_callback(reports)])
        try:
            with MetricsWriter(run_dir / "metrics.jsonl", reports):
                result = trainer.fit()
        except TrainingFailedError as err:
            cause = user_error_in(err)
            if cause is not None:
                raise cause from None
            print(f"training failed: {str(err).strip().splitlines()[-1]}", file=sys.stderr)
            return EXIT_FAILURE
        print_summary(result.metrics or {}, result.checkpoint, run_dir)
        return EXIT_OK
    finally:
        ray.shutdown()


def print_summary(metrics: dict[str, Any], checkpoint: Any, run_dir: Path) -> None:
    keys = ["epochs_done", "step", "loss", "ppl", "acc", "val_loss", "val_ppl", "val_acc",
            "val_exact", "skipped_steps", "tokens_per_s"]
    print("\nrun summary")
    for key in keys:
        value = metrics.get(key)
        shown = "n/a" if value is None else (f"{value:.4g}" if isinstance(value, float) else value)
        print(f"  {key:<14} {shown}")
    if metrics.get("stop_reason"):
        print(f"  {'stopped':<14} {metrics['stop_reason']}")
    print(f"  {'run folder':<14} {run_dir}")
    print(f"  {'checkpoint':<14} {checkpoint.path if checkpoint else 'none'}")


def main(argv: list[str]) -> int:
    """`jobs/train.py`: one APT training run on Ray Train."""
    return run_training_job(parse_job_args(argv, "train.yaml", description=main.__doc__ or ""))

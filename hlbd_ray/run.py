"""The training job (`jobs/train.py`): one run on Ray Train, its run folder and summary.
The run itself (checks, trainer) is `hlbd_ray.trainer`, which the sweep shares."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hlbd_ray.capacity import check_placeable
from hlbd_ray.cli import parse_job_args
from hlbd_ray.cluster import start_ray
from hlbd_ray.config import Config, to_yaml
from hlbd_ray.data import PreparedData
from hlbd_ray.errors import EXIT_FAILURE, EXIT_OK
from hlbd_ray.files import atomic_write_json, atomic_write_text
from hlbd_ray.trainer import build_trainer, preflight, runs_that_fit, user_error_in, with_cluster_precision


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

    def __enter__(self) -> MetricsWriter:
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


def write_run_files(run_dir: Path, cfg: Config, data: PreparedData) -> None:
    """The resolved config, the vocabulary and the data statistics, next to the metrics."""
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    atomic_write_json(run_dir / "vocab.json", data.tokenizer)
    atomic_write_json(run_dir / "dataset_stats.json", data.dataset_stats)


def run_training_job(cfg: Config) -> int:
    """Preflight, then one Ray Train run; prints a summary. Re-running resumes the run."""
    cfg, data = preflight(cfg)
    run_dir = Path(cfg.output_dir) / cfg.name
    import ray
    from ray.train import TrainingFailedError

    start_ray(cfg.cluster)
    try:
        runs_that_fit(cfg.train, ray.cluster_resources())
        t = cfg.train
        check_placeable(ray.nodes(), t.num_workers, t.cpus_per_worker, t.gpus_per_worker)
        cfg = with_cluster_precision(cfg)
        write_run_files(run_dir, cfg, data)
        from ray.util.queue import Queue

        reports = Queue(actor_options={"num_cpus": 0})
        trainer = build_trainer(cfg, ray.put(data), cfg.resolved_storage_path(), cfg.name,
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


# The run summary's lines: keys of the report contract (hlbd_ray.contract).
SUMMARY_KEYS = ("epochs_done", "step", "loss", "ppl", "acc", "val_loss", "val_ppl", "val_acc",
                "val_exact", "skipped_steps", "tokens_per_s")


def print_summary(metrics: dict[str, Any], checkpoint: Any, run_dir: Path) -> None:
    print("\nrun summary")
    for key in SUMMARY_KEYS:
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

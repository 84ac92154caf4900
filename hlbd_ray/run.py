"""The training job (`jobs/train.py`): one run on Ray Train, its run folder and summary.
The run itself (checks, trainer) is `hlbd_ray.trainer`, which the sweep shares."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hlbd_ray.cli import parse_job_args
from hlbd_ray.cluster import start_ray
from hlbd_ray.config import Config, to_yaml
from hlbd_ray.data import PreparedData
from hlbd_ray.errors import EXIT_FAILURE, EXIT_OK
from hlbd_ray.files import atomic_write_json, atomic_write_text
from hlbd_ray.trainer import build_trainer, preflight, runs_that_fit, user_error_in


def make_metrics_callback(path: Path):
    """A Ray Train callback (runs in the controller) appending each report to metrics.jsonl."""
    from ray.train import UserCallback

    class MetricsFile(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            record = dict(metrics[0])
            record["checkpoint_path"] = checkpoint.path if checkpoint else None
            # One write call per line: a reader sees whole lines (it may miss the newest).
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, allow_nan=False) + "\n")

    return MetricsFile()


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
        write_run_files(run_dir, cfg, data)
        trainer = build_trainer(cfg, ray.put(data), cfg.storage_path, cfg.name,
                                [make_metrics_callback(run_dir / "metrics.jsonl")])
        try:
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

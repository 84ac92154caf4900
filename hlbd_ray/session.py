"""Where the training loop runs: under Ray Train, or in-process (tests, benchmarks), and
its autocast (the precision itself is resolved in precision.py).

The loop talks to one small interface (rank, device, the checkpoint to resume from,
`report`), so the exact same code runs on a Ray Train worker and in a plain process; the
benchmarks rely on that to measure Ray's overhead against a direct call.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import torch

from hlbd_ray.banner import actor_banner  # noqa: F401  (re-exported: train.py, tests)

T = TypeVar("T")


def autocast(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    """The forward pass's autocast for a resolved precision (nothing for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class LocalSession:
    """One in-process worker; checkpoints are copied to `run_dir/checkpoint_<n>`."""

    rank = 0
    world_size = 1

    def __init__(self, run_dir: str | Path, resume_from: str | Path | None = None,
                 device: str = "cpu", run_name: str = "local"):
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        self.run_name = run_name
        self.resume_from = Path(resume_from) if resume_from else None
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[Path] = []

    def restore(self, load: Callable[[Path], T]) -> T | None:
        return load(self.resume_from) if self.resume_from else None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | Path | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            target = self.run_dir / f"checkpoint_{len(self.checkpoints):06d}"
            shutil.copytree(checkpoint_dir, target)
            self.checkpoints.append(target)


class RayTrainSession:
    """A Ray Train worker: rank and device from the train context, reports via ray.train."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        _quiet_report_log()
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.run_name = context.get_experiment_name()
        self.device = ray.train.torch.get_device()
        self._train = ray.train

    def restore(self, load: Callable[[Path], T]) -> T | None:
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return load(Path(folder))

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        # Moves to the worker's device and wraps in DDP when there is more than one worker.
        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | Path | None = None) -> None:
        checkpoint = None
        if checkpoint_dir is not None:
            checkpoint = self._train.Checkpoint.from_directory(str(checkpoint_dir))
        self._train.report(metrics, checkpoint=checkpoint)


def _quiet_report_log() -> None:
    """Keep Ray Train from logging every report, with all its metrics, at INFO.

    No public API reaches that log line: Ray Train 2.60 emits it through a logger named
    after its own source file (`logging.getLogger(__file__)` in the module imported
    below), outside the `ray.train` logger that the public `LoggingConfig` sets, so it
    propagates to the worker's root logger at INFO. Our reports carry the same numbers.
    pyproject pins Ray to 2.60.x; tests/test_run.py fails if the line comes back.
    """
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


SCRATCH_PREFIX = "hlbd-ckpt-"


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A private temporary folder for one checkpoint before it is handed to the session.

    Its name carries the process id. A worker killed while it checkpoints (a fault, a
    preemption, a killed sweep) cannot remove its folder, so each new one first removes
    the folders that processes gone from this host left behind (13 had piled up in /tmp
    over a day of this project's tests).
    """
    import tempfile

    remove_orphaned_scratch(Path(tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as folder:
        yield Path(folder)


def remove_orphaned_scratch(root: Path) -> None:
    """Remove this user's scratch folders in `root` whose process no longer runs."""
    for folder in root.glob(f"{SCRATCH_PREFIX}*-*"):
        pid = folder.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or folder.stat().st_uid != os.getuid() or process_alive(int(pid)):
                continue
            shutil.rmtree(folder)
        except FileNotFoundError:
            continue      # another worker on this host removed it first


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True       # it runs, as another user
    return True



"""Where the training loop runs: under Ray Train, or in-process (tests, benchmarks), and
the precision its device runs at.

The loop talks to one small interface (rank, device, the checkpoint to resume from,
`report`), so the exact same code runs on a Ray Train worker and in a plain process; the
benchmarks rely on that to measure Ray's overhead against a direct call.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import torch

from hlbd_ray.banner import actor_banner  # noqa: F401  (re-exported: train.py, tests)

T = TypeVar("T")

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """True where the CPU multiplies bf16 natively (AMX tiles or AVX512-BF16), judged from
    the `flags` lines of /proc/cpuinfo (or of `cpuinfo`, its text).

    There bf16 autocast measured over 2x the fp32 step with the same loss (BENCHMARKS.md);
    elsewhere bf16 is emulated and slower, so fp32 stays the default.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags")
             for flag in line.split(":", 1)[1].split()}
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def resolve_precision(requested: str, device: torch.device, cpuinfo: str | None = None) -> str:
    """"fp32", "bf16" or "fp16" (a plain string: it travels in every report).

    "auto" is bf16 on a GPU that supports it (else fp16, with a grad scaler), bf16 on a
    CPU with native bf16 (`cpuinfo`: /proc/cpuinfo's text, read when not given), else fp32.
    """
    if requested != "auto":
        return str(requested)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16(cpuinfo) else "fp32"


# A probe task that gets no worker slot in this long means the workers cannot start either.
PROBE_TIMEOUT_S = 120.0


def _probe_precision(requested: str, use_gpu: bool) -> str:
    return resolve_precision(requested, torch.device("cuda" if use_gpu else "cpu"))


def resolve_on_cluster(requested: str, cpus_per_worker: float, gpus_per_worker: float) -> str:
    """"auto" resolved once, on the driver, by a task shaped like one Train worker.

    Ray places the task where such a worker can run, so it sees that hardware (a GPU's
    bf16 support, a worker node's CPU flags), not the driver's. The result goes into the
    config every worker and trial gets: a sweep on a mixed cluster compares like with
    like instead of some trials in bf16 and others in fp32.
    """
    if requested != "auto":
        return str(requested)
    import ray

    probe = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(_probe_precision)
    ref = probe.remote(requested, gpus_per_worker > 0)
    try:
        return ray.get(ref, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise RuntimeError(f"no worker slot ({cpus_per_worker:g} CPUs, {gpus_per_worker:g} GPUs) "
                           f"came free in {PROBE_TIMEOUT_S:g} s to resolve train.precision=auto") from None


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


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A private temporary folder for one checkpoint before it is handed to the session."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="hlbd-ckpt-") as folder:
        yield Path(folder)


